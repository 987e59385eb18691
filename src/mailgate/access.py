"""Who may do what: the three roles of DESIGN.md, the principal a request acts as, and the API
tokens that name one. The rules themselves live here, not in the routes, so the API, the CLI and
the admin UI all ask the same questions.

A token is `mgt_` and 43 characters of randomness; only its SHA-256 is stored, and it is shown
once, when it is made. Lookups are cached for `CACHE_TTL` seconds: a token revoked in another
process stops working within that time (at once in this one).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select, update

from .db.engine import Database
from .db.models import ApiToken, Tenant, now
from .errors import InvalidInput, MailgateError, NotFound

Role = Literal["system-admin", "tenant-admin", "sender"]
ROLES: tuple[Role, ...] = ("system-admin", "tenant-admin", "sender")
TOKEN_PREFIX = "mgt_"
CACHE_TTL = 2.0
LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per token


class Forbidden(MailgateError):
    """The principal's role does not allow this (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a role, and for tenant roles the one tenant it may touch."""

    role: Role
    tenant: str | None
    token_id: int | None = None

    @property
    def actor(self) -> str:
        """How the audit log names it."""
        who = f"token:{self.token_id}" if self.token_id is not None else "local"
        return f"{who} ({self.role}{' of ' + self.tenant if self.tenant else ''})"

    @property
    def is_system_admin(self) -> bool:
        return self.role == "system-admin"

    def tenant_for(self, tenant: str | None) -> str | None:
        """The tenant a read or write is limited to. System admins may name any tenant (or none:
        all). Tenant roles are held to their own; naming another tenant finds nothing, exactly
        as if it did not exist."""
        if self.is_system_admin:
            return tenant
        if tenant is not None and tenant != self.tenant:
            raise NotFound([("tenant", f"there is no tenant {tenant!r}")])
        return self.tenant

    def may_see_tenant(self, tenant: str) -> None:
        self.tenant_for(tenant)

    def must_manage_settings(self, scope: str) -> None:
        """The mail server of `scope` ("global" or a tenant): system admins, and the tenant's own
        admin for its tenant."""
        if self.is_system_admin:
            return
        if scope == "global":
            raise Forbidden("only a system admin manages the global mail server")
        self.may_see_tenant(scope)
        if self.role != "tenant-admin":
            raise Forbidden("a sender token may only submit and read messages")

    def may_change_tenant_fields(self, tenant: str, fields: set[str], *, may_set_support_address: bool) -> None:
        """Changing `fields` of a tenant: a system admin changes any; its tenant admin only
        `admin_address`, and `support_address` when the tenant may set it."""
        self.must_be("system-admin", "tenant-admin")
        self.may_see_tenant(tenant)
        if self.is_system_admin:
            return
        if others := fields - {"support_address", "admin_address"}:
            raise Forbidden(f"only a system admin changes {', '.join(sorted(others))}")
        if "support_address" in fields and not may_set_support_address:
            raise Forbidden("this tenant may not set its support address (a system admin decides)")

    def must_be(self, *roles: Role) -> None:
        if self.role not in roles:
            raise Forbidden(f"this needs the role {' or '.join(roles)}; this token is {self.role}")


@dataclass(frozen=True)
class TokenInfo:
    id: int
    prefix: str
    role: str
    tenant: str | None
    name: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prefix": self.prefix,
            "role": self.role,
            "tenant": self.tenant,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def token_hash(token: str) -> str:
    """How a random token (API token, session, consent state) is stored: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class ApiTokens:
    """`mg.api_tokens`: make, list, revoke, and check API tokens."""

    def __init__(self, db: Database, actor: str) -> None:
        self.db = db
        self.actor = actor
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._used: dict[int, float] = {}

    async def create(self, role: str, tenant: str | None = None, *, name: str = "") -> tuple[str, TokenInfo]:
        """A new token: (the token itself — shown this once, never stored — and its info)."""
        problems = []
        if role not in ROLES:
            problems.append(("role", f"is one of {', '.join(ROLES)}"))
        elif role == "system-admin" and tenant is not None:
            problems.append(("tenant", "a system-admin token is not limited to a tenant; leave it out"))
        elif role != "system-admin" and tenant is None:
            problems.append(("tenant", f"a {role} token belongs to one tenant: name it"))
        if len(name) > 200 or "\n" in name or "\r" in name:
            problems.append(("name", "is at most 200 characters on one line"))
        if problems:
            raise InvalidInput(problems)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self.db.write() as s:
            if tenant is not None and await s.get(Tenant, tenant) is None:
                raise NotFound([("tenant", f"there is no tenant {tenant!r}")])
            row = ApiToken(
                token_hash=token_hash(token), prefix=token[:12], role=role, tenant_id=tenant, name=name,
                created_by=self.actor,
            )  # fmt: skip
            s.add(row)
            await s.flush()
            return token, _info(row)

    async def list(self, *, include_revoked: bool = False) -> list[TokenInfo]:
        query = select(ApiToken).order_by(ApiToken.id)
        if not include_revoked:
            query = query.where(ApiToken.revoked_at.is_(None))
        async with self.db.sessions() as s:
            return [_info(r) for r in await s.scalars(query)]

    async def revoke(self, token_id: int) -> TokenInfo:
        async with self.db.write() as s:
            row = await s.get(ApiToken, token_id, with_for_update=True)
            if row is None:
                raise NotFound([("token", f"there is no token {token_id}")])
            if row.revoked_at is None:
                row.revoked_at = now()
            info = _info(row)
        self._cache.clear()
        return info

    def forget_cached(self) -> None:
        """Look every token up again (after a change that may have removed some)."""
        self._cache.clear()

    async def any_system_admin(self) -> bool:
        async with self.db.sessions() as s:
            query = select(ApiToken.id).where(ApiToken.role == "system-admin", ApiToken.revoked_at.is_(None))
            return (await s.scalar(query.limit(1))) is not None

    async def authenticate(self, token: str) -> Principal | None:
        """The principal a token stands for, or None (unknown, malformed or revoked)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
            return None
        key = token_hash(token)
        at = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and at - cached[0] < CACHE_TTL:
            return cached[1]
        async with self.db.sessions() as s:
            row = await s.scalar(select(ApiToken).where(ApiToken.token_hash == key))
        principal = None
        if row is not None and row.revoked_at is None:
            principal = Principal(row.role, row.tenant_id, row.id)  # type: ignore[arg-type]
            if at - self._used.get(row.id, -1e9) >= LAST_USED_EVERY.total_seconds():
                self._used[row.id] = at
                async with self.db.write() as s:
                    await s.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now()))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (at, principal)
        return principal


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        row.id, row.prefix, row.role, row.tenant_id, row.name, row.created_at, row.created_by, row.last_used_at,
        row.revoked_at,
    )  # fmt: skip
