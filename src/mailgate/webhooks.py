"""Tenants' webhooks: their events (events.py) POSTed to a URL the tenant gives, signed as Standard
Webhooks say (https://www.standardwebhooks.com, spec 1.0.0), retried with backoff until a 2xx.

    webhook-id: evt_<event id>            the same on every retry: the receiver's idempotency key
    webhook-timestamp: <unix seconds>     of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

keyed with the base64-decoded part of the `whsec_…` secret (32 random bytes). mailgate makes the
secret; it is shown once, when the webhook is made or its secret rotated, and kept encrypted
(Fernet, as mail servers' secrets). After a rotation the previous secret also signs for
ROTATION_OVERLAP (the header then holds two signatures, space-separated, as the spec allows), so a
receiver can change its secret without losing a delivery.

The URL is the tenant's word, so it goes through the tenant destination policy (destinations.py)
at save and at every delivery (the guarded HTTP client resolves, checks and connects only to a
checked address); https only, plain http only to a loopback address the policy allows; redirects
are not followed. Each request has REQUEST_TIMEOUT; one webhook's deliveries go one after another
(at most PER_WEBHOOK claimed at a time), different webhooks' side by side (at most CONCURRENCY),
so a slow receiver delays only its own. A delivery is at least once: a sender that dies mid-send
leaves a lease that runs out, and the delivery is made again. It is given up after MAX_AGE.

Receivers check a delivery with `verify(secret, headers, body)`.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import secrets as random_secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .db.engine import Database
from .db.models import EventRow, Tenant, WebhookDelivery, WebhookRow, now
from .errors import InvalidInput, NotFound, traceback_of
from .events import EVENT_TYPES, Event, Events

if TYPE_CHECKING:
    from .destinations import DestinationPolicy
    from .settings.secrets import Keyring

log = logging.getLogger("mailgate.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec: at least 24
ROTATION_OVERLAP = timedelta(hours=24)
TOLERANCE = 300  # seconds a receiver accepts a timestamp away from its clock (verify)
MAX_WEBHOOKS = 10  # per tenant
MAX_URL = 2000
REQUEST_TIMEOUT = 15.0  # seconds for one delivery, connect to last byte (the spec: 15-30 s)
MAX_AGE = timedelta(days=3)  # a delivery is given up this long after its event (the spec's schedule: ~3 days)
RETRY_BASE = 5.0  # seconds before the first retry; doubles each time, with jitter, at most:
RETRY_MAX = 6 * 3600.0
LEASE = 120.0  # seconds a claimed delivery is a sender's, then due again (at least once): > PER_WEBHOOK × timeout
CONCURRENCY = 20  # webhooks delivered to at once by one process
PER_WEBHOOK = 4  # deliveries of one webhook claimed at a time (sent one after another)
# Webhooks of one tenant delivered to at once by one process: without it, two tenants with
# MAX_WEBHOOKS slow receivers each held all CONCURRENCY places, every other tenant's deliveries
# waiting behind their timeouts.
PER_TENANT = 4
CLAIM = 100
POLL = 1.0
PURGE_EVERY = 600.0
EXCERPT = 300  # characters of a response body kept
_READ = 2048  # bytes of a response body read
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_DELIVERIES = cast(Table, WebhookDelivery.__table__)


# ---- signing and verifying --------------------------------------------------------------------


class VerificationError(Exception):
    """The delivery is not one mailgate signed with this secret (or it is too old)."""


def _key(secret: str) -> bytes:
    value = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except ValueError:
        raise VerificationError("the secret is not whsec_ and base64") from None


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<signature>` of a delivery, as Standard Webhooks define it."""
    mac = hmac.new(_key(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance: int = TOLERANCE) -> dict[str, Any]:
    """The event of a delivery (its parsed JSON body) when `headers` carry a signature of `body`
    made with `secret` within `tolerance` seconds of now; else VerificationError. `body` is the
    raw request body, exactly as received."""
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id, stamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not webhook_id or not stamp or not signatures:
        raise VerificationError("the webhook-id, webhook-timestamp and webhook-signature headers are required")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise VerificationError("webhook-timestamp is not a number of seconds") from None
    if abs(time.time() - timestamp) > tolerance:
        raise VerificationError("webhook-timestamp is too far from now (a replay, or a clock off)")
    expected = sign(secret, webhook_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures.split(" ")):
        raise VerificationError("no signature matches")
    event: dict[str, Any] = json.loads(body)
    return event


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(SECRET_BYTES)).decode()


