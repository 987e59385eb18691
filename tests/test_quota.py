"""Quotas per mail server, shared by every worker through the database: rates that never exceed
their limit in any sliding window, messages over quota that wait (visibly) instead of failing and
keep their place, and connection slots across workers. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from sqlalchemy import select, update

from mailgate import Mailgate
from mailgate.db.models import ConnectionSlot, MessageRow, QuotaState, now
from mailgate.outbox.quota import SLOT_LEASE, Quotas
from mailgate.settings.document import QuotaSettings
from smtp_servers import ServerConfig, serve
from test_outbox import Opener, note, open_mg, setup, status

__all__ = ["open_mg"]


async def server_id(mg: Mailgate) -> int:
    resolution = await mg.resolve("acme")
    assert resolution.server_id is not None
    return resolution.server_id


def most_in_any_window(times: list[float], window: float, weights: list[int] | None = None) -> int:
    weights = weights or [1] * len(times)
    pairs = sorted(zip(times, weights, strict=True))
    return max(sum(w for t, w in pairs if start <= t < start + window) for start, _ in pairs)


async def test_a_rate_never_exceeds_its_limit_in_any_window_even_from_two_workers(open_mg: Opener) -> None:
    one, two = await open_mg(), await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(one, server)
        sid = await server_id(one)
        quota = QuotaSettings(messages_per_minute=30)
        a, b = Quotas(one.db), Quotas(two.db)
        start = time.time()
        places = await asyncio.gather(*(q.reserve(sid, quota, 1) for _ in range(50) for q in (a, b)))
    times = [p.at for p in places]
    assert most_in_any_window(times, 60.0) <= 30
    now_ = [t for t in times if t <= start + 1]
    assert len(now_) == 15  # half the limit at once
    later = sorted(t for t in times if t > start + 1)
    assert later[0] - start < 6 and all(round(y - x, 3) == 4.0 for x, y in itertools.pairwise(later))
    waiting = [p for p in places if p.kind is not None]
    assert len(waiting) == 85 and all(p.kind == "messages_per_minute" and p.limit == 30 for p in waiting)


async def test_recipients_count_as_many_units(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        sid = await server_id(mg)
        quota = QuotaSettings(recipients_per_day=100)
        q = Quotas(mg.db)
        start = time.time()
        places = [await q.reserve(sid, quota, n) for n in (20, 20, 10, 1)]
    assert all(p.at <= start + 1 for p in places[:3])  # 50: half the daily limit at once
    assert places[3].at > start + 1000 and places[3].kind == "recipients_per_day"
    assert most_in_any_window([p.at for p in places], 86400.0, [20, 20, 10, 1]) <= 100


async def test_messages_over_quota_wait_visibly_keep_their_place_and_never_fail(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server, quota={"messages_per_minute": 4})
        pks = [await mg.submit("acme", note(subject=f"n {i}")) for i in range(5)]
        await mg.run_worker(until_idle=True)
        assert len(server.messages) == 2  # half of 4 at once
        details = [(await mg.queue.get(pk)).to_dict() for pk in pks]
        assert sorted(d["status"] for d in details) == ["deferred"] * 3 + ["sent"] * 2
        waiting = [d for d in details if d["status"] == "deferred"]
        assert all(d["attempts"] == 0 for d in waiting)  # waiting is not an attempt
        for d in waiting:
            last = d["attempt_log"][-1]
            assert last["outcome"] == "quota" and "messages_per_minute is 4" in last["text"]
            assert "messages_per_minute is 4" in d["last_error"]
        nexts = sorted(d["next_attempt_at"] for d in waiting)
        assert len(set(nexts)) == 3  # each its own place, 30 s apart
        sid = await server_id(mg)
        async with mg.db.sessions() as s:
            tat_before = (await s.scalars(select(QuotaState.tat).where(QuotaState.server_id == sid))).one()
        # Time passes: their places come. They go without reserving again.
        async with mg.db.write() as s:
            await s.execute(
                update(MessageRow)
                .where(MessageRow.id.in_([d["id"] for d in waiting]))
                .values(due_at=now(), quota_slot=now())
            )
        await mg.run_worker(until_idle=True)
        await server.wait_for_messages(5)
        async with mg.db.sessions() as s:
            tat_after = (await s.scalars(select(QuotaState.tat).where(QuotaState.server_id == sid))).one()
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 5
    assert tat_after == tat_before


async def test_connection_slots_are_shared_and_a_dead_workers_slot_frees_itself(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        sid = await server_id(mg)
        q = Quotas(mg.db)
        assert [await q.acquire_connection(sid, 2, w) for w in ("a", "b", "c")] == [0, 1, None]
        await q.release_connection(sid, 0, "a")
        assert await q.acquire_connection(sid, 2, "c") == 0
        assert await q.acquire_connection(sid, 2, "d") is None
        await q.release_connection(sid, 1, "not-b")  # only its owner frees a slot
        assert await q.acquire_connection(sid, 2, "d") is None
        # "b" dies: its lease runs out.
        async with mg.db.write() as s:
            await s.execute(
                update(ConnectionSlot).where(ConnectionSlot.owner == "b").values(expires_at=time.time() - 1)
            )
        assert await q.acquire_connection(sid, 2, "d") == 1
        await q.renew("d")
        async with mg.db.sessions() as s:
            expires = (await s.scalars(select(ConnectionSlot.expires_at).where(ConnectionSlot.owner == "d"))).one()
    assert expires > time.time() + SLOT_LEASE - 5


async def test_a_worker_waits_while_other_workers_hold_every_connection_slot(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server, quota={"max_concurrent_connections": 1})
        sid = await server_id(mg)
        q = Quotas(mg.db)
        assert await q.acquire_connection(sid, 1, "another-worker") == 0
        pks = [await mg.submit("acme", note(subject=f"n {i}")) for i in range(3)]
        await mg.run_worker(until_idle=True)
        assert server.connection_count == 0
        details: list[dict[str, Any]] = [(await mg.queue.get(pk)).to_dict() for pk in pks]
        assert {d["status"] for d in details} == {"deferred"}
        assert all("max_concurrent_connections is 1" in d["last_error"] for d in details)
        assert all(d["attempts"] == 0 and d["attempt_log"][-1]["outcome"] == "quota" for d in details)
        # The other worker closes its connection: ours may go.
        await q.release_connection(sid, 0, "another-worker")
        async with mg.db.write() as s:
            await s.execute(update(MessageRow).values(due_at=now()))
        await mg.run_worker(until_idle=True)
        await server.wait_for_messages(3)
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 3
    assert server.connection_count == 1
    # Its slot was given back when the worker closed its connection.
    assert await Quotas(mg.db).acquire_connection(sid, 1, "another-worker") == 0
