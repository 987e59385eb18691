"""`Mailgate`: the one service layer under the library, the CLI, and (later) the API and UI.

async with Mailgate.open() as mg:                      # or: mg = await Mailgate.open(url)
    await mg.tenants.add("acme", name="Acme Corp", may_use_own_server=True)
    await mg.servers.set("global", {...})              # the mail server document
    resolution = await mg.resolve("acme")
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Any

from .db.engine import Database, connect, database_url, ensure_schema
from .settings.document import MailServer
from .settings.secrets import ENV_KEYS, key_file_for, load_keyring
from .settings.store import AuditRecord, Resolution, ServerInfo, Store, TenantInfo


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{os.uname().nodename}" if hasattr(os, "uname") else user


class Tenants:
    """`mg.tenants`: the tenants mailgate knows."""

    def __init__(self, mg: Mailgate) -> None:
        self._mg = mg

    async def add(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        may_use_own_server: bool = False,
        support_address: str | None = None,
        may_set_support_address: bool = False,
    ) -> TenantInfo:
        return await self._mg.store.add_tenant(
            tenant_id,
            name=name,
            may_use_own_server=may_use_own_server,
            support_address=support_address,
            may_set_support_address=may_set_support_address,
            actor=self._mg.actor,
        )

    async def get(self, tenant_id: str) -> TenantInfo:
        return await self._mg.store.get_tenant(tenant_id)

    async def list(self) -> list[TenantInfo]:
        return await self._mg.store.list_tenants()

    async def update(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        may_use_own_server: bool | None = None,
        support_address: str | None = None,
        clear_support_address: bool = False,
        may_set_support_address: bool | None = None,
    ) -> TenantInfo:
        return await self._mg.store.update_tenant(
            tenant_id,
            name=name,
            may_use_own_server=may_use_own_server,
            support_address=support_address,
            clear_support_address=clear_support_address,
            may_set_support_address=may_set_support_address,
            actor=self._mg.actor,
        )

    async def remove(self, tenant_id: str) -> None:
        await self._mg.store.remove_tenant(tenant_id, actor=self._mg.actor)


class Servers:
    """`mg.servers`: the global mail server ("global") and each tenant's own (its id)."""

    def __init__(self, mg: Mailgate) -> None:
        self._mg = mg

    async def get(self, scope: str) -> ServerInfo | None:
        """The server as it may be shown (each secret as {"set": bool}), or None."""
        return await self._mg.store.get_server(scope)

    async def set(
        self, scope: str, document: Mapping[str, Any] | MailServer, *, secrets: Mapping[str, str] | None = None
    ) -> ServerInfo:
        return await self._mg.store.set_server(scope, document, secrets=secrets, actor=self._mg.actor)

    async def enable(self, scope: str) -> ServerInfo:
        return await self._mg.store.set_server_enabled(scope, True, actor=self._mg.actor)

    async def disable(self, scope: str) -> ServerInfo:
        return await self._mg.store.set_server_enabled(scope, False, actor=self._mg.actor)

    async def delete(self, scope: str) -> None:
        await self._mg.store.delete_server(scope, actor=self._mg.actor)


class Mailgate:
    def __init__(self, db: Database, store: Store, actor: str) -> None:
        self.db = db
        self.store = store
        self.actor = actor
        self.tenants = Tenants(self)
        self.servers = Servers(self)

    @classmethod
    def open(
        cls, database_url: str | None = None, *, secret_keys: str | None = None, actor: str | None = None
    ) -> _Opening:
        """Open (and create or upgrade, if needed) the database.

        `database_url`: else $MAILGATE_DATABASE_URL, else SQLite `mailgate.db` in the working
        directory. `secret_keys`: else $MAILGATE_SECRET_KEYS, else (SQLite) a key file beside the
        database. `actor` names who makes the changes in the audit log (default: user@host).
        Use as `async with Mailgate.open() as mg:` or `mg = await Mailgate.open()`.
        """
        return _Opening(database_url, secret_keys, actor)

    async def resolve(self, tenant: str) -> Resolution:
        return await self.store.resolve(tenant)

    async def rotate_keys(self) -> int:
        return await self.store.rotate_keys(actor=self.actor)

    async def audit_log(self, tenant: str | None = None, *, limit: int = 100) -> list[AuditRecord]:
        return await self.store.audit_log(tenant, limit=limit)

    async def aclose(self) -> None:
        await self.db.dispose()

    async def __aenter__(self) -> Mailgate:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Opening:
    """What `Mailgate.open()` returns: awaitable, and an async context manager."""

    def __init__(self, url: str | None, secret_keys: str | None, actor: str | None) -> None:
        self._args = (url, secret_keys, actor)
        self._mg: Mailgate | None = None

    async def _open(self) -> Mailgate:
        url, secret_keys, actor = self._args
        db = connect(database_url(url))
        try:
            path = db.sqlite_path
            if db.is_sqlite and path is None and not (secret_keys or os.environ.get(ENV_KEYS)):
                from .settings.secrets import Keyring

                keyring = Keyring([Keyring.generate()], "a key for this in-memory database only")
            else:
                keyring = load_keyring(secret_keys or os.environ.get(ENV_KEYS), key_file_for(path) if path else None)
            await ensure_schema(db)
        except BaseException:
            await db.dispose()
            raise
        return Mailgate(db, Store(db, keyring), actor or default_actor())

    def __await__(self) -> Generator[Any, None, Mailgate]:
        return self._open().__await__()

    async def __aenter__(self) -> Mailgate:
        self._mg = await self._open()
        return self._mg

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._mg is not None:
            await self._mg.aclose()