# ---- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookInfo:
    id: int
    tenant: str
    url: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    created_by: str
    previous_secret_until: datetime | None
    last: dict[str, Any] | None  # its latest delivery's state and response
    pending: int

    def to_dict(self) -> dict[str, Any]:
        """Never the secret: it is shown once, in the reply that made it."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "url": self.url,
            "event_types": self.event_types,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "secret": {"set": True},
            "previous_secret_until": self.previous_secret_until.isoformat() if self.previous_secret_until else None,
            "last_delivery": self.last,
            "pending_deliveries": self.pending,
        }


def _field(webhook_id: int) -> str:
    """The secret's place, bound into its ciphertext: a ciphertext copied to another webhook's row
    does not decrypt there."""
    return f"webhook.{webhook_id}.secret"


def check_url(value: str, policy: DestinationPolicy) -> str:
    """The URL when its form is allowed: https; http only to a loopback address, and only when the
    policy lets tenants reach loopback (a local receiver in a test); no credentials, no fragment."""
    problem = None
    try:
        url = urlsplit(value)
        host = url.hostname or ""
        port = url.port
    except ValueError:
        url, host, port = None, "", None
    if url is None or len(value) > MAX_URL or url.scheme not in ("https", "http") or not host or any(
        c.isspace() or ord(c) < 32 for c in value
    ):  # fmt: skip
        problem = f"is an https URL of at most {MAX_URL} characters"
    elif not _encodable(host):
        problem = "names a host that is not a valid domain name or address"
    elif url.username or url.password:
        problem = "carries no user name or password: the signature says who sends"
    elif url.fragment:
        problem = "has no #fragment"
    elif url.scheme == "http":
        import ipaddress

        try:
            ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            ip = None
        if ip is None or not ip.is_loopback or not policy.permits(ip):
            problem = "uses https (plain http only to a loopback address, where the operator allows it)"
    del port
    if problem:
        raise InvalidInput([("url", problem)])
    return value


def _encodable(host: str) -> bool:
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


async def check_destination(value: str, policy: DestinationPolicy) -> None:
    """422 naming `url` when its host resolves where the tenant policy does not allow (a name that
    does not resolve now is checked again at each delivery)."""
    from .destinations import DestinationRefused

    host = urlsplit(value).hostname or ""
    try:
        async with asyncio.timeout(5.0):
            await policy.resolve(host, 0)
    except DestinationRefused as e:
        raise InvalidInput([("url", e.message)]) from None
    except (OSError, TimeoutError, UnicodeError):
        pass  # checked again when a delivery connects


def _types(value: list[str] | None) -> str:
    types = list(EVENT_TYPES) if value is None else value
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown or not types:
        raise InvalidInput([("event_types", f"is a non-empty list of: {', '.join(EVENT_TYPES)}")])
    return "," + ",".join(dict.fromkeys(types)) + ","


class Webhooks:
    """`mg.webhooks`: a tenant's webhooks, their deliveries, and the secret (shown once)."""

    def __init__(self, db: Database, keyring: Keyring, policy: DestinationPolicy, actor: str) -> None:
        self.db = db
        self.keyring = keyring
        self.policy = policy
        self.actor = actor

    def acting_as(self, actor: str) -> Webhooks:
        return Webhooks(self.db, self.keyring, self.policy, actor)

    async def create(
        self, tenant: str, url: str, event_types: list[str] | None = None, *, enabled: bool = True
    ) -> tuple[str, WebhookInfo]:
        """A new webhook: (its signing secret — shown this once — and its info)."""
        types = _types(event_types)
        check_url(url, self.policy)
        await check_destination(url, self.policy)
        secret = new_secret()
        async with self.db.write() as s:
            if await s.get(Tenant, tenant) is None:
                raise NotFound([("tenant", f"there is no tenant {tenant!r}")])
            count = len((await s.scalars(select(WebhookRow.id).where(WebhookRow.tenant_id == tenant))).all())
            if count >= MAX_WEBHOOKS:
                raise InvalidInput([("url", f"a tenant has at most {MAX_WEBHOOKS} webhooks: remove one first")])
            row = WebhookRow(tenant_id=tenant, url=url, event_types=types, enabled=enabled, secret="",
                             created_by=self.actor)  # fmt: skip
            s.add(row)
            await s.flush()
            row.secret = self.keyring.encrypt(tenant, _field(row.id), secret)
            _audit(s, self.actor, "webhook.add", tenant, [
                {"field": "webhook", "from": None, "to": {"id": row.id, "url": url, "event_types": types.strip(",")}},
                {"field": "webhook.secret", "secret": "changed"},
            ])  # fmt: skip
            return secret, await _info(s, row)

    async def list(self, tenant: str) -> list[WebhookInfo]:
        async with self.db.sessions() as s:
            rows = await s.scalars(select(WebhookRow).where(WebhookRow.tenant_id == tenant).order_by(WebhookRow.id))
            return [await _info(s, r) for r in rows]

    async def get(self, tenant: str, webhook_id: int) -> WebhookInfo:
        async with self.db.sessions() as s:
            return await _info(s, await _row(s, tenant, webhook_id))

    async def delete(self, tenant: str, webhook_id: int) -> None:
        async with self.db.write() as s:
            row = await _row(s, tenant, webhook_id, lock=True)
            await s.delete(row)
            _audit(s, self.actor, "webhook.remove", tenant, [{"field": "webhook", "from": row.url, "to": None}])

    async def update(
        self,
        tenant: str,
        webhook_id: int,
        *,
        enabled: bool | None = None,
        event_types: builtins.list[str] | None = None,
    ) -> WebhookInfo:
        """Switch a webhook on or off (on again clears what mailgate said when it switched it off),
        or change its event types."""
        async with self.db.write() as s:
            row = await _row(s, tenant, webhook_id, lock=True)
            changes: list[dict[str, Any]] = []
            if enabled is not None and enabled != row.enabled:
                changes.append({"field": "enabled", "from": row.enabled, "to": enabled})
                row.enabled, row.disabled_reason = enabled, None
            if event_types is not None:
                types = _types(event_types)
                if types != row.event_types:
                    changes.append({"field": "event_types", "from": row.event_types.strip(","),
                                    "to": types.strip(",")})  # fmt: skip
                    row.event_types = types
            if changes:
                row.updated_at = now()
                _audit(s, self.actor, "webhook.update", tenant, [{"webhook": row.id, **c} for c in changes])
            return await _info(s, row)

    async def rotate(self, tenant: str, webhook_id: int) -> tuple[str, WebhookInfo]:
        """A new signing secret (shown this once); the old one signs too for ROTATION_OVERLAP."""
        secret = new_secret()
        async with self.db.write() as s:
            row = await _row(s, tenant, webhook_id, lock=True)
            field = _field(row.id)
            row.previous_secret = self.keyring.rotate(tenant, field, row.secret)
            row.previous_until = now() + ROTATION_OVERLAP
            row.secret = self.keyring.encrypt(tenant, field, secret)
            row.updated_at = now()
            _audit(
                s, self.actor, "webhook.rotate", tenant, [{"field": f"webhook {row.id} secret", "secret": "changed"}]
            )
            return secret, await _info(s, row)

    async def deliveries(
        self, tenant: str, webhook_id: int | None = None, *, limit: int = 50
    ) -> builtins.list[dict[str, Any]]:
        """The tenant's latest deliveries (of one webhook), newest first, with their last response."""
        D, W, E = WebhookDelivery, WebhookRow, EventRow
        query = (
            select(D, E.type, E.created_at).join(W, W.id == D.webhook_id).join(E, E.id == D.event_id)
            .where(W.tenant_id == tenant).order_by(D.id.desc()).limit(min(max(limit, 1), 500))
        )  # fmt: skip
        if webhook_id is not None:
            query = query.where(D.webhook_id == webhook_id)
        async with self.db.sessions() as s:
            return [_delivery(d, kind, at) for d, kind, at in (await s.execute(query)).all()]


