"""The SMTP submission ingress against untrusted senders: connections per client address, time to
authenticate, failed AUTH per client address, no token in any log, a bounded AUTH answer, and a
message's MIME parts and header fields bounded and parsed off the event loop. Real clients
(smtplib) on 127.0.0.1, as in test_ingress."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailgate import Mailgate
from mailgate.accounts import FAILURE_WINDOW, FAILURES_ALLOWED
from mailgate.ingress import from_bytes, self_signed
from test_ingress import in_thread, ingress, note, stored

ADDRESS_LIMIT = 10


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


def plain(user: str, token: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{token}".encode()).decode()


# ---- 1. connections from one client address -----------------------------------------------------


async def test_an_eleventh_connection_from_one_address_gets_421_at_the_greeting(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:  # max_connections stays 100

        def connections() -> tuple[int, bytes, int]:
            with contextlib.ExitStack() as open_ones:
                held = [open_ones.enter_context(smtplib.SMTP("127.0.0.1", ing.port, timeout=10))
                        for _ in range(ADDRESS_LIMIT)]  # fmt: skip
                try:
                    smtplib.SMTP("127.0.0.1", ing.port, timeout=10).close()
                    refused = (220, b"")
                except smtplib.SMTPConnectError as e:
                    refused = (e.smtp_code, e.smtp_error)
                held[0].quit()
                # Taken again once the server has seen one of them go (bounded: 100 × 0.05 s).
                for _ in range(100):
                    try:
                        with smtplib.SMTP("127.0.0.1", ing.port, timeout=10) as again:
                            return refused[0], refused[1], again.noop()[0]
                    except smtplib.SMTPConnectError:
                        time.sleep(0.05)
                return refused[0], refused[1], 421

        code, text, after_one_left = await in_thread(connections)
    assert code == 421 and text.startswith(b"4.7.0 Too many connections from your address")
    assert after_one_left == 250


async def test_the_connections_per_address_are_a_setting(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    from mailgate.config import Config

    assert Config.from_env({"MAILGATE_SMTP_MAX_CONNECTIONS_PER_ADDRESS": "40"}).smtp_max_connections_per_address == 40
    async with ingress(mg, certificate, max_connections_per_address=2) as ing:

        def connections() -> int:
            with smtplib.SMTP("127.0.0.1", ing.port, timeout=10), smtplib.SMTP("127.0.0.1", ing.port, timeout=10):
                try:
                    smtplib.SMTP("127.0.0.1", ing.port, timeout=10).close()
                except smtplib.SMTPConnectError as e:
                    return e.smtp_code
                return 220

        assert await in_thread(connections) == 421


def test_connections_are_counted_by_ipv4_address_and_by_ipv6_64() -> None:
    from mailgate.ingress import client_address

    assert client_address(("2001:db8:1:2::1", 50000, 0, 0)) == client_address(("2001:db8:1:2:ffff::9", 1, 0, 0))
    assert client_address(("2001:db8:1:2::1", 50000, 0, 0)) != client_address(("2001:db8:1:3::1", 50000, 0, 0))
    assert client_address(("::ffff:192.0.2.7", 25, 0, 0)) == client_address(("192.0.2.7", 26)) == "192.0.2.7"
    assert client_address(("192.0.2.7", 25)) != client_address(("192.0.2.8", 25))


# ---- 2. time to authenticate ---------------------------------------------------------------------


async def test_a_connection_that_does_not_authenticate_in_time_gets_421_and_is_closed(
    mg: Mailgate, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailgate.ingress.AUTH_DEADLINE", 2.0, raising=False)
    async with ingress(mg, certificate) as ing:

        def sessions() -> tuple[tuple[int, bytes], tuple[int, bytes], bool, int]:
            with ing.connect(login=("acme", ing.token)) as signed_in, contextlib.ExitStack() as idle:
                idle_tls = idle.enter_context(contextlib.closing(ing.connect()))  # EHLO, STARTTLS, EHLO, no more
                idle_clear = idle.enter_context(contextlib.closing(smtplib.SMTP("127.0.0.1", ing.port, timeout=10)))
                told_tls, told_clear = idle_tls.getreply(), idle_clear.getreply()
                closed = idle_clear.sock is not None and idle_clear.sock.recv(1) == b""
                # Connected before the other two, so past the deadline as well: authenticated, it stays.
                return told_tls, told_clear, closed, signed_in.noop()[0]

        told_tls, told_clear, closed, noop = await in_thread(sessions)
    assert told_tls[0] == 421 and told_tls[1].startswith(b"4.7.0 Not authenticated within 2 seconds")
    assert told_clear[0] == 421 and closed
    assert noop == 250


# ---- 3. failed AUTH per client address ---------------------------------------------------------------


async def test_failed_auth_from_one_address_locks_it_out_until_the_window_has_passed(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:
        bad = plain("acme", "mgt_" + "x" * 43)

        def attempts() -> tuple[list[int], list[int], tuple[int, bytes], tuple[int, bytes]]:
            good = []
            for _ in range(FAILURES_ALLOWED + 2):  # successes are not failures
                with ing.connect() as smtp:
                    good.append(smtp.docmd("AUTH", plain("acme", ing.token))[0])
            codes = []
            with ing.connect() as smtp:
                codes += [smtp.docmd("AUTH", bad)[0] for _ in range(3)]
            with ing.connect() as smtp:
                codes += [smtp.docmd("AUTH", bad)[0] for _ in range(FAILURES_ALLOWED - 3)]
                right_token = smtp.docmd("AUTH", plain("acme", ing.token))
            with ing.connect() as smtp:
                login = smtp.docmd("AUTH", "LOGIN")  # refused at once: no 334 challenge
            return good, codes, right_token, login

        good, codes, right_token, login = await in_thread(attempts)
        assert good == [235] * (FAILURES_ALLOWED + 2) and codes == [535] * FAILURES_ALLOWED
        assert right_token[0] == 454 and right_token[1].startswith(b"4.7.0 ")
        assert login[0] == 454 and login[1].startswith(b"4.7.0 ")

        ing.server.auth_failures.clock = lambda: time.monotonic() + FAILURE_WINDOW  # the window has passed

        def later() -> int:
            with ing.connect() as smtp:
                return smtp.docmd("AUTH", plain("acme", ing.token))[0]

        assert await in_thread(later) == 235


async def test_parallel_auth_gets_no_more_lookups_than_allowed_and_a_pool_of_good_ones_all_pass(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:

        def all_at_once(blob: str) -> list[int]:
            with contextlib.ExitStack() as stack:
                pool = [stack.enter_context(ing.connect()) for _ in range(ADDRESS_LIMIT)]
                for smtp in pool:  # every AUTH sent before any answer is read
                    smtp.send(f"AUTH {blob}\r\n".encode())
                return sorted(smtp.getreply()[0] for smtp in pool)

        good = await in_thread(all_at_once, plain("acme", ing.token))
        bad = await in_thread(all_at_once, plain("acme", "mgt_" + "y" * 43))
    assert good == [235] * ADDRESS_LIMIT  # an application's pool of connections
    assert bad == [454] * (ADDRESS_LIMIT - FAILURES_ALLOWED) + [535] * FAILURES_ALLOWED


def test_failed_auth_is_remembered_for_at_most_10000_addresses() -> None:
    from mailgate.ingress import AuthFailures

    failures = AuthFailures()
    for i in range(12_000):
        for _ in range(FAILURES_ALLOWED):
            failures.fail(f"10.0.{i // 256}.{i % 256}")
    assert len(failures) == 10_000
    assert failures.refused("10.0.46.223")  # the newest, still locked out
    assert not failures.refused("10.0.0.0")  # the oldest window was forgotten first


# ---- 4. no token in a log ----------------------------------------------------------------------------


async def test_no_token_nor_its_base64_reaches_a_log(
    mg: Mailgate, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with ingress(mg, certificate) as ing:
        token = ing.token
        secrets = [token, base64.b64encode(token.encode()).decode(), plain("acme", token).split()[1]]

        def sessions() -> list[int]:
            codes = []
            with ing.connect() as smtp:  # AUTH PLAIN, lower case
                codes.append(smtp.docmd("auth", plain("acme", token))[0])
            with ing.connect() as smtp:  # AUTH LOGIN, answered as it should be
                smtp.user, smtp.password = "acme", token
                codes.append(smtp.auth("LOGIN", smtp.auth_login)[0])
            with ing.connect() as smtp:  # the token answered as is, not in base64
                smtp.docmd("AUTH", "LOGIN " + base64.b64encode(b"acme").decode())
                codes.append(smtp.docmd(token)[0])
            with ing.connect() as smtp:  # out of step: the base64 token arrives as a line of its own
                smtp.send(b"AUTH LOGIN\r\nnot base64!\r\n" + base64.b64encode(token.encode()) + b"\r\n")
                codes += [smtp.getreply()[0] for _ in range(3)]
            with ing.connect() as smtp:  # separated by tabs: not a command aiosmtpd knows
                codes.append(smtp.docmd("AUTH\tPLAIN\t" + plain("acme", token).split()[1])[0])
            return codes

        codes = await in_thread(sessions)
    assert codes == [235, 235, 501, 334, 501, 500, 500], codes
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records).lower()
    assert "auth" in logged and ">>" in logged  # the lines were logged, without the secrets
    for secret in secrets:
        assert secret.lower() not in logged


# ---- 5. an overlong AUTH answer -------------------------------------------------------------------------


async def test_an_overlong_auth_login_answer_gets_501_and_the_session_stays_in_step(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:

        def session() -> list[tuple[int, bytes]]:
            with ing.connect() as smtp:
                challenge = smtp.docmd("AUTH", "LOGIN")
                smtp.send(b"A" * 100_000 + b"\r\n")
                return [challenge, smtp.getreply(), smtp.noop(), smtp.docmd("AUTH", plain("acme", ing.token))]

        replies = await in_thread(session)
    assert [code for code, _ in replies] == [334, 501, 250, 235], replies


# ---- 6. a message's MIME parts and header fields -------------------------------------------------------


def _chain(depth: int, tag: bytes) -> bytes:
    """A multipart nested `depth` deep around one text part: one part for the message, `depth`+1 parts."""
    head = b"".join(b"Content-Type: multipart/mixed; boundary=%s%d\r\n\r\n--%s%d\r\n" % (tag, i, tag, i)
                    for i in range(depth))  # fmt: skip
    tail = b"".join(b"\r\n--%s%d--\r\n" % (tag, i) for i in reversed(range(depth)))
    return head + b"Content-Type: text/plain\r\n\r\nhi" + tail


TOP = b"From: a@acme.example\r\nTo: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"


async def test_more_than_500_mime_parts_or_5000_header_fields_get_554(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    # 27 chains of 19 multiparts (20 deep, the most allowed): 542 parts.
    chains = b"\r\n--top\r\n".join(_chain(19, b"%d-" % i) for i in range(27))
    parts = TOP + b"Content-Type: multipart/mixed; boundary=top\r\n\r\n--top\r\n" + chains + b"\r\n--top--\r\n"
    received = TOP + b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 5_001 + b"\r\nhi\r\n"
    in_a_part = (TOP + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
                 + b"X-A: 1\r\n" * 5_001 + b"\r\nhi\r\n--b--\r\n")  # fmt: skip
    fine = TOP + b"Content-Type: multipart/mixed; boundary=top\r\n\r\n--top\r\n" + _chain(19, b"a") + b"\r\n--top--"
    async with ingress(mg, certificate) as ing:

        def sends() -> list[tuple[int, bytes]]:
            replies = []
            with ing.connect(login=("acme", ing.token)) as smtp:
                for raw in (parts, received, in_a_part, fine):
                    smtp.docmd("MAIL", "FROM:<a@acme.example>")
                    smtp.docmd("RCPT", "TO:<bob@example.org>")
                    replies.append(smtp.data(raw))
            return replies

        replies = await in_thread(sends)
        assert replies[0] == (554, b"5.6.0 message: has more than 500 MIME parts"), replies[0]
        assert replies[1] == (554, b"5.6.0 message: has more than 5,000 header fields"), replies[1]
        assert replies[2] == (554, b"5.6.0 message: has more than 5,000 header fields"), replies[2]
        assert replies[3][0] == 250, replies[3]
        assert len(await stored(mg)) == 1


class _HeldParses(ThreadPoolExecutor):
    """The loop's executor, holding a message's parse (asyncio.to_thread of from_bytes) until told."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self.parsing, self.go = threading.Event(), threading.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if from_bytes in getattr(fn, "args", ()):  # to_thread submits partial(context.run, from_bytes, …)

            def held() -> Any:
                self.parsing.set()
                self.go.wait(30)
                return fn(*args, **kwargs)

            return super().submit(held)
        return super().submit(fn, *args, **kwargs)


async def test_a_message_is_parsed_off_the_event_loop_while_other_clients_are_answered(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    executor = _HeldParses()
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        async with ingress(mg, certificate) as ing:

            def send() -> dict[str, Any]:
                with ing.connect(login=("acme", ing.token)) as smtp:
                    return smtp.send_message(note())

            sending = asyncio.ensure_future(in_thread(send))
            for _ in range(500):  # bounded: 500 × 0.02 s
                if executor.parsing.is_set() or sending.done():
                    break
                await asyncio.sleep(0.02)
            assert executor.parsing.is_set(), "the message was not parsed in the loop's executor"

            def another_client() -> int:
                with smtplib.SMTP("127.0.0.1", ing.port, timeout=10) as smtp:
                    return smtp.noop()[0]

            assert await in_thread(another_client) == 250  # answered while the message is being parsed
            executor.go.set()
            assert await sending == {}
        assert len(await stored(mg)) == 1
    finally:
        executor.go.set()
