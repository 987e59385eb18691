"""Tenants and mail servers in the database: saving, reading (secrets write-only), resolving which
server a tenant sends through, and the audit log of every change.

Every change is one transaction: validated first, written whole, audited in the same commit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..db.engine import Database
from ..db.models import AuditEntry, ConsentRequest, EventRow, MailServerRow, MessageRow, ServerSecret, Tenant, now
from ..errors import Conflict, NotFound, SettingsError
from ..events import SERVER_BROKEN, SERVER_RECOVERED, record_server_event
from .document import (
    SECRET_FIELDS,
    MailServer,
    OAuth2AuthSettings,
    destination,
    parse_server,
    public_document,
    required_secrets,
    secret_cleared,
    secret_fields,
    secret_value,
    storable_document,
)
from .secrets import CANNOT_DECRYPT, Keyring

if TYPE_CHECKING:
    from ..destinations import DestinationPolicy, Destinations

GLOBAL = "global"
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what a tenant id is (the API checks it too)


@dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str
    may_use_own_server: bool
    support_address: str | None
    may_set_support_address: bool
    admin_address: str | None
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "may_use_own_server": self.may_use_own_server,
            "support_address": self.support_address,
            "may_set_support_address": self.may_set_support_address,
            "admin_address": self.admin_address,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class ServerInfo:
    """A mail server as it may be shown: `document` has {"set": bool} for each secret."""

    scope: str
    version: int
    enabled: bool
    document: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    updated_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "version": self.version,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
            "server": self.document,
        }


@dataclass(frozen=True)
class ServerHealth:
    scope: str
    version: int
    enabled: bool
    kind: str
    broken_reason: str | None
    broken_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_failure: str | None
    token_expires_at: datetime | None
    consented_at: datetime | None
    notes: list[str]

    @property
    def status(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.broken_reason:
            return "broken"
        if self.last_failure_at and (self.last_success_at is None or self.last_failure_at > self.last_success_at):
            return "failing"
        return "ok" if self.last_success_at else "unknown"

    def to_dict(self) -> dict[str, Any]:
        def at(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "scope": self.scope,
            "version": self.version,
            "status": self.status,
            "enabled": self.enabled,
            "kind": self.kind,
            "broken": {"reason": self.broken_reason, "since": at(self.broken_at)} if self.broken_reason else None,
            "last_success_at": at(self.last_success_at),
            "last_failure": {"at": at(self.last_failure_at), "text": self.last_failure}
            if self.last_failure_at
            else None,
            "token_expires_at": at(self.token_expires_at),
            "consented_at": at(self.consented_at),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Resolution:
    """Which mail server a tenant sends through, and why. `server` carries its secrets (as
    SecretStr); it is None when sending is disabled for the tenant, or (with `broken_reason`)
    when the server's stored settings don't load in this version: its messages are then held
    until the settings are saved again."""

    tenant: str
    source: Literal["tenant", "global"] | None
    server: MailServer | None
    server_id: int | None
    version: int | None
    reason: str
    broken_reason: str | None = None  # the server refused us for good; its messages wait

    @property
    def disabled(self) -> bool:
        return self.server is None

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "source": self.source, "version": self.version, "reason": self.reason}


@dataclass(frozen=True)
class LoadedServer:
    """A stored server with its secrets (never for showing), its row id and version."""

    scope: str
    id: int
    version: int
    server: MailServer


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    actor: str
    action: str
    tenant_id: str | None
    scope: str | None
    changes: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "tenant": self.tenant_id,
            "scope": self.scope,
            "changes": self.changes,
        }


class _Part:
    """What both halves of the store share: the database, the keys, and who makes the changes."""

    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        actor: str,
        on_change: Callable[[], None] | None = None,
        *,
        destinations: Destinations | None = None,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.actor = actor
        self.on_change = on_change  # told of every change (caches of resolutions listen)
        self.destinations = destinations  # where servers may point; None: anywhere (no check)

    def _audit(
        self,
        s: AsyncSession,
        action: str,
        tenant_id: str | None,
        scope: str | None,
        changes: list[Any],
        actor: str | None = None,
    ) -> None:
        _audit(s, actor or self.actor, action, tenant_id, scope, changes)
        if self.on_change is not None:
            self.on_change()


class Tenants(_Part):
    """`mg.tenants`: the tenants mailgate knows."""

    async def add(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        may_use_own_server: bool = False,
        support_address: str | None = None,
        may_set_support_address: bool = False,
        admin_address: str | None = None,
    ) -> TenantInfo:
        _check_tenant_id(tenant_id)
        fields = _tenant_fields(name=name if name is not None else tenant_id, support_address=support_address,
                                admin_address=admin_address)  # fmt: skip
        async with self.db.write() as s:
            if await s.get(Tenant, tenant_id) is not None:
                raise Conflict([("tenant", f"a tenant {tenant_id!r} exists already")])
            # A removed tenant's messages stay in the log until purged: a new tenant with the same id
            # would see them as its own. Not until they are gone.
            if await s.scalar(select(MessageRow.id).where(MessageRow.tenant_id == tenant_id).limit(1)) is not None:
                raise Conflict([("tenant", f"messages of an earlier tenant {tenant_id!r} are still in the log (they "
                                           "are removed MAILGATE_RETENTION_LOG after they ended); choose another "
                                           "id")])  # fmt: skip
            row = Tenant(
                id=tenant_id,
                may_use_own_server=may_use_own_server,
                may_set_support_address=may_set_support_address,
                **fields,
            )
            s.add(row)
            await s.flush()
            info = _tenant_info(row)
            changes = [{"field": k, "from": None, "to": v} for k, v in _audited(info).items()]
            self._audit(s, "tenant.add", tenant_id, None, changes)
        return info

    async def get(self, tenant_id: str) -> TenantInfo:
        async with self.db.sessions() as s:
            return _tenant_info(await _tenant(s, tenant_id))

    async def list(self) -> list[TenantInfo]:
        async with self.db.sessions() as s:
            rows = (await s.scalars(select(Tenant).order_by(Tenant.id))).all()
            return [_tenant_info(r) for r in rows]

    async def update(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        may_use_own_server: bool | None = None,
        support_address: str | None = None,
        clear_support_address: bool = False,
        may_set_support_address: bool | None = None,
        admin_address: str | None = None,
        clear_admin_address: bool = False,
    ) -> TenantInfo:
        async with self.db.write() as s:
            row = await _tenant(s, tenant_id, lock=True)
            before = _audited(_tenant_info(row))
            fields = _tenant_fields(name=name, support_address=support_address, admin_address=admin_address)
            for key, value in fields.items():
                if value is not None:
                    setattr(row, key, value)
            if clear_support_address:
                row.support_address = None
            if clear_admin_address:
                row.admin_address = None
            if may_use_own_server is not None:
                row.may_use_own_server = may_use_own_server
            if may_set_support_address is not None:
                row.may_set_support_address = may_set_support_address
            row.updated_at = now()
            await s.flush()
            info = _tenant_info(row)
            after = _audited(info)
            changes = [{"field": k, "from": before[k], "to": after[k]} for k in after if before[k] != after[k]]
            if changes:
                self._audit(s, "tenant.update", tenant_id, None, changes)
        return info

    async def remove(self, tenant_id: str) -> None:
        """Remove a tenant and its own mail server (the audit log keeps their history)."""
        async with self.db.write() as s:
            row = await _tenant(s, tenant_id, lock=True)
            server = await _server_row(s, tenant_id)
            await s.delete(row)
            # Its events go too (its webhooks go with the tenant): a new tenant of the same id must not read them.
            await s.execute(delete(EventRow).where(EventRow.tenant_id == tenant_id))
            changes: list[Any] = [{"field": "tenant", "from": tenant_id, "to": None}]
            if server is not None:
                changes.append({"field": "server", "from": f"version {server.version}", "to": None})
            self._audit(s, "tenant.remove", tenant_id, None, changes)


class Servers(_Part):
    """`mg.servers`: the global mail server ("global") and each tenant's own (its id)."""

    async def get(self, scope: str) -> ServerInfo | None:
        """The server as it may be shown (each secret as {"set": bool}), or None."""
        async with self.db.sessions() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope)
            if row is None:
                return None
            return _server_info(row, {x.field for x in await s.scalars(_secrets_of(row))})

    async def set(
        self, scope: str, document: Mapping[str, Any] | MailServer, *, secrets: Mapping[str, str] | None = None
    ) -> ServerInfo:
        """Save the mail server of `scope` ("global" or a tenant id), whole.

        Secrets are write-only. A secret field in the document (or in `secrets`, by path, e.g.
        {"auth.password": …} for one read from stdin) replaces the stored one; null or
        {"set": false} removes it; absent or {"set": true} keeps the stored one — but only if no
        destination field (host, port, security, token URL, authority, directory id, client id,
        graph endpoint…) changed; otherwise the save is refused until the secret is given again.
        """
        server, fields, given, cleared = _read_secrets(document, secrets)
        await self._check_destinations(scope, server)

        async with self.db.write() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope, lock=True)
            stored: dict[str, ServerSecret] = {}
            old: MailServer | None = None
            unloadable: str | None = None
            if row is not None:
                stored = {x.field: x for x in await s.scalars(_secrets_of(row))}
                old, unloadable = _old_server(row)
            server, stale = _consented(server, old, given, cleared, set(stored))
            if stale:
                cleared = cleared | {GRAPH_REFRESH_TOKEN}
            kept = _kept_secrets(server, fields, given, cleared, set(stored), old, unloadable)

            old_public = _server_info(row, set(stored)).document if row is not None else {}
            old_enabled = row.enabled if row is not None else None
            if row is None:
                row = MailServerRow(
                    scope=scope,
                    tenant_id=_tenant_of(scope),
                    enabled=server.enabled,
                    document=storable_document(server),
                    version=1,
                    updated_by=self.actor,
                )
                s.add(row)
                await s.flush()
            else:
                row.enabled = server.enabled
                row.document = storable_document(server)
                row.version += 1
                row.updated_at = now()
                row.updated_by = self.actor
                await _mend(s, row)
            for path, secret in stored.items():
                if path not in kept and path not in given:
                    await s.delete(secret)
            for path, value in given.items():
                ciphertext = self.keyring.encrypt(scope, path, value)
                if path in stored:
                    stored[path].ciphertext = ciphertext
                    stored[path].updated_at = now()
                else:
                    s.add(ServerSecret(server_id=row.id, field=path, ciphertext=ciphertext))
            await s.flush()
            info = _server_info(row, kept | set(given))
            changes = _diff(old_public, info.document)
            if old_enabled != server.enabled:
                changes.insert(0, {"field": "enabled", "from": old_enabled, "to": server.enabled})
            changes += [{"field": p, "secret": "changed"} for p in sorted(given)]
            for p in sorted(set(stored) - kept - set(given)):
                removed: dict[str, Any] = {"field": p, "secret": "removed"}
                if stale and p == GRAPH_REFRESH_TOKEN:
                    removed["why"] = stale
                changes.append(removed)
                if p in REFRESH_TOKENS:  # the grant is gone: the mailbox is not connected any more
                    row.consented_at = row.token_expires_at = None
            self._audit(s, "server.set", _tenant_of(scope), scope, changes)
        return info

    async def unsaved(
        self, scope: str, document: Mapping[str, Any] | MailServer, *, secrets: Mapping[str, str] | None = None
    ) -> MailServer:
        """The server `document` describes, with its secrets, as `set` would save it — the stored
        secrets kept under the same rule (only when no destination field changed) — without
        saving anything: for a test e-mail of settings not saved yet."""
        server, fields, given, cleared = _read_secrets(document, secrets)
        await self._check_destinations(scope, server)
        async with self.db.sessions() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope)
            stored = {x.field: x for x in await s.scalars(_secrets_of(row))} if row is not None else {}
            old, unloadable = _old_server(row) if row is not None else (None, None)
        server, stale = _consented(server, old, given, cleared, set(stored))
        if stale:
            cleared = cleared | {GRAPH_REFRESH_TOKEN}
        kept = _kept_secrets(server, fields, given, cleared, set(stored), old, unloadable)
        values = {**given, **{p: self.keyring.decrypt(scope, p, stored[p].ciphertext) for p in kept}}
        doc = {**storable_document(server), "enabled": server.enabled}
        for path, value in values.items():
            *parents, name = path.split(".")
            node = doc
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = value
        return parse_server(doc)

    async def _check_destinations(self, scope: str, server: MailServer) -> None:
        """SettingsError naming each field that points where the scope's destination policy does
        not allow (after resolving names: a name of the operator's network is refused too), and a
        tenant's ca_file: a path on mailgate's machine is the operator's to name. Connections check
        again when they are made, so a name that resolves elsewhere later gains nothing."""
        problems: list[tuple[str, str]] = []
        if scope != GLOBAL and server.smtp is not None and server.smtp.ca_file is not None:
            problems.append(("smtp.ca_file", "a file on mailgate's machine is for the global mail server only: give "
                                             "the CA's certificate itself as ca_certificate (PEM text)"))  # fmt: skip
        if self.destinations is not None:
            policy = self.destinations.for_scope(scope)
            hosts = _destination_hosts(server)
            checks = await asyncio.gather(*(_refused(policy, host) for host in hosts.values()))
            problems += [(f, why) for f, why in zip(hosts, checks, strict=True) if why]
        if problems:
            raise SettingsError(problems)

    async def enable(self, scope: str) -> ServerInfo:
        """Switch the server on ("use mail server")."""
        return await self._switch(scope, True)

    async def disable(self, scope: str) -> ServerInfo:
        """Switch the server off; for "global" that means no tenant can send."""
        return await self._switch(scope, False)

    async def _switch(self, scope: str, enabled: bool) -> ServerInfo:
        async with self.db.write() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope, lock=True)
            if row is None:
                raise NotFound([("server", f"no mail server is set for {scope}")])
            if row.enabled != enabled:
                self._audit(s, "server.enable" if enabled else "server.disable", _tenant_of(scope), scope,
                       [{"field": "enabled", "from": row.enabled, "to": enabled}])  # fmt: skip
                row.enabled = enabled
                row.version += 1
                row.updated_at = now()
                row.updated_by = self.actor
            if enabled:
                await _mend(s, row)
            return _server_info(row, {x.field for x in await s.scalars(_secrets_of(row))})

    async def delete(self, scope: str) -> None:
        async with self.db.write() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope, lock=True)
            if row is None:
                raise NotFound([("server", f"no mail server is set for {scope}")])
            await s.delete(row)
            self._audit(s, "server.delete", _tenant_of(scope), scope,
                   [{"field": "server", "from": f"version {row.version}", "to": None}])  # fmt: skip

    # ---- resolution ----------------------------------------------------------------------------

    async def resolve(self, tenant_id: str, *, secrets: bool = True) -> Resolution:
        """The mail server `tenant_id` sends through, exactly by DESIGN.md's rules:
        1. no global server, or the global server switched off: sending is disabled for everyone;
        2. the tenant's own server, when it is switched on and the tenant may have one;
        3. otherwise the global server.
        One server's document, whole, with that server's secrets (unless `secrets` is False: to
        know whether and where a tenant can send, without decrypting anything); never a mix."""
        async with self.db.sessions() as s:
            tenant = await _tenant(s, tenant_id)
            query = select(MailServerRow).where(MailServerRow.scope.in_([GLOBAL, tenant_id]))
            rows = {r.scope: r for r in await s.scalars(query)}
            glob, own = rows.get(GLOBAL), rows.get(tenant_id)
            if glob is None or not glob.enabled:
                state = "is not set" if glob is None else "is switched off"
                why = f"the global mail server {state}: sending is disabled for every tenant"
                return Resolution(tenant_id, None, None, None, None, why)
            if own is not None and own.enabled and tenant.may_use_own_server:
                why = f"{tenant_id} sends through its own mail server"
                return await self._resolution(s, tenant_id, "tenant", own, why, secrets=secrets)
            if own is None:
                why = f"{tenant_id} has no mail server of its own"
            elif not tenant.may_use_own_server:
                why = f"{tenant_id} has a mail server of its own but may not use it"
            else:
                why = f"{tenant_id}'s own mail server is switched off"
            why += ": it uses the global one"
            return await self._resolution(s, tenant_id, "global", glob, why, secrets=secrets)

    async def _resolution(
        self, s: AsyncSession, tenant_id: str, source: Literal["tenant", "global"], row: MailServerRow, why: str,
        *, secrets: bool,
    ) -> Resolution:  # fmt: skip
        """The tenant's resolution to `row`'s server. A stored document this version of mailgate
        refuses (saved before a check it now makes) sends nothing: the tenant's messages wait, as
        they do for a broken server, and the reason says which field and to save it again."""
        try:
            server = await self._with_secrets(s, row) if secrets else _stored_server(row)
        except SettingsError as e:
            unloadable = _unloadable(row.scope, e)
            return Resolution(tenant_id, source, None, row.id, row.version, f"{why}, but {unloadable}", unloadable)
        return Resolution(tenant_id, source, server, row.id, row.version, why, row.broken_reason)

    async def mark_broken(self, server_id: int, version: int, reason: str) -> bool:
        """Note that the server refused us for good (credentials, TLS, security settings), unless
        its settings changed since the attempt. Its messages wait until it is saved or enabled."""
        async with self.db.write() as s:
            row = await s.get(MailServerRow, server_id, with_for_update=True)
            if row is None or row.version != version or row.broken_reason is not None:
                return False
            row.broken_reason, row.broken_at = reason, now()
            _audit(s, "mailgate", "server.broken", _tenant_of(row.scope), row.scope,
                   [{"field": "broken_reason", "from": None, "to": reason}])  # fmt: skip
            await record_server_event(s, SERVER_BROKEN, row.scope, str(row.document.get("kind", "smtp")), reason)
            return True

    async def record_health(self, updates: Mapping[int, Mapping[str, Any]]) -> None:
        """Workers' news of their servers (by id): last_success_at, last_failure_at and
        last_failure, token_expires_at. Not a settings change: no new version, no audit entry."""
        allowed = {"last_success_at", "last_failure_at", "last_failure", "token_expires_at"}
        async with self.db.write() as s:
            for server_id, values in updates.items():
                assert set(values) <= allowed, values
                await s.execute(update(MailServerRow).where(MailServerRow.id == server_id).values(**values))

    async def health(self, scope: str) -> ServerHealth:
        """What is known of the server's credentials and its last sends (for `servers health` and
        GET …/server/health)."""
        async with self.db.sessions() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope)
            if row is None:
                raise NotFound([("server", f"no mail server is set for {scope}")])
            return _health(row)

    async def with_secrets(self, scope: str) -> MailServer | None:
        """A stored server with its secrets decrypted, for sending or testing; never for showing."""
        async with self.db.sessions() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope)
            return await self._with_secrets(s, row) if row is not None else None

    async def _with_secrets(self, s: AsyncSession, row: MailServerRow) -> MailServer:
        doc = {**row.document, "enabled": row.enabled}
        for secret in await s.scalars(_secrets_of(row)):
            *parents, name = secret.field.split(".")
            node = doc
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = self.keyring.decrypt(row.scope, secret.field, secret.ciphertext)
        return parse_server(doc)

    async def loaded(self, scope: str) -> LoadedServer | None:
        """A stored server with its secrets, id and version, for sending, testing or consent."""
        async with self.db.sessions() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope)
            return LoadedServer(row.scope, row.id, row.version, await self._with_secrets(s, row)) if row else None

    async def admin_address(self, scope: str) -> str | None:
        """The tenant's admin address (who hears that its mail server broke), if it has one."""
        if scope == GLOBAL:
            return None
        async with self.db.sessions() as s:
            return await s.scalar(select(Tenant.admin_address).where(Tenant.id == scope))

    async def loaded_by_id(self, server_id: int) -> LoadedServer | None:
        async with self.db.sessions() as s:
            row = await s.get(MailServerRow, server_id)
            return LoadedServer(row.scope, row.id, row.version, await self._with_secrets(s, row)) if row else None

    # ---- OAuth2 refresh tokens (delegated consent and rotation) -------------------------------

    async def store_refresh_token(
        self,
        server_id: int,
        version: int,
        value: str,
        *,
        consent: bool = False,
        actor: str | None = None,
        mailbox: str | None = None,
    ) -> bool:
        """Store (encrypted) the refresh token of the server's token source (SMTP) or of its Graph
        delegated grant, unless its settings changed since `version`. A rotation (the token
        endpoint replaced the refresh token) is stored quietly; a consent is a settings change: new
        version, audited (as `actor`, the admin who started it), the server mended. `mailbox`: the
        mailbox a Graph consent was given by, which becomes graph.mailbox and from_address."""
        async with self.db.write() as s:
            row = await s.get(MailServerRow, server_id, with_for_update=True)
            if row is None or row.version != version:
                return False
            path = _refresh_token_path(row.document)
            secret = await s.get(ServerSecret, (server_id, path))
            ciphertext = self.keyring.encrypt(row.scope, path, value)
            if secret is None:
                s.add(ServerSecret(server_id=server_id, field=path, ciphertext=ciphertext))
            else:
                secret.ciphertext, secret.updated_at = ciphertext, now()
            if consent:
                who = actor or self.actor
                changes: list[Any] = []
                if mailbox is not None and path == GRAPH_REFRESH_TOKEN:
                    changes = _set_sender(row, mailbox)
                row.version += 1
                row.updated_at, row.updated_by = now(), who
                row.consented_at = now()
                await _mend(s, row)
                changes.append({"field": path, "secret": "changed"})
                self._audit(s, "server.consent", _tenant_of(row.scope), row.scope, changes, actor=who)
            return True

    async def forget_refresh_token(self, scope: str) -> ServerInfo:
        """Forget the stored refresh token (the seed's "Reset"): the server can't send until
        the mailbox is connected again. A delegated Graph server forgets the mailbox it learnt
        too: graph.mailbox and from_address are cleared (the next consent sets them)."""
        async with self.db.write() as s:
            await _check_scope(s, scope)
            row = await _server_row(s, scope, lock=True)
            if row is None:
                raise NotFound([("server", f"no mail server is set for {scope}")])
            path = _refresh_token_path(row.document)
            secret = await s.get(ServerSecret, (row.id, path))
            await s.execute(delete(ConsentRequest).where(ConsentRequest.server_id == row.id))
            changes = _set_sender(row, None) if path == GRAPH_REFRESH_TOKEN else []
            if secret is not None:
                await s.delete(secret)
                changes.append({"field": path, "secret": "removed"})
            if changes:
                row.version += 1
                row.updated_at, row.updated_by = now(), self.actor
                row.consented_at = row.token_expires_at = None
                self._audit(s, "server.consent_reset", _tenant_of(scope), scope, changes)
            await s.flush()
            return _server_info(row, {x.field for x in await s.scalars(_secrets_of(row))})

    # ---- keys and audit ------------------------------------------------------------------------

    async def rotate_keys(self) -> int:
        """Re-encrypt every stored secret under the newest key (the mail servers' secrets and the
        PKCE verifiers of consents under way). Returns how many. Servers marked broken because
        their secrets could not be decrypted are mended: they decrypt here."""
        from ..db.models import WebhookRow
        from ..oauth.consent import VERIFIER_FIELD
        from ..webhooks import rotate_secrets

        async with self.db.write() as s:
            rows = (await s.execute(select(ServerSecret, MailServerRow.scope).join(MailServerRow))).all()
            for secret, scope in rows:
                secret.ciphertext = self.keyring.rotate(scope, secret.field, secret.ciphertext)
            pending = ConsentRequest.expires_at >= now()  # an expired one is never decrypted again: left as it is
            consents = (
                await s.execute(select(ConsentRequest, MailServerRow.scope).join(MailServerRow).where(pending))
            ).all()
            for consent, scope in consents:
                consent.verifier = self.keyring.rotate(scope, VERIFIER_FIELD, consent.verifier)
            count = len(rows) + len(consents)
            count += rotate_secrets(
                list(await s.scalars(select(WebhookRow))), self.keyring
            )  # webhooks' signing secrets
            self._audit(s, "keys.rotate", None, None, [{"field": "secrets", "from": None, "to": count}])
            for row in await s.scalars(_broken_by_keys()):
                await self._unbreak(s, row)
            return count

    async def mend_decryptable(self) -> list[str]:
        """Servers marked broken because their secrets could not be decrypted, whose secrets this
        process decrypts now (it was restarted with the right keys): mended, their waiting
        messages due at once. Returns their scopes."""
        async with self.db.sessions() as s:  # most often none: no write lock for nothing
            if await s.scalar(_broken_by_keys().limit(1)) is None:
                return []
        mended = []
        async with self.db.write() as s:
            for row in await s.scalars(_broken_by_keys().with_for_update()):
                try:
                    await self._with_secrets(s, row)
                except Exception:  # still undecryptable (SecretsError), or not readable at all: stays marked
                    continue
                await self._unbreak(s, row)
                mended.append(row.scope)
        return mended

    async def _unbreak(self, s: AsyncSession, row: MailServerRow) -> None:
        reason = row.broken_reason
        await _mend(s, row)
        self._audit(s, "server.mended", _tenant_of(row.scope), row.scope,
                    [{"field": "broken_reason", "from": reason, "to": None}], actor="mailgate")  # fmt: skip