def _delivery(d: WebhookDelivery, kind: str, at: datetime) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": d.id, "webhook": d.webhook_id, "event": d.event_id, "type": kind, "event_at": at.isoformat(),
        "status": d.status, "attempts": d.attempts,
        "next_attempt_at": stamp(d.next_at) if d.status == PENDING else None, "last_attempt_at": stamp(d.last_at),
        "last_code": d.last_code, "last_response": d.last_response,
    }  # fmt: skip


async def _row(s: AsyncSession, tenant: str, webhook_id: int, *, lock: bool = False) -> WebhookRow:
    row = await s.get(WebhookRow, webhook_id, with_for_update=lock) if 0 < webhook_id < 2**63 else None
    if row is None or row.tenant_id != tenant:
        raise NotFound([("webhook", f"there is no webhook {webhook_id}")])
    return row


async def _info(s: AsyncSession, row: WebhookRow) -> WebhookInfo:
    D = WebhookDelivery
    latest = await s.scalar(
        select(D).where(D.webhook_id == row.id, D.last_at.is_not(None)).order_by(D.last_at.desc()).limit(1)
    )
    kind = await s.scalar(select(EventRow.type).where(EventRow.id == latest.event_id)) if latest else None
    last = _delivery(latest, kind or "", latest.created_at) if latest is not None else None
    pending = len((await s.scalars(select(D.id).where(D.webhook_id == row.id, D.status == PENDING).limit(1000))).all())
    previous = row.previous_until if row.previous_until and row.previous_until > now() else None
    return WebhookInfo(row.id, row.tenant_id, row.url, row.event_types.strip(",").split(","), row.enabled,
                       row.disabled_reason, row.created_at, row.created_by, previous, last, pending)  # fmt: skip


