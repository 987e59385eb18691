"""`Mailgate`: the one service layer under the library, the CLI, and (later) the API and UI.

async with Mailgate.open() as mg:                      # or: mg = await Mailgate.open(url)
    await mg.tenants.add("acme", name="Acme Corp", may_use_own_server=True)
    await mg.servers.set("global", {...})              # the mail server document
    resolution = await mg.resolve("acme")
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import os
import re
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .access import ApiTokens
from .accounts import AdminUsers
from .config import Config
from .db.engine import Database, connect, database_url, ensure_schema
from .errors import MessageError, NotFound, SendingDisabled, SettingsError
from .events import Events
from .message import Address, AddressesInput, AddressInput, HeadersInput, Message
from .notifications.store import Templates
from .oauth.cache import TokenCache
from .oauth.consent import ConsentResult, Consents
from .outbox.group import GroupCommit
from .outbox.store import Entry, Outbox, default_domain
from .outbox.worker import Worker, WorkerStats
from .settings.secrets import ENV_KEYS, Keyring, key_file_for, load_keyring
from .settings.store import AuditRecord, Resolution, ServerInfo, Servers, Tenants, count_secrets, read_audit_log
from .webhooks import Webhooks, WebhookSender

if TYPE_CHECKING:
    from .diagnostics.testmail import OnStep, StepReport
    from .settings.system import SystemSettings
    from .support import SupportRequest

CALLBACK_PATH = "/v1/oauth/callback"
# Not in an idempotency key: control characters, and lone surrogates (not text: no database stores them).
_NOT_IN_KEY = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
SUBMIT_RESOLVE_TTL = 1.0


@dataclass(frozen=True)
class Submission:
    id: int
    status: str  # queued, or held (sending disabled, hold_when_disabled on); a replay: its status now
    replayed: bool  # the idempotency key had been used: this is the first message, nothing new stored


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{os.uname().nodename}" if hasattr(os, "uname") else user


class Mailgate:
    """The service. `tenants` and `servers` are the settings (settings/store.py); `actor` names
    who makes the changes in the audit log."""

    def __init__(self, db: Database, keyring: Keyring, actor: str, config: Config) -> None:
        self.db = db
        self.actor = actor
        self.config = config
        self._keyring = keyring
        self._resolved: dict[str, tuple[float, Resolution]] = {}
        self.api_tokens = ApiTokens(db, actor)
        self.tenants = Tenants(db, keyring, actor, self._settings_changed)
        self.servers = Servers(db, keyring, actor, self._settings_changed, destinations=config.destinations)
        self.queue = Outbox(db, config)
        self.users = AdminUsers(db, actor)
        self._group = GroupCommit(self.queue.store, self._store_one)
        # One token cache for every tenant's servers (and one HTTP client, made when first used).
        self.tokens = TokenCache()
        self._consents = Consents(db, keyring, self.servers, self.tokens, actor, config.destinations)
        self.templates = Templates(db, actor)
        self.events = Events(db)
        self.webhooks = Webhooks(db, keyring, config.destinations.tenant, actor)

    def acting_as(self, actor: str) -> Mailgate:
        """The same service (database, caches, connections) with changes audited as `actor`: the
        API makes one per request, named after its token."""
        view = copy.copy(self)
        view.actor = actor
        view.tenants = Tenants(self.db, self._keyring, actor, self._settings_changed)
        view.servers = Servers(self.db, self._keyring, actor, self._settings_changed,
                               destinations=self.config.destinations)  # fmt: skip
        view._consents = Consents(self.db, self._keyring, view.servers, self.tokens, actor, self.config.destinations)
        view.templates = self.templates.acting_as(actor)
        view.webhooks = self.webhooks.acting_as(actor)
        return view

    def _settings_changed(self) -> None:
        # What this process cached of the settings is stale: where tenants send, and which API
        # tokens are valid (a removed tenant's tokens stop at once, not within CACHE_TTL).
        self._resolved.clear()
        self.api_tokens.forget_cached()

    async def submit(self, tenant: str, message: Message, idempotency_key: str | None = None) -> int:
        """Store `message` in the outbox for `tenant` (one transaction) and return its id.

        With an idempotency key already used by this tenant, the first message's id comes back
        and nothing new is stored. When sending is disabled for the tenant, SendingDisabled says
        why — or, with `hold_when_disabled`, the message is kept as `held` until it may be sent.
        """
        return (await self.accept(tenant, message, idempotency_key)).id

    async def accept(self, tenant: str, message: Message, idempotency_key: str | None = None) -> Submission:
        """`submit`, saying also the message's status and whether the key had been used before."""
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > 255 or _NOT_IN_KEY.search(idempotency_key):
                raise MessageError([("idempotency_key", "is 1-255 characters, without control characters")])
            existing = await self.queue.find_by_key(tenant, idempotency_key)
            if existing is not None:
                return Submission(existing, (await self.queue.get(existing)).summary.status, replayed=True)
        resolution = await self._resolve_for_submit(tenant)
        [ready], status = self._prepare(resolution, [message])
        pk = await self._group.submit(Entry(tenant, ready, idempotency_key, status))
        return Submission(pk, status, replayed=False)

    async def submit_template(
        self,
        tenant: str,
        template: str,
        data: Mapping[str, Any] | None = None,
        *,
        to: AddressesInput,
        locale: str | None = None,
        **fields: Any,
    ) -> int:
        """Render the notification template `template` (notifications/: invitation, password_reset,
        …) in `locale` (fallback: its language, then English) with `data`, as `tenant` has it, and
        submit it to `to`; returns the message's id. A missing, unknown or bad variable is a
        TemplateError naming each as data.<name>, and nothing is stored. `fields`: the rest of a
        Message (cc, bcc, reply_to, from_, headers, attachments) and idempotency_key."""
        return (await self.accept_template(tenant, template, data, to=to, locale=locale, **fields)).id

    async def accept_template(
        self,
        tenant: str,
        template: str,
        data: Mapping[str, Any] | None = None,
        *,
        to: AddressesInput,
        locale: str | None = None,
        idempotency_key: str | None = None,
        from_: AddressInput | None = None,
        cc: AddressesInput = None,
        bcc: AddressesInput = None,
        reply_to: AddressesInput = None,
        headers: HeadersInput = None,
        attachments: Sequence[Any] = (),
        message_id: str | None = None,
    ) -> Submission:
        """`submit_template`, saying also the status and whether the idempotency key was used."""
        rendered = await self.templates.render(template, locale, tenant, data)
        message = Message(
            from_=from_, to=to, cc=cc, bcc=bcc, reply_to=reply_to, subject=rendered.subject, text=rendered.text,
            html=rendered.html, headers=headers, attachments=attachments, message_id=message_id,
        )  # fmt: skip
        return await self.accept(tenant, message, idempotency_key)

    async def accept_many(
        self, tenant: str, items: Sequence[tuple[Message, str | None]]
    ) -> list[Submission | MessageError]:
        """`accept` for several messages of one tenant (POST /v1/messages/batch): each gets its own
        answer in order, a Submission or the MessageError of its idempotency key, and the new ones
        go through the group commit together (one transaction while nothing conflicts). A key
        given twice stores one message; the later item answers it as replayed. SendingDisabled
        refuses them all."""
        results: list[Submission | MessageError | None] = [None] * len(items)
        first_of_key: dict[str, int] = {}
        new: list[int] = []
        for i, (_, key) in enumerate(items):
            if key is not None:
                if not key or len(key) > 255 or _NOT_IN_KEY.search(key):
                    results[i] = MessageError([("idempotency_key", "is 1-255 characters, without control characters")])
                    continue
                if key in first_of_key:
                    continue  # answered below, from the first item with it
                first_of_key[key] = i
                existing = await self.queue.find_by_key(tenant, key)
                if existing is not None:
                    results[i] = Submission(existing, (await self.queue.get(existing)).summary.status, replayed=True)
                    continue
            new.append(i)
        resolution = await self._resolve_for_submit(tenant)
        ready, status = self._prepare(resolution, [items[i][0] for i in new])
        ids = await asyncio.gather(*(self._group.submit(Entry(tenant, m, items[i][1], status))
                                     for i, m in zip(new, ready, strict=True)))  # fmt: skip
        for i, pk in zip(new, ids, strict=True):
            results[i] = Submission(pk, status, replayed=False)
        for i, (_, key) in enumerate(items):
            if results[i] is None and key is not None:
                first = results[first_of_key[key]]
                assert isinstance(first, Submission)
                results[i] = Submission(first.id, first.status, replayed=True)
        return [r for r in results if r is not None]

    async def _resolve_for_submit(self, tenant: str) -> Resolution:
        # Busy APIs submit for the same tenants over and over: whether and where they may send is
        # looked up once a second. A change made through this service clears it at once; one made
        # by another process reaches these submits within SUBMIT_RESOLVE_TTL.
        at = time.monotonic()
        cached = self._resolved.get(tenant)
        if cached is not None and at - cached[0] < SUBMIT_RESOLVE_TTL:
            return cached[1]
        resolution = await self.servers.resolve(tenant, secrets=False)
        if len(self._resolved) > 10_000:
            self._resolved.clear()
        self._resolved[tenant] = (at, resolution)
        return resolution

    async def _store_one(self, entry: Entry) -> int:
        return (await self.queue.submit(entry.tenant_id, [entry.message], [entry.key], entry.status))[0]

    async def submit_many(self, tenant: str, messages: Sequence[Message]) -> list[int]:
        """Store several messages for `tenant` in one transaction; returns their ids in order."""
        return await self._submit(tenant, messages, [None] * len(messages))

    async def _submit(self, tenant: str, messages: Sequence[Message], keys: Sequence[str | None]) -> list[int]:
        return await self._store(tenant, await self.servers.resolve(tenant, secrets=False), messages, keys)

    async def _store(
        self, tenant: str, resolution: Resolution, messages: Sequence[Message], keys: Sequence[str | None]
    ) -> list[int]:
        ready, status = self._prepare(resolution, messages)
        return await self.queue.submit(tenant, ready, keys, status)

    def _prepare(self, resolution: Resolution, messages: Sequence[Message]) -> tuple[list[Message], str]:
        """The messages with their Message-IDs, and the status to store them in; or SendingDisabled."""
        # Held, not refused, when the server's stored settings don't load in this version
        # (broken_reason without a server): nothing the sender did, and a save releases them.
        if resolution.server is None and not self.config.hold_when_disabled and resolution.broken_reason is None:
            raise SendingDisabled(resolution.reason)
        if resolution.server is not None:  # the server's sender policy: a From it won't send is refused now
            server = resolution.server
            policy = server.effective_from_policy(is_global=resolution.source == "global")
            refused = [(i, why) for i, m in enumerate(messages) if (why := server.from_refusal(m, policy=policy))]
            if refused:
                raise MessageError([("from" if len(messages) == 1 else f"[{i}].from", why) for i, why in refused])
        # A delegated graph server not yet connected has no sender: its messages wait, as an SMTP
        # server's whose mailbox is not connected do.
        sender = resolution.server.known_sender if resolution.server else None
        domain = Address(sender).ascii_domain if sender else default_domain()
        ready = [m if m.message_id is not None else m.with_defaults(domain=domain) for m in messages]
        if resolution.server is not None and sender is not None:
            # A From the server will send as its own takes mailgate's Message-ID into its domain
            # now, so the one stored is the one sent (the worker's fill_in does the same again).
            server = resolution.server
            ready = [m.in_domain(domain) if server.rewrites_from(m, policy=policy) else m for m in ready]
        return ready, "queued" if resolution.server is not None else "held"

    async def run_worker(self, stop: asyncio.Event | None = None, *, until_idle: bool = False) -> WorkerStats:
        """Deliver queued messages until `stop` is set (or, with `until_idle`, nothing is due)."""
        return await self.new_worker().run(stop, until_idle=until_idle)

    def new_worker(self) -> Worker:
        """A worker for `run()`, for a caller that wants to watch it (`mailgate serve`)."""
        hooks = WebhookSender(self.db, self._keyring, self.config.destinations.tenant)
        return Worker(self.queue, self.servers, self.config, tokens=self.tokens, webhooks=hooks)

    async def ping(self) -> None:
        """Raises if the database can't be reached (for /readyz)."""
        from sqlalchemy import text

        async with self.db.sessions() as s:
            await s.execute(text("SELECT 1"))

    # ---- the test e-mail ------------------------------------------------------------------------

    async def test_server(
        self,
        scope: str,
        to: str,
        settings: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
        secrets: Mapping[str, str] | None = None,
        on_step: OnStep | None = None,
    ) -> StepReport:
        """Send a test e-mail through `scope`'s mail server ("global" or a tenant), as named steps
        that stop at the first failure, each explained (diagnostics/testmail.py). `settings`: an
        unsaved document to try instead of the saved one; its stored secrets are reused only when
        no destination field changed. `dry_run`: stop before DATA (RSET), nothing is delivered.
        `on_step` is told as each step starts and ends."""
        from .diagnostics.testmail import run_test
        from .message import Address

        try:
            recipient = Address(to).address
        except ValueError as e:
            raise MessageError([("to", f"{to!r} is not a valid address: {e}")]) from None
        if settings is None and not secrets:
            loaded = await self.servers.loaded(scope)
            if loaded is None:
                raise NotFound([("server", f"no mail server is set for {scope}")])
            server, source = loaded.server, "saved"
        else:
            if settings is None:
                info = await self.servers.get(scope)
                if info is None:
                    raise NotFound([("server", f"no mail server is set for {scope}")])
                settings = info.document
            server, source = await self.servers.unsaved(scope, settings, secrets=secrets), "unsaved"
        return await run_test(scope, server, recipient, tokens=self.tokens, dry_run=dry_run, source=source,
                              on_step=on_step, destinations=self.config.destinations.for_scope(scope))  # fmt: skip

    # ---- delegated OAuth consent ---------------------------------------------------------------

    async def begin_consent(self, scope: str, *, redirect_uri: str | None = None) -> str:
        """Start the consent of `scope`'s mail server (delegated token source): returns the URL to
        send the admin to. The provider comes back to `redirect_uri` (default: the public URL's
        /v1/oauth/callback) with a state and a code for `complete_consent`."""
        return await self._consents.begin(scope, redirect_uri or self.config.public_url.rstrip("/") + CALLBACK_PATH)

    async def complete_consent(self, state: str, code: str) -> ConsentResult:
        """Exchange the code (once) and store the refresh token, encrypted."""
        return await self._consents.complete(state, code)

    async def reset_consent(self, scope: str) -> ServerInfo:
        """Forget the stored tokens of `scope`'s mail server (the seed's "Reset")."""
        return await self._consents.reset(scope)

    # ---- support requests and the system settings (support.py, settings/system.py) ---------------

    @property
    def system(self) -> SystemSettings:
        """The operator's settings kept in the database (the global support address)."""
        from .settings.system import SystemSettings

        return SystemSettings(self.db, self.actor, self._settings_changed)

    async def support_request(
        self, tenant: str, *, subject: str, text: str, reply_to: str | None = None, attach_system_info: bool = True
    ) -> SupportRequest:
        """Write to support for `tenant`: to its own support address when it has one and may set
        it, else the global one (NoSupportAddress: neither). Stored in the tenant's outbox like any
        message; `attach_system_info` adds mailgate-system-info.json (never a secret)."""
        from .support import send_support_request

        return await send_support_request(self, tenant, subject=subject, text=text, reply_to=reply_to,
                                          attach_system_info=attach_system_info)  # fmt: skip

    @classmethod
    def open(
        cls,
        database_url: str | None = None,
        *,
        secret_keys: str | None = None,
        actor: str | None = None,
        config: Config | None = None,
    ) -> _Opening:
        """Open (and create or upgrade, if needed) the database.

        `database_url`: else $MAILGATE_DATABASE_URL, else SQLite `mailgate.db` in the working
        directory. `secret_keys`: else $MAILGATE_SECRET_KEYS, else (SQLite) a key file beside the
        database. `actor` names who makes the changes in the audit log (default: user@host).
        `config`: retries, leases, retention… (default: from MAILGATE_… variables, see config.py).
        Use as `async with Mailgate.open() as mg:` or `mg = await Mailgate.open()`.
        """
        return _Opening(database_url, secret_keys, actor, config)

    async def resolve(self, tenant: str) -> Resolution:
        """The mail server `tenant` sends through, and why (DESIGN.md's resolution rules)."""
        return await self.servers.resolve(tenant)

    def derived_key(self, purpose: str) -> bytes:
        """A key for `purpose` derived from the secret keys (the admin UI signs its cookies with it)."""
        return self._keyring.derive(purpose)

    async def rotate_keys(self) -> int:
        """Re-encrypt every stored secret under the newest key; returns how many."""
        return await self.servers.rotate_keys()

    async def audit_log(self, tenant: str | None = None, *, limit: int = 100) -> list[AuditRecord]:
        return await read_audit_log(self.db, tenant, limit=limit)

    async def aclose(self) -> None:
        await self.tokens.aclose()
        await self.db.dispose()

    async def __aenter__(self) -> Mailgate:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _refuse_new_key_file_for_secrets(db: Database, key_file: Path) -> None:
    """A new key could decrypt none of the secrets a database holds already: for such a database a
    missing key file is an error, never silently replaced (every secret would be lost for good)."""
    held = await count_secrets(db)
    if held:
        raise SettingsError([(str(key_file), (
            f"the key file is missing, and the database holds {held} encrypted secret(s) that only its keys "
            f"decrypt. Restore {key_file} from a backup (mode 0600), or set {ENV_KEYS} to the keys it held; "
            "mailgate makes a new key file only for a database without secrets"
        ))])  # fmt: skip


class _Opening:
    """What `Mailgate.open()` returns: awaitable, and an async context manager."""

    def __init__(self, url: str | None, secret_keys: str | None, actor: str | None, config: Config | None) -> None:
        self._args = (url, secret_keys, actor, config)
        self._mg: Mailgate | None = None

    async def _open(self) -> Mailgate:
        url, secret_keys, actor, config = self._args
        config = config or Config.load()
        db = connect(database_url(url or config.database_url or None))
        try:
            path = db.sqlite_path
            keys = secret_keys or os.environ.get(ENV_KEYS)
            key_file = key_file_for(path) if path is not None and not keys else None
            if db.is_sqlite and path is None and not keys:
                keyring = Keyring([Keyring.generate()], "a key for this in-memory database only")
            elif key_file is not None and not key_file.exists():
                keyring = None  # made below, once the database is known to hold no secret
            else:
                keyring = load_keyring(keys, key_file)
            await ensure_schema(db)
            if keyring is None:
                assert key_file is not None
                await _refuse_new_key_file_for_secrets(db, key_file)
                keyring = load_keyring(None, key_file)
        except BaseException:
            await db.dispose()
            raise
        return Mailgate(db, keyring, actor or default_actor(), config)

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
