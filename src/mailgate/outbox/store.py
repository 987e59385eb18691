"""The outbox in the database: messages in, claims out, outcomes back, and the operator's view.

A message is accepted only once its transaction commits. Workers claim due messages with one
`UPDATE … WHERE id IN (SELECT … ORDER BY due_at LIMIT n FOR UPDATE SKIP LOCKED) RETURNING …`
statement (SQLite has no row locks and needs none: the statement runs under its write lock), so
workers on several machines never take the same message; a claim is a lease that ends at
`due_at`, after which another worker may take the message over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast, overload

from sqlalchemy import Table, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..config import Config
from ..db.engine import Database
from ..db.models import AttemptRow, MessageAttachment, MessageBody, MessageRecipient, MessageRow, now
from ..errors import Conflict, NotFound, traceback_of
from ..events import record_message_events
from ..message import Message

log = logging.getLogger("mailgate.outbox")

# Statuses. queued → sending → sent | deferred → … | failed | cancelled; held while sending is
# disabled (with hold_when_disabled).
HELD, QUEUED, SENDING, DEFERRED, SENT, FAILED, CANCELLED = (
    "held", "queued", "sending", "deferred", "sent", "failed", "cancelled",
)  # fmt: skip
STATUSES = (HELD, QUEUED, SENDING, DEFERRED, SENT, FAILED, CANCELLED)
# Recipient statuses, and what an attempt learns of one: (status, code, enhanced code, text).
PENDING, ACCEPTED, REFUSED = "pending", "accepted", "failed"
RecipientState = tuple[str, int | None, str | None, str]


@dataclass
class Claimed:
    """A message a worker holds: what to send, to whom it is still due, and its history."""

    pk: int
    tenant_id: str
    message: Message
    pending: list[tuple[int, str]]  # (position, envelope address) of recipients still due
    attempts: int
    created_at: datetime
    expires_at: datetime
    previous_owner: str | None  # set when this claim took over an expired lease
    accepted_before: int = 0  # recipients that accepted it in earlier attempts
    quota_slot: datetime | None = None  # the place it waited for within its server's rate quotas
    claimed_at: float = 0.0  # the worker's loop time when it took the message into its backlog


@dataclass
class Outcome:
    """What a worker learnt from one attempt, and what the message becomes."""

    pk: int
    started_at: datetime
    duration_ms: int
    outcome: str  # accepted, transient, permanent, mixed, broken, error
    text: str
    status: str
    due_at: datetime | None
    recipients: dict[int, RecipientState] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    enhanced: str | None = None
    note: str | None = None
    server_scope: str | None = None
    server_id: int | None = None
    server_version: int | None = None
    server: str | None = None
    last_error: str | None = None
    count_attempt: bool = True  # False when nothing was tried (the server is marked broken)
    attempts_before: int = 0  # attempts recorded before this one (from the claim)
    quota_slot: datetime | None = None  # deferred to its reserved place within the server's quotas


@dataclass(frozen=True)
class MessageSummary:
    id: int
    tenant: str
    status: str
    subject: str
    message_id: str
    created_at: datetime
    updated_at: datetime
    due_at: datetime | None
    attempts: int
    recipients: dict[str, int]  # counts by recipient status
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "status": self.status,
            "subject": self.subject,
            "message_id": self.message_id,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "next_attempt_at": self.due_at.isoformat() if self.due_at and self.status != SENDING else None,
            "attempts": self.attempts,
            "recipients": self.recipients,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class MessageDetail:
    summary: MessageSummary
    recipients: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    body_purged: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary.to_dict(),
            "body_purged": self.body_purged,
            "recipient_outcomes": self.recipients,
            "attempt_log": self.attempts,
        }


_MESSAGES = cast(Table, MessageRow.__table__)
_RECIPIENTS = cast(Table, MessageRecipient.__table__)
_ATTEMPTS = cast(Table, AttemptRow.__table__)
_ATTACHMENTS = cast(Table, MessageAttachment.__table__)
_BODIES = cast(Table, MessageBody.__table__)
_INSERT_MESSAGES = _MESSAGES.insert().returning(_MESSAGES.c.id, _MESSAGES.c.message_id)
_INSERT_MESSAGES_IN_ORDER = _MESSAGES.insert().returning(_MESSAGES.c.id, sort_by_parameter_order=True)
# What a claim reads of the messages it took, the ids as one parameter — an array on PostgreSQL,
# a JSON array on SQLite — so that the statement is short and the same whatever their number (an
# expanding IN is a statement of 200 parameters, too long for psycopg's cache: converted anew
# each time: 7 % of a PostgreSQL worker's samples).
_CLAIMED_IN = {"postgresql": "= ANY(CAST(:pks AS bigint[]))", "sqlite": "IN (SELECT value FROM json_each(:pks))"}
_CLAIMED_BODIES = {
    db: text(f"SELECT message_pk, content FROM message_bodies WHERE message_pk {where}").columns(
        _BODIES.c.message_pk, _BODIES.c.content
    )
    for db, where in _CLAIMED_IN.items()
}
_CLAIMED_RECIPIENTS = {
    db: text(f"SELECT message_pk, position, address, status FROM message_recipients WHERE message_pk {where} "
             "ORDER BY message_pk, position")
    for db, where in _CLAIMED_IN.items()
}  # fmt: skip
_CLAIMED_ATTACHMENTS = {
    db: text(f"SELECT message_pk, data FROM message_attachments WHERE message_pk {where} "
             "ORDER BY message_pk, position").columns(_ATTACHMENTS.c.message_pk, _ATTACHMENTS.c.data)
    for db, where in _CLAIMED_IN.items()
}  # fmt: skip


async def _insert_messages_postgresql(s: Any, rows: list[dict[str, Any]]) -> list[int]:
    """`_insert_messages` on PostgreSQL, from arrays (Message-IDs distinct): ids in order."""
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    returned = await s.execute(_PG_INSERT_MESSAGES, {
        "tenant": columns["tenant_id"], "status": columns["status"], "key": columns["idempotency_key"],
        "message_id": columns["message_id"], "subject": columns["subject"], "size": columns["size"],
        "attempts": columns["attempts"], "created": columns["created_at"], "updated": columns["updated_at"],
        "expires": columns["expires_at"], "due": columns["due_at"],
    })  # fmt: skip
    by_message_id = {mid: pk for pk, mid in returned.all()}
    return [by_message_id[mid] for mid in columns["message_id"]]


async def _insert_messages(s: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Insert message rows (Core: the ORM's bulk path costs several times more per row) and
    return their ids in the order of `rows`. A multi-row INSERT … RETURNING gives its rows in no
    promised order (SQLite says so), so they are matched by Message-ID; a batch that repeats a
    Message-ID takes the slower statement that keeps the order."""
    message_ids = [r["message_id"] for r in rows]
    if len(set(message_ids)) < len(message_ids):
        return list((await s.scalars(_INSERT_MESSAGES_IN_ORDER, rows)).all())
    by_message_id = {mid: pk for pk, mid in (await s.execute(_INSERT_MESSAGES, rows)).all()}
    return [by_message_id[mid] for mid in message_ids]