def _audit(s: AsyncSession, actor: str, action: str, tenant: str, changes: list[Any]) -> None:
    from .db.models import AuditEntry

    s.add(AuditEntry(actor=actor, action=action, tenant_id=tenant, scope=tenant, changes=changes))


def rotate_secrets(rows: list[WebhookRow], keyring: Keyring) -> int:
    """Re-encrypt webhooks' secrets under the newest key (`mailgate keys rotate`); how many."""
    count = 0
    for row in rows:
        row.secret = keyring.rotate(row.tenant_id, _field(row.id), row.secret)
        count += 1
        if row.previous_secret is not None:
            row.previous_secret = keyring.rotate(row.tenant_id, _field(row.id), row.previous_secret)
            count += 1
    return count


# ---- delivering ----------------------------------------------------------------------------------


@dataclass
class _Claimed:
    id: int
    webhook_id: int
    event_id: int
    attempts: int


def excerpt(body: bytes) -> str:
    """What is kept of a response body: decoded, control characters (and line breaks) made one
    space each, at most EXCERPT characters — a hostile receiver's reply is shown in the admin UI."""
    text = _CONTROL.sub(" ", body.decode("utf-8", "replace")).strip()
    return text[:EXCERPT]


def backoff(attempts: int, rng: random.Random, base: float = RETRY_BASE, retry_after: float | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: doubling, ±25 % jitter, at most
    RETRY_MAX; a receiver's Retry-After is honoured (up to RETRY_MAX)."""
    delay = min(base * 2.0 ** max(attempts - 1, 0), RETRY_MAX) * (0.75 + rng.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_MAX))
    return delay


