"""A mail server's quotas, shared by every worker through the database.

Rates (`messages_per_minute`, `recipients_per_day`) are kept with the generic cell rate algorithm:
one row per (server, kind) holds the theoretical arrival time `tat`; a reservation of `n` units
moves it on by `n × 2 × window / limit` in a single UPDATE, and the units may go at
`tat − window` (now, or later). That allows a burst of half the limit at once and spreads the
rest evenly, so no sliding window of that length ever sees more than the limit — which is how
providers count (Exchange Online: 30 messages in any minute, 10,000 recipients in any 24 hours).
A message that must wait keeps its place: it is deferred to that time, and then sent without
reserving again (`messages.quota_slot`).

`max_concurrent_connections` is a set of numbered slots per server; a worker's open connection
holds one, renews it while open (`renew`), and frees it when closed; a dead worker's slots free
themselves when their lease runs out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, case, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from ..db.engine import Database
from ..db.models import ConnectionSlot, QuotaState
from ..settings.document import QuotaSettings

log = logging.getLogger("mailgate.worker")

WINDOWS = {"messages_per_minute": 60.0, "recipients_per_day": 86400.0}
SLOT_LEASE = 60.0  # seconds a connection slot stays held without renewal

_QUOTA = cast(Table, QuotaState.__table__)
_SLOTS = cast(Table, ConnectionSlot.__table__)


@dataclass(frozen=True)
class Reservation:
    """When a message may go. `kind` and `limit` name the quota that makes it wait, if any."""

    at: float  # Unix seconds
    kind: str | None = None
    limit: int | None = None

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.at, UTC)

    def explain(self) -> str:
        return (f"waiting for the mail server's quota: {self.kind} is {self.limit}; this message has its place at "
                f"{self.when:%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip


def rates(quota: QuotaSettings, recipients: int) -> list[tuple[str, int, int]]:
    """(kind, limit, units) of the rate quotas that apply; a message never asks for more than
    half a limit at once (more could never fit in one burst)."""
    wanted = [("messages_per_minute", quota.messages_per_minute, 1), ("recipients_per_day", quota.recipients_per_day,
              recipients)]  # fmt: skip
    return [(kind, limit, max(1, min(units, limit // 2 or 1))) for kind, limit, units in wanted if limit]


class Quotas:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _insert_ignore(self, table: Table, rows: Sequence[dict[str, Any]]) -> Any:
        dialect = postgresql if not self.db.is_sqlite else sqlite
        return dialect.insert(table).values(list(rows)).on_conflict_do_nothing()

    async def reserve(self, server_id: int, quota: QuotaSettings, recipients: int) -> Reservation:
        """Take this message's place within the server's rate quotas (one transaction)."""
        wanted = rates(quota, recipients)
        if not wanted:
            return Reservation(time.time())
        Q = _QUOTA.c
        async with self.db.write() as s:
            # The time once the write lock is held: reservations are made in the lock's order,
            # and one that waited for it must not count from before the others it waited for.
            now = time.time()
            latest = Reservation(now)
            await s.execute(self._insert_ignore(_QUOTA, [{"server_id": server_id, "kind": k, "tat": 0.0}
                                                         for k, _, _ in wanted]))  # fmt: skip
            for kind, limit, units in wanted:
                window = WINDOWS[kind]
                step = units * 2 * window / limit
                moved = (
                    update(_QUOTA)
                    .where(Q.server_id == server_id, Q.kind == kind)
                    .values(tat=case((Q.tat > now, Q.tat), else_=now) + step)
                    .returning(Q.tat)
                )
                at = (await s.execute(moved)).scalar_one() - window
                if at > latest.at:
                    latest = Reservation(at, kind, limit)
        return latest

    async def acquire_connection(self, server_id: int, limit: int, owner: str) -> int | None:
        """A free connection slot of this server for `owner`, or None when all are held."""
        now = time.time()
        C = _SLOTS.c
        async with self.db.write() as s:
            await s.execute(self._insert_ignore(_SLOTS, [{"server_id": server_id, "slot": i, "owner": None,
                                                          "expires_at": 0.0} for i in range(limit)]))  # fmt: skip
            free = (
                select(C.slot)
                .where(C.server_id == server_id, C.slot < limit, or_(C.owner.is_(None), C.expires_at < now))
                .order_by(C.slot)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            taken = (
                update(_SLOTS)
                .where(C.server_id == server_id, C.slot == free.scalar_subquery())
                .values(owner=owner, expires_at=now + SLOT_LEASE)
                .returning(C.slot)
            )
            slot = (await s.execute(taken)).scalar()
            return None if slot is None else int(slot)

    async def release_connection(self, server_id: int, slot: int, owner: str) -> None:
        C = _SLOTS.c
        async with self.db.write() as s:
            await s.execute(
                update(_SLOTS)
                .where(C.server_id == server_id, C.slot == slot, C.owner == owner)
                .values(owner=None, expires_at=0.0)
            )

    async def renew(self, owner: str) -> None:
        """Keep the slots of `owner`'s open connections."""
        C = _SLOTS.c
        async with self.db.write() as s:
            await s.execute(update(_SLOTS).where(C.owner == owner).values(expires_at=time.time() + SLOT_LEASE))


class ConnectionSlots:
    """The pools' admission to a server's max_concurrent_connections, for one worker. A database
    that fails counts as "no slot now": the messages wait, they are not lost."""

    def __init__(self, quotas: Quotas, owner: str) -> None:
        self.quotas = quotas
        self.owner = owner
        self.held = 0  # slots this worker's open connections hold

    async def acquire(self, server_id: int, limit: int) -> int | None:
        try:
            slot = await self.quotas.acquire_connection(server_id, limit, self.owner)
        except (SQLAlchemyError, OSError) as e:
            log.warning("could not take a connection slot of mail server %s: %s", server_id, e)
            return None
        if slot is not None:
            self.held += 1
        return slot

    async def release(self, server_id: int, slot: int) -> None:
        self.held -= 1  # freed here or, if the database fails, when its lease runs out
        try:
            await self.quotas.release_connection(server_id, slot, self.owner)
        except (SQLAlchemyError, OSError) as e:
            log.warning("could not free a connection slot of mail server %s: %s", server_id, e)

    async def renew(self) -> None:
        """Keep the slots of this worker's open connections; nothing to write when it holds none."""
        if self.held:
            await self.quotas.renew(self.owner)
