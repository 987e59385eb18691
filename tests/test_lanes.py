"""The worker's lanes: one per mail server, so a slow, failing or black-holed server ties up only
its own senders; senders rotate between lanes when there are fewer senders than lanes; a server
that failed holds its lane back instead of being tried once per message. Real aiosmtpd and
scripted servers; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from mailgate import Mailgate
from mailgate.outbox.worker import RESOLVE_TTL, SLOW_START
from smtp_servers import ScriptedServer, ServerConfig, scripted, serve
from test_outbox import FAST, Opener, drain, note, open_mg, server_doc, status

__all__ = ["open_mg"]  # the fixture


async def tenants_with_own_servers(mg: Mailgate, servers: dict[str, Any], **connection: Any) -> None:
    for name, server in servers.items():
        await mg.tenants.add(name, may_use_own_server=True)
        doc = server_doc(server)
        doc["connection"] = {**doc["connection"], **connection}
        await mg.servers.set(name, doc)


def smtp_connections(server: ScriptedServer) -> int:
    """Connections that waited for an SMTP greeting, not the client's checks whether a silent port
    speaks TLS (a second connection that starts a TLS handshake)."""
    return sum(1 for c in server.connections if not c.received.startswith(b"\x16"))


async def test_a_black_holed_server_does_not_hold_up_other_tenants(open_mg: Opener) -> None:
    # Fewer senders than the black hole's pool would take without lanes: every one of them would
    # wait on it, and the good tenant would get nothing until the timeouts.
    mg = await open_mg(dataclasses.replace(FAST, concurrency=4, stop_grace=5))
    async with scripted("silent") as hole, serve(ServerConfig()) as good:
        await mg.servers.set("global", server_doc(good))
        await tenants_with_own_servers(mg, {"stuck": hole}, pool_size=3, connect_timeout=3, protocol_timeout=3)
        await mg.tenants.add("fine")
        stuck = [await mg.submit("stuck", note(subject=f"stuck {i}")) for i in range(20)]
        fine = [await mg.submit("fine", note(subject=f"fine {i}")) for i in range(20)]
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        await good.wait_for_messages(20, timeout=10)
        # Every good message went while the black hole's first connections still hung.
        assert {await status(mg, pk) for pk in stuck} == {"sending"}
        assert smtp_connections(hole) <= 3
        await asyncio.sleep(3.5)  # the black hole's connections time out
        stop.set()
        await asyncio.wait_for(worker, 15)
        await hole.wait_until(lambda: all(c.closed for c in hole.connections))
    assert [await status(mg, pk) for pk in fine] == ["sent"] * 20
    details = [(await mg.queue.get(pk)).to_dict() for pk in stuck]
    assert {d["status"] for d in details} <= {"deferred", "queued"}  # waiting, or given back at the stop
    # Only the first wave's connections were tried (each for the messages its sender had taken);
    # the rest, and every message due again meanwhile (fast retries here), waited untried.
    assert smtp_connections(hole) <= 3
    tried = [a for d in details for a in d["attempt_log"] if "not tried" not in (a["note"] or "")]
    assert all(a["number"] == 1 for a in tried)
    assert any("not tried" in (a["note"] or "") for d in details for a in d["attempt_log"])
    assert all("did not answer" in d["last_error"] for d in details if d["status"] == "deferred")


async def test_a_black_hole_with_a_huge_pool_takes_two_senders_not_all(open_mg: Opener) -> None:
    # A hostile tenant sets pool_size far above the worker's senders and points the server at a
    # port that never greets: until its server takes a message, a lane gets SLOW_START senders.
    mg = await open_mg(dataclasses.replace(FAST, concurrency=6, stop_grace=5))
    async with scripted("silent") as hole, serve(ServerConfig()) as good:
        await mg.servers.set("global", server_doc(good))
        await tenants_with_own_servers(mg, {"stuck": hole}, pool_size=1000, connect_timeout=5, protocol_timeout=5)
        await mg.tenants.add("fine")
        stuck = await mg.submit_many("stuck", [note(subject=f"stuck {i}") for i in range(60)])
        fine = await mg.submit_many("fine", [note(subject=f"fine {i}") for i in range(30)])
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        await good.wait_for_messages(30, timeout=10)
        held = smtp_connections(hole)
        assert {await status(mg, pk) for pk in stuck} <= {"sending", "queued"}  # still hanging
        stop.set()
        await asyncio.wait_for(worker, 15)
    assert held == SLOW_START, held  # without the slow start: all six senders hung on the hole
    assert [await status(mg, pk) for pk in fine] == ["sent"] * 30


async def test_senders_rotate_between_lanes_when_there_are_fewer_senders_than_lanes(open_mg: Opener) -> None:
    mg = await open_mg(dataclasses.replace(FAST, concurrency=2))
    async with serve(ServerConfig()) as server:
        names = [f"t{i}" for i in range(6)]
        await tenants_with_own_servers(mg, dict.fromkeys(names, server))
        await mg.servers.set("global", server_doc(server))
        for name in names:  # all of one tenant's messages first, as a backlog would be
            await mg.submit_many(name, [note(subject=f"{name} {i}") for i in range(20)])
        await drain(mg)
        received = await server.wait_for_messages(120)
    # A sender takes up to 8 of its lane's messages at once (pipelined), then makes room: without
    # rotation the first 48 would be t0's, t1's and part of t2's.
    first = [m.parsed()["Subject"].split()[0] for m in received[:48]]
    assert set(first) == set(names), first  # every tenant had its turn early
    assert len(received) == 120


async def test_a_server_that_refuses_connections_holds_its_lane_back(open_mg: Opener) -> None:
    mg = await open_mg(dataclasses.replace(FAST, concurrency=10))
    async with scripted("greeting-421") as busy:
        await mg.tenants.add("acme")
        doc = server_doc(busy)
        doc["connection"] = {**doc["connection"], "pool_size": 2}
        await mg.servers.set("global", doc)
        pks = [await mg.submit("acme", note(subject=f"n {i}")) for i in range(30)]
        await mg.run_worker(until_idle=True)
    details = [(await mg.queue.get(pk)).to_dict() for pk in pks]
    assert {d["status"] for d in details} == {"deferred"}
    tried = [a for d in details for a in d["attempt_log"] if "not tried" not in (a["note"] or "")]
    assert busy.connection_count <= 2  # the lane's connections, not one per message
    assert tried and all(a["number"] == 1 for a in tried)  # no message was tried twice
    assert any("not tried" in (a["note"] or "") for d in details for a in d["attempt_log"])
    assert all("421" in d["last_error"] for d in details)


async def test_a_running_worker_picks_up_new_settings_within_the_resolve_ttl(open_mg: Opener) -> None:
    # Resolutions are reused for RESOLVE_TTL seconds (a lookup costs more than a send); new
    # settings must still reach a worker that keeps running.
    mg = await open_mg()
    async with serve(ServerConfig()) as first, serve(ServerConfig()) as second:
        await mg.tenants.add("acme")
        await mg.servers.set("global", server_doc(first))
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            await mg.submit("acme", note(subject="before"))
            await first.wait_for_messages(1)
            await mg.servers.set("global", server_doc(second))
            await asyncio.sleep(RESOLVE_TTL + 0.2)
            await mg.submit("acme", note(subject="after"))
            await second.wait_for_messages(1, timeout=5)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert [m.parsed()["Subject"] for m in first.messages] == ["before"]
    assert [m.parsed()["Subject"] for m in second.messages] == ["after"]