# PostgreSQL: new messages and their recipients with one INSERT … SELECT FROM unnest each, the rows
# as arrays. A multi-row INSERT … VALUES of 500 messages is a statement of ~100 KB that psycopg
# splits into parameters in Python every time (too long for its cache): a quarter of submitting.
_PG_INSERT_MESSAGES = text("""
INSERT INTO messages (tenant_id, status, idempotency_key, message_id, subject, size, attempts, created_at,
                      updated_at, expires_at, due_at)
SELECT * FROM unnest(CAST(:tenant AS varchar[]), CAST(:status AS varchar[]), CAST(:key AS varchar[]),
                     CAST(:message_id AS varchar[]), CAST(:subject AS text[]), CAST(:size AS integer[]),
                     CAST(:attempts AS integer[]), CAST(:created AS timestamptz[]), CAST(:updated AS timestamptz[]),
                     CAST(:expires AS timestamptz[]), CAST(:due AS timestamptz[]))
RETURNING id, message_id
""")
_PG_INSERT_RECIPIENTS = text("""
INSERT INTO message_recipients (message_pk, position, address, status)
SELECT * FROM unnest(CAST(:pks AS bigint[]), CAST(:positions AS integer[]), CAST(:addresses AS varchar[]),
                     CAST(:statuses AS varchar[]))
""")

# PostgreSQL: the bodies of new messages and the attempts of a group, each as one JSON document
# of rows (json_array_elements): one statement instead of one per row, and no escaping in Python
# (as a text[] psycopg escaped every quote of every JSON body, as an executemany it binds each row).
_PG_INSERT_BODIES = text("""
INSERT INTO message_bodies (message_pk, content)
SELECT CAST(e ->> 0 AS bigint), e -> 1 FROM json_array_elements(CAST(:rows AS json)) AS e
""")


# PostgreSQL: a group of outcomes in one statement per table, the rows as arrays (unnest), where
# an executemany runs one UPDATE per row — ~250 µs of the server's CPU per message, most of what a
# delivery cost it. The first also says which messages this worker still held (RETURNING).
_PG_RECORD_MESSAGES = text("""
UPDATE messages AS m SET status = v.status, due_at = v.due_at, lease_owner = NULL, previous_owner = NULL,
    attempts = v.attempts, updated_at = :at, last_server_id = v.server, last_error = v.error,
    sent_at = v.sent_at, quota_slot = v.quota_slot
FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS varchar[]), CAST(:due AS timestamptz[]),
            CAST(:attempts AS integer[]), CAST(:servers AS bigint[]), CAST(:errors AS text[]),
            CAST(:sent AS timestamptz[]), CAST(:slots AS timestamptz[]))
    AS v(id, status, due_at, attempts, server, error, sent_at, quota_slot)
WHERE m.id = v.id AND m.lease_owner = :worker
RETURNING m.id
""")
_PG_RECORD_RECIPIENTS = text("""
UPDATE message_recipients AS r SET status = v.status, code = v.code, enhanced = v.enhanced, text = v.text
FROM unnest(CAST(:pks AS bigint[]), CAST(:positions AS integer[]), CAST(:statuses AS varchar[]),
            CAST(:codes AS integer[]), CAST(:enhanced AS varchar[]), CAST(:texts AS text[]))
    AS v(pk, pos, status, code, enhanced, text)
WHERE r.message_pk = v.pk AND r.position = v.pos
""")