class WebhookSender:
    """Delivers due webhook deliveries until stopped; run by every worker (`mailgate worker`,
    `mailgate serve`). Several may run: claims are leases (as the outbox's)."""

    def __init__(self, db: Database, keyring: Keyring, policy: DestinationPolicy) -> None:
        self.db = db
        self.keyring = keyring
        self.policy = policy
        self.retry_base = RETRY_BASE
        self.max_age = MAX_AGE
        self.timeout = REQUEST_TIMEOUT
        self._rng = random.Random()
        self._busy: set[int] = set()  # webhooks with deliveries under way in this process
        self._busy_tenant: dict[int, str] = {}  # …and their tenants (PER_TENANT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._client: Any = None
        self._purge_at = 0.0

    def _http(self) -> Any:
        if self._client is None:
            from ._http import new_client

            self._client = new_client(self.policy)
        return self._client

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop`; then let the sends under way finish (each is bounded by its timeout)."""
        loop = asyncio.get_running_loop()
        failure = ""  # the last failure's kind: its traceback is logged once, not every turn
        try:
            while not stop.is_set():
                try:
                    if loop.time() >= self._purge_at:
                        self._purge_at = loop.time() + PURGE_EVERY
                        gone = await Events(self.db).purge()
                        if gone:
                            log.info("removed %d events older than their retention", gone)
                    await self.deliver_due(wait=False)
                    failure = ""
                except Exception as e:  # the database away, or a bug: never the end of the loop
                    if type(e).__name__ != failure:
                        log.warning("webhook deliveries failed this turn: %s", traceback_of(e))
                    failure = type(e).__name__
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver_due(self, *, wait: bool = True) -> int:
        """Claim the due deliveries (of webhooks not being delivered to here) and start them, one
        task per webhook; with `wait`, until they are done. Returns how many were claimed."""
        claimed = await self._claim()
        by_webhook: dict[int, list[_Claimed]] = {}
        for c in claimed:
            by_webhook.setdefault(c.webhook_id, []).append(c)
        started = []
        for webhook_id, items in by_webhook.items():
            self._busy.add(webhook_id)
            task = asyncio.create_task(self._deliver_to(webhook_id, items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started.append(task)
        if wait and started:
            await asyncio.gather(*started)
        return len(claimed)

    async def _claim(self) -> list[_Claimed]:
        """Due deliveries of at most as many webhooks as there are free slots, at most PER_WEBHOOK
        each (the rest are given back at once): every task starts at once, and its deliveries are
        sent within PER_WEBHOOK × REQUEST_TIMEOUT, well before their LEASE runs out."""
        free = CONCURRENCY - len(self._busy)
        if free <= 0:
            return []
        at = now()
        D = _DELIVERIES.c
        due = select(D.id).where(D.next_at <= at, D.status == PENDING)
        if self._busy:
            due = due.where(D.webhook_id.not_in(list(self._busy)))
        due = due.order_by(D.next_at).limit(CLAIM).with_for_update(skip_locked=True)
        stmt = (
            update(_DELIVERIES).where(D.id.in_(due.scalar_subquery()))
            .values(next_at=at + timedelta(seconds=LEASE))
            .returning(D.id, D.webhook_id, D.event_id, D.attempts)
        )  # fmt: skip
        async with self.db.write() as s:
            rows = [_Claimed(*r) for r in (await s.execute(stmt)).all()]
            ids = {c.webhook_id for c in rows}
            tenants = select(WebhookRow.id, WebhookRow.tenant_id).where(WebhookRow.id.in_(ids))
            tenant_of: dict[int, str] = {i: t for i, t in (await s.execute(tenants)).all()} if ids else {}
        rows.sort(key=lambda c: c.id)
        kept: list[_Claimed] = []
        back: list[_Claimed] = []
        counts: dict[int, int] = {}
        per_tenant: dict[str, int] = {}
        for tenant in self._busy_tenant.values():
            per_tenant[tenant] = per_tenant.get(tenant, 0) + 1
        for c in rows:
            tenant = tenant_of.get(c.webhook_id, "")
            if c.webhook_id not in counts:
                if len(counts) >= free or per_tenant.get(tenant, 0) >= PER_TENANT:
                    back.append(c)
                    continue
                per_tenant[tenant] = per_tenant.get(tenant, 0) + 1
                self._busy_tenant[c.webhook_id] = tenant
            counts[c.webhook_id] = counts.get(c.webhook_id, 0) + 1
            (kept if counts[c.webhook_id] <= PER_WEBHOOK else back).append(c)
        if back:
            async with self.db.write() as s:
                await s.execute(update(_DELIVERIES).where(D.id.in_([c.id for c in back])).values(next_at=at))
        return kept

    async def _deliver_to(self, webhook_id: int, items: list[_Claimed]) -> None:
        try:
            async with self._slots:
                for c in items:
                    try:
                        await self._deliver(c)
                    except Exception as e:  # the database failed: the lease runs out, it goes again
                        log.warning("webhook delivery %s could not be recorded: %s", c.id, traceback_of(e))
        finally:
            self._busy.discard(webhook_id)
            self._busy_tenant.pop(webhook_id, None)

    async def _deliver(self, c: _Claimed) -> None:
        async with self.db.sessions() as s:
            hook = await s.get(WebhookRow, c.webhook_id)
            row = await s.get(EventRow, c.event_id)
        if hook is None or row is None:
            return  # removed meanwhile: its deliveries went with it
        event = Event(row.id, row.tenant_id, row.type, row.created_at, row.data)
        if not hook.enabled:
            await self._finish(c, FAILED, None, f"not sent: the webhook is switched off ({hook.disabled_reason})"
                               if hook.disabled_reason else "not sent: the webhook is switched off")  # fmt: skip
            return
        if now() - event.created_at > self.max_age:
            await self._finish(c, FAILED, None, f"gave up: not delivered within {_age(self.max_age)} of the event")
            return
        try:
            keys = [self.keyring.decrypt(hook.tenant_id, _field(hook.id), hook.secret)]
            if hook.previous_secret and hook.previous_until and hook.previous_until > now():
                keys.append(self.keyring.decrypt(hook.tenant_id, _field(hook.id), hook.previous_secret))
        except Exception as e:  # SecretsError: the keys changed; it waits for them, as mail servers do
            await self._retry(c, None, f"not sent: {type(e).__name__}: mailgate cannot decrypt the signing secret")
            return
        body = json.dumps(event.payload(), separators=(",", ":"), ensure_ascii=False).encode()
        webhook_id, stamp = f"evt_{event.id}", int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": " ".join(sign(k, webhook_id, stamp, body) for k in keys),
        }
        code, text, retry_after = await self._post(hook.url, headers, body)
        if code is not None and 200 <= code < 300:
            await self._finish(c, DELIVERED, code, text)
        elif code == 410:  # the spec: the receiver wants no more; switched off, the admin sees why
            await self._finish(c, FAILED, code, text, disable="the receiver answered 410 Gone")
        else:
            await self._retry(c, code, text, retry_after)

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int | None, str, float | None]:
        """(status code, response excerpt, Retry-After) — or (None, why) when no response came."""
        from ._http import retry_after as parse_retry_after

        try:
            async with asyncio.timeout(self.timeout):
                check_url(url, self.policy)
                request = self._http().build_request("POST", url, headers=headers, content=body)
                response = await self._http().send(request, stream=True)
                try:
                    data = b""
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) >= _READ:
                            break
                finally:
                    await response.aclose()
            return response.status_code, excerpt(data[:_READ]), parse_retry_after(response.headers.get("retry-after"))
        except TimeoutError:
            return None, f"no response within {self.timeout:g} s", None
        except InvalidInput as e:
            return None, f"not sent: the URL {e.problems[0][1]}", None
        except Exception as e:
            return None, _failure(e), None

    async def _finish(self, c: _Claimed, status: str, code: int | None, text: str, disable: str | None = None) -> None:
        at = now()
        async with self.db.write() as s:
            await s.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == c.id)
                .values(status=status, next_at=None, attempts=c.attempts + 1, last_at=at, last_code=code,
                        last_response=text)
            )  # fmt: skip
            if disable is not None:
                await s.execute(update(WebhookRow).where(WebhookRow.id == c.webhook_id)
                                .values(enabled=False, disabled_reason=disable, updated_at=at))  # fmt: skip

    async def _retry(self, c: _Claimed, code: int | None, text: str, retry_after: float | None = None) -> None:
        at = now()
        delay = backoff(c.attempts + 1, self._rng, self.retry_base, retry_after)
        async with self.db.write() as s:
            await s.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == c.id)
                .values(next_at=at + timedelta(seconds=delay), attempts=c.attempts + 1, last_at=at, last_code=code,
                        last_response=text)
            )  # fmt: skip


def _failure(e: BaseException) -> str:
    """Why a request got no response, in words for the admin UI: the destination policy's refusal
    as it is; otherwise the kind of failure (connection refused, TLS…), never more of its text."""
    from .destinations import DestinationRefused

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, DestinationRefused):
            return f"not sent: {seen.message}"
        seen = seen.__cause__ or seen.__context__
    return f"no response: {type(e).__name__}"


def _age(value: timedelta) -> str:
    hours = value.total_seconds() / 3600
    return f"{hours / 24:g} days" if hours >= 24 else f"{hours:g} hours"
