"""Delivery events: what a tenant may want to hear of, kept in the database for pollers
(`GET /v1/events?after=`) and fanned out to the tenant's webhooks (webhooks.py).

Each event is written in the same transaction as the change it tells of — a message's outcome
(outbox/store.py `record`), a mail server marked broken or mended (settings/store.py) — so none is
lost and none announces what did not happen. Pollers page by id, so ids must appear in commit
order: SQLite has one writer at a time; on PostgreSQL a sequence hands out ids when rows are
inserted, not when they commit, so a poller could see 11 before 10 commits and move past 10 for
good. Every transaction that writes events therefore takes one transaction-scoped advisory lock
just before inserting them (the last thing it does before committing): ids are handed out in
commit order, and only the tail of those transactions waits for another.

An event says which message and what became of it, never its content, recipients or any secret:
the receiver reads the rest with `GET /v1/messages/{id}`, under the same access rules (and the
message's retention), where an event kept for EVENT_RETENTION would repeat personal data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, and_, delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from .db.engine import Database
from .db.models import EventRow, WebhookDelivery, now
from .errors import InvalidInput

if TYPE_CHECKING:
    from .outbox.store import Outcome

MESSAGE_SENT, MESSAGE_DEFERRED, MESSAGE_FAILED = "message.sent", "message.deferred", "message.failed"
SERVER_BROKEN, SERVER_RECOVERED = "server.broken", "server.recovered"
# message.bounced comes with bounce processing (issue 20, later); a webhook may subscribe to it now.
MESSAGE_BOUNCED = "message.bounced"
EVENT_TYPES = (MESSAGE_SENT, MESSAGE_DEFERRED, MESSAGE_FAILED, MESSAGE_BOUNCED, SERVER_BROKEN, SERVER_RECOVERED)
_BY_STATUS = {"sent": MESSAGE_SENT, "deferred": MESSAGE_DEFERRED, "failed": MESSAGE_FAILED}
EVENT_RETENTION = timedelta(days=30)  # events (and their webhook deliveries) are removed after this
MAX_PAGE = 500
MAX_REASON = 500  # characters of a broken server's reason in an event
_LOCK_KEY = 0x6D61696C67617465  # "mailgate": the advisory lock of event writers (PostgreSQL)
_EVENTS = cast(Table, EventRow.__table__)


@dataclass(frozen=True)
class Event:
    id: int
    tenant: str
    type: str
    created_at: datetime
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """As pollers get it; webhooks get the same `type`, `timestamp` and `data` as the body."""
        return {"id": self.id, "tenant": self.tenant, "type": self.type, "timestamp": _stamp(self.created_at),
                "data": self.data}  # fmt: skip

    def payload(self) -> dict[str, Any]:
        return {"type": self.type, "timestamp": _stamp(self.created_at), "data": self.data}


def _stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def message_event(o: Outcome) -> tuple[str, dict[str, Any]] | None:
    """The event an outcome makes: sent and failed always, deferred only after a real attempt (a
    message that waits for its quota place or a held tenant was not tried: nothing to tell)."""
    kind = _BY_STATUS.get(o.status)
    if kind is None or (kind == MESSAGE_DEFERRED and not o.count_attempt):
        return None
    counts: dict[str, int] = {}
    for st, *_ in o.recipients.values():
        counts[st] = counts.get(st, 0) + 1
    data: dict[str, Any] = {
        "message": {"id": o.pk},
        "status": o.status,
        "attempt": o.attempts_before + (1 if o.count_attempt else 0),
        "outcome": o.outcome,
        "code": o.code,
        "enhanced": o.enhanced,
        "server": o.server_scope,  # "tenant" (its own) or "global"
        "recipients": counts,  # of this attempt, by status: numbers only, no addresses
    }
    if o.status == "deferred" and o.due_at is not None:
        data["next_attempt_at"] = _stamp(o.due_at)
    return kind, data


async def _lock(s: AsyncSession) -> None:
    if s.get_bind().dialect.name == "postgresql":
        await s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


# A group's events in one statement, the rows ([message id, type, data]) as one JSON document and
# each message's tenant joined in: row by row (an executemany and a lookup of the tenants) this
# cost ~27 µs an outcome on SQLite, two thirds again of what recording the outcome cost.
_INSERT_MESSAGE_EVENTS = {
    "sqlite": text("""
INSERT INTO events (tenant_id, type, message_pk, data, created_at)
SELECT m.tenant_id, json_extract(e.value, '$[1]'), m.id, json_extract(e.value, '$[2]'), :at
FROM json_each(:rows) AS e JOIN messages AS m ON m.id = json_extract(e.value, '$[0]')
RETURNING id
"""),
    "postgresql": text("""