def _from_json_rows(*columns: str) -> str:
    """The rows of the JSON array :rows, each an array of `columns` in order, as a subquery."""
    picked = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, name in enumerate(columns))
    return f"(SELECT {picked} FROM json_each(:rows))"


# SQLite: the same writes, the rows as one JSON array each (json_each), where an executemany spent
# ~20 µs of Python per row and table binding and converting each parameter — a third of what a
# delivery cost the worker. UPDATE … FROM and RETURNING need SQLite 3.35, as the claim does.
_SQLITE_RECORD_MESSAGES = text(f"""
UPDATE messages SET status = v.status, due_at = v.due_at, lease_owner = NULL, previous_owner = NULL,
    attempts = v.attempts, updated_at = :at, last_server_id = v.server, last_error = v.error,
    sent_at = v.sent_at, quota_slot = v.quota_slot
FROM {_from_json_rows("id", "status", "due_at", "attempts", "server", "error", "sent_at", "quota_slot")} AS v
WHERE messages.id = v.id AND messages.lease_owner = :worker
RETURNING messages.id
""")
_SQLITE_RECORD_RECIPIENTS = text(f"""
UPDATE message_recipients SET status = v.status, code = v.code, enhanced = v.enhanced, text = v.text
FROM {_from_json_rows("pk", "pos", "status", "code", "enhanced", "text")} AS v
WHERE message_recipients.message_pk = v.pk AND message_recipients.position = v.pos
""")
_MESSAGE_COLUMNS = ("tenant_id", "status", "idempotency_key", "message_id", "subject", "size", "attempts",
                    "created_at", "updated_at", "expires_at", "due_at")  # fmt: skip
_SQLITE_INSERT_MESSAGES = text(f"""
INSERT INTO messages ({", ".join(_MESSAGE_COLUMNS)})
SELECT {", ".join(_MESSAGE_COLUMNS)} FROM {_from_json_rows(*_MESSAGE_COLUMNS)}
RETURNING id, message_id
""")
_SQLITE_INSERT_BODIES = text(f"""
INSERT INTO message_bodies (message_pk, content) SELECT pk, content FROM {_from_json_rows("pk", "content")}
""")
_SQLITE_INSERT_RECIPIENTS = text(f"""
INSERT INTO message_recipients (message_pk, position, address, status)
SELECT pk, pos, address, :status FROM {_from_json_rows("pk", "pos", "address")}
""")
# An attempt's columns in order, with their PostgreSQL types (None: JSON, taken as it is).
_ATTEMPT_TYPES = {
    "message_pk": "bigint", "number": "integer", "worker": "varchar", "started_at": "timestamptz",
    "duration_ms": "integer", "server_scope": "varchar", "server_id": "bigint", "server_version": "integer",
    "server": "varchar", "outcome": "varchar", "code": "integer", "enhanced": "varchar", "text": "text",
    "results": None, "note": "text",
}  # fmt: skip
_ATTEMPT_COLUMNS = tuple(_ATTEMPT_TYPES)
_SQLITE_INSERT_ATTEMPTS = text(f"""
INSERT INTO attempts ({", ".join(_ATTEMPT_COLUMNS)})
SELECT {", ".join(_ATTEMPT_COLUMNS)} FROM {_from_json_rows(*_ATTEMPT_COLUMNS)}
""")
_PG_INSERT_ATTEMPTS = text(f"""
INSERT INTO attempts ({", ".join(_ATTEMPT_COLUMNS)})
SELECT {", ".join(f"CAST(e ->> {i} AS {t})" if t else f"e -> {i}" for i, t in enumerate(_ATTEMPT_TYPES.values()))}
FROM json_array_elements(CAST(:rows AS json)) AS e
""")


def sqlite_time(value: datetime | None) -> str | None:
    """A UTC datetime as SQLite stores it (as `UTCDateTime` and SQLAlchemy's SQLite DATETIME
    write it): naive UTC, always six digits of microseconds, so stored times compare as text."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


# What a claim reads: bodies, recipients still due, how many accepted before, attachment data.
_Found = tuple[dict[int, Any], dict[int, list[tuple[int, str]]], dict[int, int], dict[int, list[bytes]]]

MAX_ID = 2**63 - 1  # ids are 64-bit signed integers in both databases


@dataclass(frozen=True)
class Entry:
    """A message to store: for which tenant, with which idempotency key, in which status."""

    tenant_id: str
    message: Message
    key: str | None
    status: str


def default_domain() -> str:
    """For a Message-ID when nothing better is known: this host's name."""
    name = socket.gethostname()
    return name if "." in name else f"{name or 'mailgate'}.localdomain"


