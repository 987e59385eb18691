"""The admin UI's people: admin users (argon2 password hashes) and their signed-in sessions.

A user is a system admin, or the admin of one tenant; signed in, they act as the same `Principal`
an API token of that role would (access.py), so the UI and the API obey one set of rules. A
session is a random token in a cookie; only its SHA-256 is stored, so signing out or removing the
user ends it at once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .access import Principal, Role, token_hash
from .db.engine import Database
from .db.models import AdminSession, AdminUser, SignInAttempt, Tenant, now
from .errors import Conflict, InvalidInput, NotFound

USER_ROLES: tuple[Role, ...] = ("system-admin", "tenant-admin")
MIN_PASSWORD = 12
SESSION_IDLE = timedelta(hours=2)  # signed out after this long without a request
SESSION_MAX = timedelta(hours=12)  # and after this long whatever happens
SEEN_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often per session
# Failed sign-ins: after this many for one address within the window, refuse it for the window.
# Counted in the database (SignInAttempt), so every process of a deployment shares the count.
FAILURES_ALLOWED = 5
FAILURE_WINDOW = 900.0
_ATTEMPTS = cast(Table, SignInAttempt.__table__)


@dataclass(frozen=True)
class UserInfo:
    id: int
    email: str
    role: str
    tenant: str | None
    created_at: datetime
    created_by: str
    last_login_at: datetime | None

    @property
    def principal(self) -> Principal:
        return Principal(self.role, self.tenant)  # type: ignore[arg-type]

    @property
    def actor(self) -> str:
        """How the audit log names what this user changed."""
        return f"user:{self.email} ({self.role}{' of ' + self.tenant if self.tenant else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "email": self.email, "role": self.role, "tenant": self.tenant,
            "created_at": self.created_at.isoformat(), "created_by": self.created_by,
            "last_login_at": self.last_login_at.isoformat() if self.last_login_at else None,
        }  # fmt: skip


class SignInRefused(InvalidInput):
    """Wrong address or password (never saying which), or too many failures."""


def _hasher() -> Any:
    from argon2 import PasswordHasher  # imported when needed: keeps the CLI quick to start

    return PasswordHasher()


def _email(value: str) -> str:
    from .message import Address

    try:
        return Address(value.strip()).address.lower()
    except ValueError as e:
        raise InvalidInput([("email", f"{value!r} is not a valid address: {e}")]) from None


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput([("password", f"is at least {MIN_PASSWORD} characters")])
    if len(password) > 1000 or any(c in password for c in "\r\n\x00"):
        raise InvalidInput([("password", "is at most 1,000 characters on one line")])


class AdminUsers:
    """`mg.users`: make, list, remove admin users; sign in, look up and end sessions."""

    def __init__(self, db: Database, actor: str) -> None:
        self.db = db
        self.actor = actor
        # A hash to check against when the address is unknown, so that the time a refusal takes
        # does not tell whether the address exists.
        self._dummy: str | None = None

    async def create(self, email: str, password: str, role: str, tenant: str | None = None) -> UserInfo:
        problems = []
        if role not in USER_ROLES:
            problems.append(("role", f"is one of {', '.join(USER_ROLES)} (senders use API tokens)"))
        elif role == "system-admin" and tenant is not None:
            problems.append(("tenant", "a system admin is not limited to a tenant; leave it out"))
        elif role == "tenant-admin" and tenant is None:
            problems.append(("tenant", "a tenant admin belongs to one tenant: name it"))
        if problems:
            raise InvalidInput(problems)
        address = _email(email)
        check_password(password)
        hashed = await asyncio.to_thread(_hasher().hash, password)
        async with self.db.write() as s:
            if tenant is not None and await s.get(Tenant, tenant) is None:
                raise NotFound([("tenant", f"there is no tenant {tenant!r}")])
            if await s.scalar(select(AdminUser.id).where(AdminUser.email == address)) is not None:
                raise Conflict([("email", f"there is already a user {address}")])
            row = AdminUser(email=address, password_hash=hashed, role=role, tenant_id=tenant, created_by=self.actor)
            s.add(row)
            await s.flush()
            return _info(row)

    async def list(self, tenant: str | None = None) -> list[UserInfo]:
        query = select(AdminUser).order_by(AdminUser.email)
        if tenant is not None:
            query = query.where(AdminUser.tenant_id == tenant)
        async with self.db.sessions() as s:
            return [_info(r) for r in await s.scalars(query)]

    async def get(self, email: str) -> UserInfo:
        address = _email(email)
        async with self.db.sessions() as s:
            row = await s.scalar(select(AdminUser).where(AdminUser.email == address))
        if row is None:
            raise NotFound([("email", f"there is no user {address}")])
        return _info(row)

    async def set_password(self, email: str, password: str) -> UserInfo:
        """A new password; every session of the user ends, and failed sign-ins are forgotten (they
        were guesses at the old one: the user may sign in at once)."""
        address = _email(email)
        check_password(password)
        hashed = await asyncio.to_thread(_hasher().hash, password)
        async with self.db.write() as s:
            row = await s.scalar(select(AdminUser).where(AdminUser.email == address))
            if row is None:
                raise NotFound([("email", f"there is no user {address}")])
            row.password_hash = hashed
            await s.execute(delete(AdminSession).where(AdminSession.user_id == row.id))
            await s.execute(delete(SignInAttempt).where(SignInAttempt.address_hash == token_hash(address)))
            return _info(row)

    async def remove(self, email: str) -> None:
        address = _email(email)
        async with self.db.write() as s:
            row = await s.scalar(select(AdminUser).where(AdminUser.email == address))
            if row is None:
                raise NotFound([("email", f"there is no user {address}")])
            await s.delete(row)

    async def any(self) -> bool:
        async with self.db.sessions() as s:
            return bool(await s.scalar(select(func.count()).select_from(AdminUser)))

    # ---- signing in ----------------------------------------------------------------------------

    async def sign_in(self, email: str, password: str) -> tuple[str, UserInfo]:
        """(a new session token for the cookie, the user), or SignInRefused."""
        from argon2.exceptions import InvalidHashError, VerificationError

        address = email.strip().lower()[:320]
        # The attempt is counted before the password is checked, so that parallel guesses can't
        # all pass the check while the first is still being verified; an unknown address is
        # counted the same way, so the refusal doesn't tell whether it exists.
        if await self._count_attempt(address) > FAILURES_ALLOWED:
            raise SignInRefused([("password", "too many failed sign-ins for this address: try again in 15 minutes")])
        async with self.db.sessions() as s:
            row = await s.scalar(select(AdminUser).where(AdminUser.email == address))
        hasher = _hasher()
        try:
            if row is None:
                self._dummy = self._dummy or await asyncio.to_thread(hasher.hash, secrets.token_urlsafe(16))
                await asyncio.to_thread(hasher.verify, self._dummy, password)
                raise VerificationError()
            # argon2 takes tens of milliseconds of CPU on purpose: not on the event loop.
            await asyncio.to_thread(hasher.verify, row.password_hash, password)
        except (VerificationError, InvalidHashError):
            raise SignInRefused([("password", "the address or the password is not right")]) from None
        token = secrets.token_urlsafe(32)
        async with self.db.write() as s:
            user = await s.get(AdminUser, row.id)
            if user is None:  # removed meanwhile
                raise SignInRefused([("password", "the address or the password is not right")])
            if hasher.check_needs_rehash(user.password_hash):
                user.password_hash = hasher.hash(password)
            user.last_login_at = now()
            s.add(AdminSession(token_hash=token_hash(token), user_id=user.id, expires_at=now() + SESSION_MAX))
            # Sessions that ended on their own are cleared out as new ones begin.
            await s.execute(delete(AdminSession).where(AdminSession.expires_at < now()))
            await s.execute(delete(SignInAttempt).where(SignInAttempt.address_hash == token_hash(address)))
            return token, _info(user)

    async def _count_attempt(self, address: str) -> int:
        """Count a sign-in of `address` in its window: how many there have been in it, this one
        included. One statement (insert, or add one), so every process sees every attempt."""
        A = _ATTEMPTS.c
        async with self.db.write() as s:
            # Wall-clock seconds: every process and machine counts with them (not so monotonic()).
            at = time.time()
            # Windows that have passed are forgotten: someone trying address after address leaves
            # at most the rows of one window behind.
            await s.execute(delete(_ATTEMPTS).where(A.window_start <= at - FAILURE_WINDOW))
            insert = (postgresql if not self.db.is_sqlite else sqlite).insert(_ATTEMPTS)
            passed = A.window_start <= at - FAILURE_WINDOW
            counted = (
                insert.values(address_hash=token_hash(address), attempts=1, window_start=at)
                .on_conflict_do_update(
                    index_elements=[A.address_hash],
                    set_={
                        # Counted no further than one past the limit: nothing grows while refused.
                        "attempts": case((passed, 1), (A.attempts > FAILURES_ALLOWED, A.attempts),
                                         else_=A.attempts + 1),
                        "window_start": case((passed, at), else_=A.window_start),
                    },
                )
                .returning(A.attempts)
            )  # fmt: skip
            return int((await s.execute(counted)).scalar_one())

    async def session(self, token: str) -> UserInfo | None:
        """The user a session token belongs to, or None (unknown, ended, idle too long)."""
        if not token or len(token) > 100:
            return None
        key = token_hash(token)
        at = now()
        async with self.db.sessions() as s:
            found = (
                await s.execute(
                    select(AdminSession, AdminUser)
                    .join(AdminUser, AdminUser.id == AdminSession.user_id)
                    .where(AdminSession.token_hash == key)
                )
            ).first()
        if found is None:
            return None
        session, user = found[0], found[1]
        if session.expires_at <= at or at - session.last_seen_at > SESSION_IDLE:
            await self.sign_out(token)
            return None
        if at - session.last_seen_at > SEEN_EVERY:
            async with self.db.write() as s:
                await s.execute(update(AdminSession).where(AdminSession.id == session.id).values(last_seen_at=at))
        return _info(user)

    async def sign_out(self, token: str) -> None:
        async with self.db.write() as s:
            await s.execute(delete(AdminSession).where(AdminSession.token_hash == token_hash(token)))


def _info(row: AdminUser) -> UserInfo:
    return UserInfo(row.id, row.email, row.role, row.tenant_id, row.created_at, row.created_by, row.last_login_at)