async def count_secrets(db: Database) -> int:
    """The encrypted values the database holds that a key can still open: the mail servers'
    secrets and the PKCE verifiers of consents not yet expired (`Mailgate.open` refuses to make a
    new key file for a database that holds any)."""
    from ..db.models import WebhookRow

    async with db.sessions() as s:
        secrets = await s.scalar(select(func.count()).select_from(ServerSecret))
        verifiers = await s.scalar(
            select(func.count()).select_from(ConsentRequest).where(ConsentRequest.expires_at >= now())
        )
        webhooks = await s.scalar(select(func.count()).select_from(WebhookRow))  # their signing secrets
    return int(secrets or 0) + int(verifiers or 0) + int(webhooks or 0)


async def read_audit_log(db: Database, tenant_id: str | None = None, *, limit: int = 100) -> list[AuditRecord]:
    """The newest entries first, of every scope or of one tenant."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(AuditEntry.tenant_id == tenant_id)
        # A tenant removed and added again under the same id is another tenant: its log starts
        # when it was added (its predecessor's history stays in the whole log).
        added = select(func.coalesce(func.max(AuditEntry.id), 0)).where(
            AuditEntry.tenant_id == tenant_id, AuditEntry.action == "tenant.add"
        )
        query = query.where(AuditEntry.id >= added.scalar_subquery())
    async with db.sessions() as s:
        return [AuditRecord(e.at, e.actor, e.action, e.tenant_id, e.scope, e.changes) for e in await s.scalars(query)]


# ---- helpers ----------------------------------------------------------------------------------


def _read_secrets(
    document: Mapping[str, Any] | MailServer, secrets: Mapping[str, str] | None
) -> tuple[MailServer, tuple[str, ...], dict[str, str], set[str]]:
    """The server a document describes, its secret fields, the secrets given (in the document or
    apart, by path), and those it clears (null or {"set": false})."""
    server = document if isinstance(document, MailServer) else parse_server(dict(document))
    fields = secret_fields(server)
    given = {path: value for path in fields if (value := secret_value(server, path)) is not None}
    for path, value in (secrets or {}).items():
        if path not in fields:
            raise SettingsError([(path, _not_a_secret_here(server, path))])
        given[path] = value
    cleared = {path for path in fields if path not in given and secret_cleared(server, path)}
    return server, fields, given, cleared


def _kept_secrets(
    server: MailServer,
    fields: tuple[str, ...],
    given: Mapping[str, str],
    cleared: set[str],
    stored: set[str],
    old: MailServer | None,
    unloadable: str | None = None,
) -> set[str]:
    """The stored secrets that stay: those neither given nor cleared — refused (SettingsError) when
    a destination field changed, since a stored secret is never sent where it was not saved for,
    or when the stored document does not load (`unloadable`: its destination is not known);
    and every required secret must be given or kept."""
    kept = {path for path in fields if path not in given and path not in cleared and path in stored}
    problems: list[tuple[str, str]] = []
    if kept and unloadable is not None:
        why = unloadable.removesuffix(": save them again")
        problems += [(path, f"give it again: {why}, and a stored secret is never sent to a destination it was "
                            "not saved for") for path in sorted(kept)]  # fmt: skip
    elif kept and old is not None:
        before = destination(old)
        moved = [k for k, v in destination(server).items() if before.get(k) != v]
        if moved:
            problems += [
                (path, f"give it again: {', '.join(moved)} changed, and a stored secret is never "
                       "sent to a destination it was not saved for")
                for path in sorted(kept)
            ]  # fmt: skip
    missing = [p for p in required_secrets(server) if p not in given and p not in kept]
    problems += [(p, "is required") for p in missing]
    if problems:
        raise SettingsError(problems)
    return kept


GRAPH_REFRESH_TOKEN = "graph.refresh_token"
REFRESH_TOKENS = ("auth.token.refresh_token", GRAPH_REFRESH_TOKEN)


def _refresh_token_path(document: Mapping[str, Any]) -> str:
    """Where a stored server keeps the refresh token of its delegated grant."""
    return GRAPH_REFRESH_TOKEN if document.get("kind") == "graph" else "auth.token.refresh_token"


def _set_sender(row: MailServerRow, mailbox: str | None) -> list[dict[str, Any]]:
    """Make `mailbox` (None: nobody) the delegated Graph server's mailbox and sender address;
    the changes, for the audit log."""
    doc = dict(row.document)
    graph = dict(doc.get("graph") or {})
    before = {"graph.mailbox": graph.get("mailbox"), "from_address": doc.get("from_address")}
    graph["mailbox"] = mailbox
    doc["graph"], doc["from_address"] = graph, mailbox
    parse_server({**doc, "enabled": row.enabled})  # still a valid document (it is: both the same)
    row.document = doc  # a new object: the JSON column sees the change
    return [{"field": k, "from": v, "to": mailbox} for k, v in before.items() if v != mailbox]


def _consented(
    server: MailServer, old: MailServer | None, given: Mapping[str, str], cleared: set[str], stored: set[str]
) -> tuple[MailServer, str | None]:
    """A delegated Graph server's document against the consent its stored grant came from: the
    mailbox and sender address the consent set are carried over when the document leaves them
    out; and why the grant no longer fits (None: it does), when a change makes it wrong — it is
    then dropped (not refused: only a new consent can bring one), and the mailbox connected again."""
    g, before = server.graph, old.graph if old is not None else None
    path = GRAPH_REFRESH_TOKEN
    if (
        g is None or g.auth != "delegated" or before is None or before.auth != "delegated" or old is None
        or path not in stored or path in given or path in cleared
    ):  # fmt: skip
        if g is not None and g.auth == "delegated" and path in given and g.mailbox is None:
            raise SettingsError([("graph.mailbox", "a refresh token given directly needs the mailbox it belongs to "
                                                   "(or connect the mailbox: the consent learns it)")])  # fmt: skip
        return server, None
    if g.mailbox is None or server.from_address is None:  # left out: what the consent learnt
        g = g.model_copy(update={"mailbox": g.mailbox or before.mailbox})
        server = server.model_copy(update={"graph": g, "from_address": server.from_address or old.from_address})
    moved = [k for k, v in destination(server).items() if destination(old).get(k) != v]
    if moved:
        return server, f"{', '.join(moved)} changed: connect the mailbox again"
    if (g.mailbox or "").lower() != (before.mailbox or "").lower():
        return server, "graph.mailbox changed: the grant is the consenting mailbox's; connect the mailbox again"
    if (server.from_address or "").lower() != (old.from_address or "").lower():
        return server, "from_address changed: the sender is the consenting mailbox; connect the mailbox again"
    if g.large_attachments and not before.large_attachments:
        return server, ("graph.large_attachments was turned on: the consent must grant Mail.ReadWrite too; "
                        "connect the mailbox again")  # fmt: skip
    return server, None


def _check_tenant_id(tenant_id: str) -> None:
    if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
        raise SettingsError(
            [("tenant", f"{tenant_id!r}: a tenant id is 1-64 letters, digits, '.', '_' or '-', starting "
                        "with a letter or digit")]
        )  # fmt: skip
    if tenant_id.lower() == GLOBAL:
        raise SettingsError([("tenant", "'global' names the global mail server; choose another tenant id")])


def _tenant_fields(
    *, name: str | None, support_address: str | None, admin_address: str | None = None
) -> dict[str, Any]:
    from ..message import Address, forbidden_character

    problems = []
    if name is not None and (not name.strip() or len(name) > 200 or "\r" in name or "\n" in name):
        problems.append(("name", "is 1-200 characters on one line"))
    elif name is not None and (problem := forbidden_character(name)) is not None:
        problems.append(("name", problem))
    addresses = {"support_address": support_address, "admin_address": admin_address}
    for field, value in list(addresses.items()):
        if value is not None:
            try:
                addresses[field] = Address(value).address
            except ValueError as e:
                problems.append((field, f"{value!r} is not a valid address: {e}"))
    if problems:
        raise SettingsError(problems)
    return {"name": name.strip() if name is not None else None, **addresses}


async def _tenant(s: AsyncSession, tenant_id: str, *, lock: bool = False) -> Tenant:
    # No tenant has an id that is not one (NUL or a lone surrogate would not even reach the
    # database: the driver can't encode it), so such an id is simply not found.
    row = None
    if isinstance(tenant_id, str) and TENANT_ID.fullmatch(tenant_id):
        query = select(Tenant).where(Tenant.id == tenant_id)
        row = await s.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound([("tenant", f"there is no tenant {tenant_id!r}")])
    return row


async def _check_scope(s: AsyncSession, scope: str) -> None:
    if scope != GLOBAL:
        await _tenant(s, scope)


async def _server_row(s: AsyncSession, scope: str, *, lock: bool = False) -> MailServerRow | None:
    query = select(MailServerRow).where(MailServerRow.scope == scope)
    return await s.scalar(query.with_for_update() if lock else query)


async def _mend(s: AsyncSession, row: MailServerRow) -> None:
    """After a save or an enable: the server is not broken any more, as far as we know, and the
    messages that wait for it are due now."""
    was_broken = row.broken_reason is not None
    row.broken_reason, row.broken_at = None, None
    await s.execute(
        update(MessageRow)
        .where(MessageRow.status == "deferred", MessageRow.last_server_id == row.id)
        .values(due_at=now())
        .execution_options(synchronize_session=False)
    )
    if was_broken:  # after the messages' update: the event writers' lock is taken last (events.py)
        await record_server_event(s, SERVER_RECOVERED, row.scope, str(row.document.get("kind", "smtp")), None)


def _broken_by_keys() -> Select[MailServerRow]:
    """Servers marked broken because their secrets could not be decrypted (a SecretsError's text
    is the reason): a problem of the keys, not of the settings, mended when they decrypt again."""
    return select(MailServerRow).where(MailServerRow.broken_reason.startswith(CANNOT_DECRYPT, autoescape=True))


DESTINATION_CHECK_TIMEOUT = 5.0  # seconds to resolve a name when saving (unresolvable: checked when used)


def _destination_hosts(server: MailServer) -> dict[str, str]:
    """The hosts a server makes mailgate connect to, by the field that names each. (An
    authorize_url is where the admin's browser goes, not mailgate.)"""
    from ..destinations import host_of

    hosts = {"smtp.host": server.smtp.host} if server.smtp is not None else {}
    urls: dict[str, str | None] = {}
    if isinstance(server.auth, OAuth2AuthSettings):
        token = server.auth.token
        urls = {"auth.token.token_url": token.token_url, "auth.token.authority": token.authority}
    if server.graph is not None:
        urls = {"graph.authority": server.graph.authority, "graph.endpoint": server.graph.endpoint}
    if server.ews is not None:
        urls["ews.url"] = server.ews.url
    hosts |= {field: host for field, url in urls.items() if (host := host_of(url))}
    return hosts


async def _refused(policy: DestinationPolicy, host: str) -> str | None:
    """Why the policy refuses `host` (resolved), or None — also when it does not resolve now."""
    from ..destinations import DestinationRefused

    try:
        async with asyncio.timeout(DESTINATION_CHECK_TIMEOUT):
            await policy.resolve(host, 0)
    except DestinationRefused as e:
        return e.message
    except (OSError, TimeoutError):
        return None
    return None


def _tenant_of(scope: str) -> str | None:
    return None if scope == GLOBAL else scope


def _stored_server(row: MailServerRow) -> MailServer:
    return parse_server({**row.document, "enabled": row.enabled})


def _old_server(row: MailServerRow) -> tuple[MailServer | None, str | None]:
    """(the stored server, None), or (None, why it does not load) for a document stored before a
    check this version makes: a save replaces it (its stored secrets must be given again)."""
    try:
        return _stored_server(row), None
    except SettingsError as e:
        return None, _unloadable(row.scope, e)


def _unloadable(scope: str, e: SettingsError) -> str:
    whose = "the global mail server" if scope == GLOBAL else f"{scope}'s own mail server"
    return f"the stored settings of {whose} do not load in this version of mailgate ({e}): save them again"


def _server_info(row: MailServerRow, secrets_set: set[str]) -> ServerInfo:
    try:
        document = {"enabled": row.enabled, **public_document(row.document, secrets_set, _stored_server(row))}
    except SettingsError:  # shown as stored, to be corrected: each stored secret as {"set": true}
        document = {"enabled": row.enabled, **public_document(row.document, secrets_set, secrets_set)}
    return ServerInfo(row.scope, row.version, row.enabled, document, row.created_at, row.updated_at, row.updated_by)


def _health(row: MailServerRow) -> ServerHealth:
    """The row's health, with what is known of coming expiries from the provider's rules (the token
    endpoints say nothing of a client secret's or a grant's end: reference §4, §6, §8)."""
    doc = row.document
    auth, graph = doc.get("auth") or {}, doc.get("graph") or {}
    token = auth.get("token") or {} if auth.get("method") == "oauth2" else {}
    notes: list[str] = []
    grant, provider = token.get("grant"), token.get("provider")
    if grant == "client_credentials" or graph:
        notes.append("The token endpoint does not tell when the client secret expires: Entra ID shows it under App "
                     "registrations → the app → Certificates & secrets (Expires). Once expired, sends fail with "
                     "AADSTS7000222 and the server is marked broken: make a new secret before then.")  # fmt: skip
    if grant in ("delegated", "refresh_token") and provider == "google":
        until = f" (here: {(row.consented_at + timedelta(days=7)).isoformat(timespec='minutes')})" \
            if row.consented_at else ""  # fmt: skip
        notes.append(f"A Google refresh token of an app in Testing status ends about 7 days after consent{until}; "
                     "publish the app to keep it.")  # fmt: skip
    elif grant == "delegated" or graph.get("auth") == "delegated":
        notes.append("A Microsoft refresh token lasts 90 days and is replaced at each use (mailgate keeps the "
                     "newest); unused for 90 days, revoked, or after a password change it ends: "
                     "connect again.")  # fmt: skip
    return ServerHealth(
        row.scope, row.version, row.enabled, str(doc.get("kind", "smtp")), row.broken_reason, row.broken_at,
        row.last_success_at, row.last_failure_at, row.last_failure, row.token_expires_at, row.consented_at, notes,
    )  # fmt: skip


def _tenant_info(row: Tenant) -> TenantInfo:
    return TenantInfo(
        row.id, row.name, row.may_use_own_server, row.support_address, row.may_set_support_address,
        row.admin_address, row.created_at, row.updated_at,
    )  # fmt: skip


def _audited(info: TenantInfo) -> dict[str, Any]:
    return {k: v for k, v in info.to_dict().items() if k not in ("id", "created_at", "updated_at")}


def _audit(
    s: AsyncSession, actor: str, action: str, tenant_id: str | None, scope: str | None, changes: list[Any]
) -> None:
    s.add(AuditEntry(actor=actor, action=action, tenant_id=tenant_id, scope=scope, changes=changes))


def _secrets_of(row: MailServerRow) -> Select[ServerSecret]:
    return select(ServerSecret).where(ServerSecret.server_id == row.id)


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and set(value) != {"set"}:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Plain fields that changed, with both values. Secrets are listed by the caller, by name only."""
    a, b = _flatten(old), _flatten(new)
    return [
        {"field": k, "from": a.get(k), "to": b.get(k)}
        for k in sorted(set(a) | set(b))
        if k != "enabled" and k not in SECRET_FIELDS and a.get(k) != b.get(k)
    ]


def _not_a_secret_here(server: MailServer, path: str) -> str:
    fields = secret_fields(server)
    if not fields:
        return f"this mail server ({server.kind}, auth {getattr(server.auth, 'method', 'none')}) takes no secret"
    return f"this mail server takes no such secret; its secret fields are {', '.join(fields)}"