class Outbox:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config

    # ---- submit --------------------------------------------------------------------------------

    async def find_by_key(self, tenant_id: str, key: str) -> int | None:
        async with self.db.sessions() as s:
            query = select(MessageRow.id).where(MessageRow.tenant_id == tenant_id, MessageRow.idempotency_key == key)
            return await s.scalar(query)

    async def submit(
        self, tenant_id: str, messages: Sequence[Message], keys: Sequence[str | None], status: str
    ) -> list[int]:
        """Store messages (each with a message_id already) in one transaction; returns their ids.
        With an idempotency key that is already taken, that message's id is returned instead."""
        entries = [Entry(tenant_id, m, k, status) for m, k in zip(messages, keys, strict=True)]
        try:
            return await self.store(entries)
        except IntegrityError:
            # Another submit with the same idempotency key committed first.
            if len(messages) == 1 and keys[0] is not None and (pk := await self.find_by_key(tenant_id, keys[0])):
                return [pk]
            raise

    async def store(self, entries: Sequence[Entry]) -> list[int]:
        """Store messages of any tenants in one transaction; returns their ids in order.

        Everything that can be made before the transaction is made before it: on SQLite the
        write lock is the one every submitter and worker waits for."""
        at = now()
        rows = [self._row(e.tenant_id, e.message, e.key, e.status, at) for e in entries]
        messages = [e.message for e in entries]
        bodies = [json.dumps(m.to_dict()) for m in messages]
        recipients = [[(i, a.envelope_form(False)) for i, a in enumerate(m.recipients)] for m in messages]
        distinct = len({r["message_id"] for r in rows}) == len(rows)  # returned ids told apart by it
        insert = _SQLiteInsert(rows, distinct) if self.db.is_sqlite else _PostgreSQLInsert(rows, distinct)
        async with self.db.write() as s:
            ids = await insert.messages(s)
            await s.execute(insert.bodies, {"rows": _with_ids(ids, bodies)})
            await insert.recipients(s, [(pk, i, a) for pk, rs in zip(ids, recipients, strict=True) for i, a in rs])
            attachments = [
                {"message_pk": pk, "position": i, "data": bytes(a.data)}
                for pk, m in zip(ids, messages, strict=True)
                for i, a in enumerate(m.attachments)
            ]
            if attachments:
                await s.execute(_ATTACHMENTS.insert(), attachments)
        return ids

    def _row(self, tenant_id: str, m: Message, key: str | None, status: str, at: datetime) -> dict[str, Any]:
        assert m.message_id is not None
        return {
            "tenant_id": tenant_id,
            "status": status,
            "idempotency_key": key,
            "message_id": m.message_id,
            "subject": storable(m.subject[:1000]),
            "size": m.estimated_size(),
            "attempts": 0,
            "created_at": at,
            "updated_at": at,
            "expires_at": at + timedelta(seconds=self.config.max_age),
            "due_at": at if status == QUEUED else None,
        }

    # ---- claim, record, release ------------------------------------------------------------

    async def claim(self, worker: str, limit: int) -> list[Claimed]:
        at = now()
        M = _MESSAGES.c
        due = select(M.id).where(M.due_at <= at).order_by(M.due_at).limit(limit).with_for_update(skip_locked=True)
        stmt = (
            update(_MESSAGES)
            .where(M.id.in_(due.scalar_subquery()))
            .values(
                status=SENDING,
                previous_owner=M.lease_owner,  # SET reads the old row: the owner whose lease ran out
                lease_owner=worker,
                due_at=at + timedelta(seconds=self.config.lease),
                updated_at=at,
            )
            .returning(M.id, M.tenant_id, M.attempts, M.created_at, M.expires_at, M.previous_owner, M.quota_slot)
        )
        async with self.db.write() as s:
            rows = (await s.execute(stmt)).all()
            if rows and not self.db.is_sqlite:
                found = await self._claimed(s, [r.id for r in rows])
        if not rows:
            return []
        if self.db.is_sqlite:
            # What to send is read after the claim has committed, so that the write lock every
            # submitter and worker waits for is held for the one statement: the claim holds the
            # leases, and nothing changes a message's body or recipients while it is being sent
            # (retry and cancel refuse, purge takes sent ones).
            pks = [r.id for r in rows]
            try:
                async with self.db.sessions() as s:
                    found = await self._claimed(s, pks)
            except BaseException:
                with contextlib.suppress(SQLAlchemyError, OSError):  # else their leases run out
                    await self.release(worker, pks)
                raise
        content, pending, accepted, files = found
        claimed, unreadable = [], []
        for r in rows:
            try:
                message = Message.from_dict(content[r.id], files[r.id])
            except Exception as e:  # a body this version can't read fails alone, not every claim that meets it
                log.error("message %s of %s can't be read from the outbox: %s", r.id, r.tenant_id, traceback_of(e))
                unreadable.append(_unreadable(r, pending[r.id], accepted[r.id], e))
                continue
            claimed.append(Claimed(r.id, r.tenant_id, message, pending[r.id], r.attempts, r.created_at, r.expires_at,
                                   r.previous_owner, accepted[r.id], r.quota_slot))  # fmt: skip
        await self.record(worker, unreadable)
        return claimed

    async def _claimed(self, s: Any, pks: list[int]) -> _Found:
        """The claimed messages' bodies, recipients still due, recipients that accepted before,
        and attachment data."""
        db = "sqlite" if self.db.is_sqlite else "postgresql"
        params = {"pks": json.dumps(pks) if self.db.is_sqlite else pks}
        content = {pk: c for pk, c in await s.execute(_CLAIMED_BODIES[db], params)}
        pending: dict[int, list[tuple[int, str]]] = {pk: [] for pk in pks}
        accepted: dict[int, int] = dict.fromkeys(pks, 0)
        for pk, position, address, status in await s.execute(_CLAIMED_RECIPIENTS[db], params):
            if status == PENDING:
                pending[pk].append((position, address))
            elif status == ACCEPTED:
                accepted[pk] += 1
        files: dict[int, list[bytes]] = {pk: [] for pk in pks}
        if any(c["attachments"] for c in content.values()):
            for pk, data in await s.execute(_CLAIMED_ATTACHMENTS[db], params):
                files[pk].append(data)
        return content, pending, accepted, files

    async def record(self, worker: str, outcomes: Sequence[Outcome]) -> None:
        """Write what attempts learnt, in one transaction. A message whose lease this worker lost
        meanwhile (it was too slow, another worker took over) is left to its new owner.

        One statement per table, the rows as arrays (PostgreSQL's unnest, SQLite's json_each):
        this runs for every group of outcomes, and row by row cost more than the rest of a
        delivery. A row joined twice would take either value, so a message or recipient given
        twice (two attempts in one group) is written once, as the later one left it."""
        if not outcomes:
            return
        at = now()
        latest = list({o.pk: o for o in outcomes}.values())
        messages = [
            (o.pk, o.status, o.due_at, o.attempts_before + (1 if o.count_attempt else 0), o.server_id,
             storable(o.last_error), at if o.status == SENT else None, o.quota_slot)
            for o in latest
        ]  # fmt: skip
        write = _SQLiteRecord() if self.db.is_sqlite else _PostgreSQLRecord()
        async with self.db.write() as s:
            owned = await write.messages(s, worker, messages, at)
            mine = [o for o in outcomes if o.pk in owned]
            if not mine:
                return
            states = [(pk, pos, st, code, enhanced, storable(text)) for (pk, pos), (st, code, enhanced, text) in
                      {(o.pk, pos): state for o in mine for pos, state in o.recipients.items()}.items()]  # fmt: skip
            if states:
                await write.recipients(s, states)
            await write.attempts(s, [_attempt_row(worker, o) for o in mine])
            await record_message_events(s, mine, at)  # last: it takes the event writers' lock (events.py)

    async def release(self, worker: str, pks: Sequence[int]) -> int:
        """Give back claimed messages that were not tried (a stopping worker): due again now."""
        at = now()
        return await self._update_held(worker, pks, status=QUEUED, due_at=at, lease_owner=None,
                                        previous_owner=None, updated_at=at)  # fmt: skip

    async def renew(self, worker: str, pks: Sequence[int]) -> int:
        """Extend the leases of claimed messages this worker still holds (a heartbeat)."""
        return await self._update_held(worker, pks, due_at=now() + timedelta(seconds=self.config.lease))

    async def _update_held(self, worker: str, pks: Sequence[int], **values: Any) -> int:
        """Update those of `pks` that `worker` still holds (claimed, its lease); how many."""
        if not pks:
            return 0
        M = MessageRow
        async with self.db.write() as s:
            result = await s.execute(
                update(M)
                .where(M.id.in_(pks), M.lease_owner == worker, M.status == SENDING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def held_tenants(self) -> list[str]:
        async with self.db.sessions() as s:
            query = select(MessageRow.tenant_id).where(MessageRow.status == HELD).distinct()
            return list((await s.scalars(query)).all())

    async def release_held(self, tenant_id: str) -> int:
        """Held messages of a tenant that may send again: queued, due now."""
        at = now()
        M = MessageRow
        async with self.db.write() as s:
            result = await s.execute(
                update(M)
                .where(M.tenant_id == tenant_id, M.status == HELD)
                .values(status=QUEUED, due_at=at, updated_at=at)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def purge(self) -> tuple[int, int]:
        """Bodies of messages sent more than retention_body ago, then whole log lines of final
        messages older than retention_log. Returns (bodies removed, messages removed)."""
        at = now()
        M = MessageRow
        body_before = at - timedelta(seconds=self.config.retention_body)
        log_before = at - timedelta(seconds=self.config.retention_log)
        async with self.db.write() as s:
            old = select(M.id).where(M.status == SENT, M.sent_at < body_before, M.body_purged_at.is_(None))
            pks = list((await s.scalars(old)).all())
            if pks:
                await s.execute(delete(MessageAttachment).where(MessageAttachment.message_pk.in_(pks)))
                await s.execute(delete(MessageBody).where(MessageBody.message_pk.in_(pks)))
                await s.execute(
                    update(M).where(M.id.in_(pks)).values(body_purged_at=at)
                    .execution_options(synchronize_session=False)
                )  # fmt: skip
            gone = await s.execute(
                delete(M).where(M.status.in_([SENT, FAILED, CANCELLED]), M.updated_at < log_before)
                .execution_options(synchronize_session=False)
            )  # fmt: skip
            return len(pks), int(gone.rowcount or 0)  # type: ignore[attr-defined]

    # ---- the operator's view -----------------------------------------------------------------

    async def list_messages(
        self,
        *,
        tenant_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: int | None = None,
        recipient: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[MessageSummary]:
        """Messages, newest first: of a tenant, in a status, to a recipient (the address, any
        case), made at or after `since` and before `until`; `before` pages by id."""
        if status is not None and status not in STATUSES:
            from ..errors import InvalidInput

            raise InvalidInput([("status", f"is one of {', '.join(STATUSES)}")])
        M = MessageRow
        query = select(M).order_by(M.id.desc()).limit(limit)
        if tenant_id is not None:
            query = query.where(M.tenant_id == tenant_id)
        if status is not None:
            query = query.where(M.status == status)
        if before is not None:
            query = query.where(M.id < min(before, MAX_ID))
        if recipient:
            to = select(MessageRecipient.message_pk).where(
                func.lower(MessageRecipient.address) == recipient.strip().lower()
            )
            query = query.where(M.id.in_(to))
        if since is not None:
            query = query.where(M.created_at >= since)
        if until is not None:
            query = query.where(M.created_at < until)
        async with self.db.sessions() as s:
            rows = list((await s.scalars(query)).all())
            counts = await _recipient_counts(s, [r.id for r in rows])
        return [_summary(r, counts.get(r.id, {})) for r in rows]

    async def get(self, pk: int, *, tenant_id: str | None = None) -> MessageDetail:
        async with self.db.sessions() as s:
            row = await _message(s, pk, tenant_id)
            recipients = list(
                (await s.scalars(select(MessageRecipient).where(MessageRecipient.message_pk == pk)
                                 .order_by(MessageRecipient.position))).all()
            )  # fmt: skip
            attempts = list(
                (await s.scalars(select(AttemptRow).where(AttemptRow.message_pk == pk).order_by(AttemptRow.id))).all()
            )
        counts: dict[str, int] = {}
        for r in recipients:
            counts[r.status] = counts.get(r.status, 0) + 1
        return MessageDetail(
            _summary(row, counts),
            [{"recipient": r.address, "status": r.status, "code": r.code, "enhanced": r.enhanced, "text": r.text}
             for r in recipients],
            [_attempt_dict(a) for a in attempts],
            row.body_purged_at is not None,
        )  # fmt: skip

    async def retry(self, pk: int, *, tenant_id: str | None = None) -> MessageSummary:
        """Send again, now, to every recipient not yet accepted; the maximum age starts again."""
        at = now()
        async with self.db.write() as s:
            row = await _message(s, pk, tenant_id, lock=True)
            if row.status == SENDING:
                raise Conflict([("message", f"message {pk} is being sent right now")])
            if row.body_purged_at is not None:
                raise Conflict([("message", f"the body of message {pk} was purged; it can't be sent again")])
            await s.execute(
                update(MessageRecipient)
                .where(MessageRecipient.message_pk == pk, MessageRecipient.status != ACCEPTED)
                .values(status=PENDING)
                .execution_options(synchronize_session=False)
            )
            pending = await s.scalar(
                select(func.count()).where(MessageRecipient.message_pk == pk, MessageRecipient.status == PENDING)
            )
            if not pending:
                raise Conflict([("message", f"every recipient of message {pk} has accepted it")])
            row.status, row.due_at, row.updated_at = QUEUED, at, at
            row.expires_at = at + timedelta(seconds=self.config.max_age)
            return await _summary_now(s, row)

    async def retry_failed(self, *, tenant_id: str | None = None) -> list[int]:
        M = MessageRow
        query = select(M.id).where(M.status == FAILED, M.body_purged_at.is_(None))
        if tenant_id is not None:
            query = query.where(M.tenant_id == tenant_id)
        async with self.db.sessions() as s:
            pks = list((await s.scalars(query)).all())
        done = []
        for pk in pks:
            try:
                await self.retry(pk)
                done.append(pk)
            except Conflict:
                pass  # taken by something else meanwhile
        return done

    async def cancel(self, pk: int, *, tenant_id: str | None = None) -> MessageSummary:
        at = now()
        async with self.db.write() as s:
            row = await _message(s, pk, tenant_id, lock=True)
            if row.status == SENDING:
                raise Conflict([("message", f"message {pk} is being sent right now; cancel it after this attempt")])
            if row.status not in (QUEUED, DEFERRED, HELD):
                raise Conflict([("message", f"message {pk} is {row.status}; only waiting messages can be cancelled")])
            row.status, row.due_at, row.updated_at = CANCELLED, None, at
            return await _summary_now(s, row)

    async def stats(self) -> dict[str, Any]:
        M = MessageRow
        at = now()
        async with self.db.sessions() as s:
            by_status = {st: n for st, n in await s.execute(select(M.status, func.count()).group_by(M.status))}
            due_now = await s.scalar(select(func.count()).where(M.due_at <= at, M.status != SENDING))
            waiting = M.status.in_([QUEUED, DEFERRED, HELD, SENDING])
            oldest = await s.scalar(select(func.min(M.created_at)).where(waiting))
        return {
            "by_status": {st: by_status.get(st, 0) for st in STATUSES},
            "due_now": int(due_now or 0),
            "oldest_waiting_age_s": round((at - oldest).total_seconds(), 1) if oldest else None,
        }

    async def counts(self) -> dict[str, Any]:
        """For /metrics: messages by (tenant, status), attempts kept by outcome, and the queue."""
        M, A = MessageRow, AttemptRow
        async with self.db.sessions() as s:
            by_tenant = [(t, st, n) for t, st, n in await s.execute(
                select(M.tenant_id, M.status, func.count()).group_by(M.tenant_id, M.status))]  # fmt: skip
            attempts = {o: n for o, n in await s.execute(select(A.outcome, func.count()).group_by(A.outcome))}
        return {"messages": by_tenant, "attempts": attempts, "queue": await self.stats()}


class _PostgreSQLInsert:
    """`store`'s inserts on PostgreSQL: messages and recipients from arrays (unnest), the bodies
    as one JSON document of rows."""

    bodies = _PG_INSERT_BODIES

    def __init__(self, rows: list[dict[str, Any]], distinct: bool) -> None:
        self._rows, self._distinct = rows, distinct

    async def messages(self, s: Any) -> list[int]:
        return await (_insert_messages_postgresql if self._distinct else _insert_messages)(s, self._rows)

    async def recipients(self, s: Any, rows: list[tuple[int, int, str]]) -> None:
        await s.execute(_PG_INSERT_RECIPIENTS, {
            "pks": [r[0] for r in rows], "positions": [r[1] for r in rows],
            "addresses": [r[2] for r in rows], "statuses": [PENDING] * len(rows),
        })  # fmt: skip


class _SQLiteInsert:
    """`store`'s inserts on SQLite: every table's rows as one JSON array (json_each), the
    messages' serialized before the write lock is taken."""

    bodies = _SQLITE_INSERT_BODIES

    def __init__(self, rows: list[dict[str, Any]], distinct: bool) -> None:
        self._rows, self._distinct = rows, distinct
        self._messages = json.dumps([
            [sqlite_time(r[c]) if isinstance(r[c], datetime) else r[c] for c in _MESSAGE_COLUMNS] for r in rows
        ]) if distinct else ""  # fmt: skip

    async def messages(self, s: Any) -> list[int]:
        if not self._distinct:
            return await _insert_messages(s, self._rows)
        by_message_id = {mid: pk for pk, mid in await s.execute(_SQLITE_INSERT_MESSAGES, {"rows": self._messages})}
        return [by_message_id[r["message_id"]] for r in self._rows]

    async def recipients(self, s: Any, rows: list[tuple[int, int, str]]) -> None:
        await s.execute(_SQLITE_INSERT_RECIPIENTS, {"rows": json.dumps(rows), "status": PENDING})


def _with_ids(ids: list[int], documents: list[str]) -> str:
    """A JSON array of [id, document] from documents that are JSON already: joined, not encoded
    again (json.dumps would escape each document as a string)."""
    return "[" + ",".join(f"[{pk},{doc}]" for pk, doc in zip(ids, documents, strict=True)) + "]"


MessageState = tuple[int, str, datetime | None, int, int | None, str | None, datetime | None, datetime | None]
RecipientRow = tuple[int, int, str, int | None, str | None, str]  # pk, position, and its RecipientState


class _PostgreSQLRecord:
    """`record`'s writes on PostgreSQL: arrays (unnest) for messages and recipients, one JSON
    document for the attempts (their `results` are JSON themselves)."""

    async def messages(self, s: Any, worker: str, rows: list[MessageState], at: datetime) -> set[int]:
        ids, statuses, due, attempts, servers, errors, sent, slots = (list(c) for c in zip(*rows, strict=True))
        return set((await s.scalars(_PG_RECORD_MESSAGES, {
            "ids": ids, "statuses": statuses, "due": due, "attempts": attempts, "servers": servers,
            "errors": errors, "sent": sent, "slots": slots, "at": at, "worker": worker,
        })).all())  # fmt: skip

    async def recipients(self, s: Any, rows: list[RecipientRow]) -> None:
        pks, positions, statuses, codes, enhanced, texts = (list(c) for c in zip(*rows, strict=True))
        await s.execute(_PG_RECORD_RECIPIENTS, {
            "pks": pks, "positions": positions, "statuses": statuses, "codes": codes, "enhanced": enhanced,
            "texts": texts,
        })  # fmt: skip

    async def attempts(self, s: Any, rows: list[dict[str, Any]]) -> None:
        data = [[r[c].isoformat() if c == "started_at" else r[c] for c in _ATTEMPT_COLUMNS] for r in rows]
        await s.execute(_PG_INSERT_ATTEMPTS, {"rows": json.dumps(data)})


class _SQLiteRecord:
    """`record`'s writes on SQLite: each table's rows as one JSON text, times as SQLite keeps them."""

    async def messages(self, s: Any, worker: str, rows: list[MessageState], at: datetime) -> set[int]:
        data = [(pk, st, sqlite_time(due), n, server, error, sqlite_time(sent), sqlite_time(slot))
                for pk, st, due, n, server, error, sent, slot in rows]  # fmt: skip
        params = {"rows": json.dumps(data), "at": sqlite_time(at), "worker": worker}
        return set((await s.scalars(_SQLITE_RECORD_MESSAGES, params)).all())

    async def recipients(self, s: Any, rows: list[RecipientRow]) -> None:
        await s.execute(_SQLITE_RECORD_RECIPIENTS, {"rows": json.dumps(rows)})

    async def attempts(self, s: Any, rows: list[dict[str, Any]]) -> None:
        data = [[sqlite_time(r[c]) if c == "started_at" else r[c] for c in _ATTEMPT_COLUMNS] for r in rows]
        await s.execute(_SQLITE_INSERT_ATTEMPTS, {"rows": json.dumps(data)})


def _attempt_row(worker: str, o: Outcome) -> dict[str, Any]:
    return {
        "message_pk": o.pk, "number": o.attempts_before + 1, "worker": worker,
        "started_at": o.started_at, "duration_ms": o.duration_ms, "server_scope": o.server_scope,
        "server_id": o.server_id, "server_version": o.server_version, "server": o.server,
        "outcome": o.outcome, "code": o.code, "enhanced": o.enhanced, "text": storable(o.text),
        "results": [{k: storable(v) if isinstance(v, str) else v for k, v in r.items()} for r in o.results],
        "note": storable(o.note),
    }  # fmt: skip


# What neither database stores as text: NUL (PostgreSQL refuses it) and lone surrogates (not
# UTF-8: PostgreSQL refuses them, SQLite's JSON functions write bytes no reader can decode).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@overload
def storable(text: str) -> str: ...
@overload
def storable(text: None) -> None: ...
def storable(text: str | None) -> str | None:
    """`text` as both databases can store and read it back: what they can't, replaced by U+FFFD.
    A server's reply, an error's text or a subject may carry anything; one such text must not
    make a message unreadable, nor its outcome unwritable (the worker would stop recording)."""
    if text is None or ("\x00" not in text and (text.isascii() or _UNSTORABLE.search(text) is None)):
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _unreadable(r: Any, pending: list[tuple[int, str]], accepted: int, e: Exception) -> Outcome:
    """A claimed message whose stored form can't be read: it fails (sent, if some recipients
    accepted it before) with the reason, without quoting what it holds."""
    why = f"mailgate could not read the stored message ({type(e).__name__}); it was not sent"
    return Outcome(r.id, now(), 0, "error", why, SENT if accepted else FAILED, None,
                   recipients={pos: (REFUSED, None, None, why) for pos, _ in pending}, last_error=why,
                   attempts_before=r.attempts)  # fmt: skip


async def _message(s: Any, pk: int, tenant_id: str | None, *, lock: bool = False) -> MessageRow:
    """The message, if it exists and (when `tenant_id` is given) belongs to that tenant: another
    tenant's message does not exist, as far as the caller can tell."""
    if not 0 < pk <= MAX_ID:  # past a 64-bit id no message can exist (and the driver would refuse it)
        raise NotFound([("message", f"there is no message {pk}")])
    row: MessageRow | None = await s.get(MessageRow, pk, with_for_update=lock)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound([("message", f"there is no message {pk}")])
    return row


async def _summary_now(s: Any, row: MessageRow) -> MessageSummary:
    await s.flush()
    counts = await _recipient_counts(s, [row.id])
    return _summary(row, counts.get(row.id, {}))


async def _recipient_counts(s: Any, pks: list[int]) -> dict[int, dict[str, int]]:
    if not pks:
        return {}
    R = MessageRecipient
    counts: dict[int, dict[str, int]] = {}
    query = select(R.message_pk, R.status, func.count()).where(R.message_pk.in_(pks)).group_by(R.message_pk, R.status)
    for pk, st, n in await s.execute(query):
        counts.setdefault(pk, {})[st] = n
    return counts


def _summary(row: MessageRow, counts: dict[str, int]) -> MessageSummary:
    return MessageSummary(
        row.id, row.tenant_id, row.status, row.subject, row.message_id, row.created_at, row.updated_at,
        row.due_at, row.attempts, {k: counts.get(k, 0) for k in (PENDING, ACCEPTED, REFUSED)}, row.last_error,
    )  # fmt: skip


def _attempt_dict(a: AttemptRow) -> dict[str, Any]:
    return {
        "number": a.number,
        "started_at": a.started_at.isoformat(),
        "duration_ms": a.duration_ms,
        "worker": a.worker,
        "server": {"scope": a.server_scope, "id": a.server_id, "version": a.server_version, "address": a.server},
        "outcome": a.outcome,
        "code": a.code,
        "enhanced": a.enhanced,
        "text": a.text,
        "results": a.results,
        "note": a.note,
    }
