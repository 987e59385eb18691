"""Failed sign-ins to the admin UI, counted in the database before the password is checked: parallel
guesses get no more than the allowed number of checks, every process of a deployment shares the
count, a success or a new password clears it, and the table keeps only the current window."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import func, select, update

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.accounts import FAILURE_WINDOW, FAILURES_ALLOWED, SignInRefused
from mailgate.db.models import SignInAttempt

ADMIN = "root@example.com"
PASSWORD = "correct horse battery staple"
WRONG = "not the password at all"
LOCKED = "too many failed sign-ins for this address: try again in 15 minutes"
NOT_RIGHT = "the address or the password is not right"


async def refusal(mg: Mailgate, email: str, password: str) -> str:
    """Why `password` is refused for `email` (the test expects a refusal)."""
    with pytest.raises(SignInRefused) as refused:
        await mg.users.sign_in(email, password)
    return refused.value.problems[0][1]


async def fail(mg: Mailgate, email: str, times: int) -> None:
    for _ in range(times):
        assert await refusal(mg, email, WRONG) == NOT_RIGHT


@pytest.fixture
def argon2_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords argon2 was asked to verify (the library's verify, counted and then called)."""
    from argon2 import PasswordHasher

    checked: list[str] = []
    lock = threading.Lock()
    real = PasswordHasher.verify

    def verify(self: PasswordHasher, hash: Any, password: Any) -> Any:
        with lock:
            checked.append(password)
        return real(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", verify)
    return checked


async def test_parallel_wrong_guesses_get_only_the_allowed_checks(database_url: str, argon2_checks: list[str]) -> None:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        await mg.users.create(ADMIN, PASSWORD, "system-admin")
        results = await asyncio.gather(*(mg.users.sign_in(ADMIN, f"{WRONG} {i}") for i in range(40)),
                                       return_exceptions=True)  # fmt: skip
        reasons = [r.problems[0][1] for r in results if isinstance(r, SignInRefused)]
        assert len(reasons) == 40
        assert reasons.count(NOT_RIGHT) == FAILURES_ALLOWED
        assert reasons.count(LOCKED) == 40 - FAILURES_ALLOWED
        assert len(argon2_checks) == FAILURES_ALLOWED
        # The right password is refused too, without being checked, until the window has passed.
        assert await refusal(mg, ADMIN, PASSWORD) == LOCKED
        assert len(argon2_checks) == FAILURES_ALLOWED
        await window_passes(mg)
        token, user = await mg.users.sign_in(ADMIN, PASSWORD)
        assert token and user.email == ADMIN


async def window_passes(mg: Mailgate) -> None:
    """Move every counted window back by FAILURE_WINDOW, as if that much time had gone by."""
    async with mg.db.write() as s:
        await s.execute(update(SignInAttempt).values(window_start=SignInAttempt.window_start - FAILURE_WINDOW))


async def test_unknown_addresses_are_counted_and_refused_the_same_way(database_url: str) -> None:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        await mg.users.create(ADMIN, PASSWORD, "system-admin")

        async def guesses(email: str) -> list[str]:
            found = await asyncio.gather(*(mg.users.sign_in(email, WRONG) for _ in range(10)), return_exceptions=True)
            return sorted(r.problems[0][1] for r in found if isinstance(r, SignInRefused))

        known, unknown = await asyncio.gather(guesses(ADMIN), guesses("nobody@example.com"))
        assert known == unknown == sorted([NOT_RIGHT] * FAILURES_ALLOWED + [LOCKED] * (10 - FAILURES_ALLOWED))


async def test_two_processes_share_the_count(database_url: str) -> None:
    async with (
        Mailgate.open(database_url, secret_keys=TEST_KEY) as one,
        Mailgate.open(database_url, secret_keys=TEST_KEY) as two,
    ):
        await one.users.create(ADMIN, PASSWORD, "system-admin")
        await fail(one, ADMIN, 3)
        await fail(two, ADMIN, FAILURES_ALLOWED - 3)
        assert await refusal(one, ADMIN, PASSWORD) == LOCKED
        assert await refusal(two, ADMIN, PASSWORD) == LOCKED


async def test_the_right_password_before_the_limit_signs_in_and_clears_the_count_everywhere(database_url: str) -> None:
    async with (
        Mailgate.open(database_url, secret_keys=TEST_KEY) as one,
        Mailgate.open(database_url, secret_keys=TEST_KEY) as two,
    ):
        await one.users.create(ADMIN, PASSWORD, "system-admin")
        await fail(one, ADMIN, FAILURES_ALLOWED - 1)
        await two.users.sign_in(ADMIN, PASSWORD)  # the other process signs in: the count is cleared for both
        await fail(one, ADMIN, FAILURES_ALLOWED - 1)
        _, user = await one.users.sign_in(ADMIN, PASSWORD)
        assert user.email == ADMIN
        await fail(one, ADMIN, FAILURES_ALLOWED)
        assert await refusal(one, ADMIN, PASSWORD) == LOCKED


async def test_a_new_password_ends_the_lockout(database_url: str) -> None:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        await mg.users.create(ADMIN, PASSWORD, "system-admin")
        await fail(mg, ADMIN, FAILURES_ALLOWED)
        assert await refusal(mg, ADMIN, PASSWORD) == LOCKED
        await mg.users.set_password(ADMIN, "a brand new password")
        _, user = await mg.users.sign_in(ADMIN, "a brand new password")
        assert user.email == ADMIN


async def test_the_table_keeps_one_bounded_row_per_address_of_the_current_window(database_url: str) -> None:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        long_address = "x" * 5000 + "@example.com"
        for address in ("a@example.com", "b@example.com", long_address):
            await fail(mg, address, 2)
        async with mg.db.sessions() as s:
            rows = list(await s.execute(select(SignInAttempt.address_hash, SignInAttempt.attempts)))
        assert sorted(a for _, a in rows) == [2, 2, 2]
        assert all(len(key) == 64 and "example" not in key for key, _ in rows)  # a hash, not the address
        await window_passes(mg)
        await fail(mg, "c@example.com", 1)  # the next sign-in forgets the windows that have passed
        async with mg.db.sessions() as s:
            assert await s.scalar(select(func.count()).select_from(SignInAttempt)) == 1