INSERT INTO events (tenant_id, type, message_pk, data, created_at)
SELECT m.tenant_id, e ->> 1, m.id, e -> 2, :at
FROM json_array_elements(CAST(:rows AS json)) AS e JOIN messages AS m ON m.id = CAST(e ->> 0 AS bigint)
RETURNING id
"""),
}


async def record_message_events(s: AsyncSession, outcomes: Sequence[Outcome], at: datetime) -> None:
    """Within `record`'s transaction: the events of these outcomes (each message's tenant joined
    in), then their webhook deliveries."""
    rows = [[o.pk, kind, data] for o in outcomes if (made := message_event(o)) for kind, data in [made]]
    if not rows:
        return
    await _lock(s)
    db = s.get_bind().dialect.name
    if db == "sqlite":
        from .outbox.store import sqlite_time

        params: dict[str, Any] = {"rows": json.dumps(rows), "at": sqlite_time(at)}
    else:
        params = {"rows": json.dumps(rows), "at": at}
    ids = list((await s.scalars(_INSERT_MESSAGE_EVENTS[db], params)).all())
    if ids:
        await _fan_out(s, ids, at)


async def record_server_event(
    s: AsyncSession, kind: str, scope: str, server_kind: str, reason: str | None, at: datetime | None = None
) -> None:
    """Within the transaction that marks a server broken or mends it: an event for its tenant, or
    for every tenant that sends through it when it is the global server. A global server's reason
    is the operator's (its host, its account): tenants are told only that it is broken."""
    from .db.models import MailServerRow, Tenant

    at = at or now()
    data: dict[str, Any] = {"server": "global" if scope == "global" else "tenant", "kind": server_kind}
    if scope != "global" and reason is not None:
        data["reason"] = reason[:MAX_REASON]
    await _lock(s)
    if scope == "global":
        # Tenants with a working own server don't send through the global one.
        own = select(MailServerRow.tenant_id).where(MailServerRow.enabled, MailServerRow.tenant_id.is_not(None))
        query = select(Tenant.id).where(~and_(Tenant.may_use_own_server, Tenant.id.in_(own)))
        tenants = list((await s.scalars(query)).all())
    else:
        tenants = [scope]
    if not tenants:
        return
    values = [{"tenant_id": t, "type": kind, "message_pk": None, "server_scope": scope, "data": data,
               "created_at": at} for t in tenants]  # fmt: skip
    ids = list((await s.scalars(_EVENTS.insert().returning(_EVENTS.c.id), values)).all())
    await _fan_out(s, ids, at)


_FAN_OUT = {
    db: text(f"""
INSERT INTO webhook_deliveries (webhook_id, event_id, status, attempts, next_at, created_at)
SELECT w.id, e.id, 'pending', 0, :at, :at FROM events AS e
JOIN webhooks AS w ON w.tenant_id = e.tenant_id AND w.enabled AND w.event_types LIKE '%,' || e.type || ',%'
WHERE e.id {where}
""")
    for db, where in {"postgresql": "= ANY(CAST(:ids AS bigint[]))",
                      "sqlite": "IN (SELECT value FROM json_each(:ids))"}.items()
}  # fmt: skip


async def _fan_out(s: AsyncSession, ids: list[int], at: datetime) -> None:
    """A pending delivery of each new event to each enabled webhook of its tenant that takes its type."""
    if s.get_bind().dialect.name == "sqlite":
        from .outbox.store import sqlite_time

        await s.execute(_FAN_OUT["sqlite"], {"ids": json.dumps(ids), "at": sqlite_time(at)})
    else:
        await s.execute(_FAN_OUT["postgresql"], {"ids": ids, "at": at})


class Events:
    """`mg.events`: read a tenant's events in order, and remove old ones."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(self, tenant: str | None, *, after: int = 0, limit: int = 100) -> list[Event]:
        """Events after id `after`, in id order (all tenants' when `tenant` is None)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput([("limit", f"is 1 to {MAX_PAGE}")])
        if after < 0:
            raise InvalidInput([("after", "is an event id (0: from the first kept)")])
        E = EventRow
        query = select(E).where(E.id > min(after, 2**63 - 1)).order_by(E.id).limit(limit)
        if tenant is not None:
            query = query.where(E.tenant_id == tenant)
        async with self.db.sessions() as s:
            return [_event(r) for r in await s.scalars(query)]

    async def purge(self, older_than: timedelta = EVENT_RETENTION) -> int:
        """Remove events older than the retention (their webhook deliveries with them); how many."""
        before = now() - older_than
        old = select(EventRow.id).where(EventRow.created_at < before)
        async with self.db.write() as s:
            await s.execute(delete(WebhookDelivery).where(WebhookDelivery.event_id.in_(old)))
            gone = await s.execute(delete(EventRow).where(EventRow.created_at < before))
            return int(gone.rowcount or 0)  # type: ignore[attr-defined]


def _event(r: EventRow) -> Event:
    return Event(r.id, r.tenant_id, r.type, r.created_at, r.data)
