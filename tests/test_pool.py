"""Connection pools against real aiosmtpd and scripted servers: idle checks, idle closing,
messages per connection, the global connection budget and its fairness, settings changes."""

from __future__ import annotations

import asyncio
from typing import Any

from mailgate import Message
from mailgate.message import Envelope
from mailgate.settings.document import MailServer
from mailgate.transports.pool import ConnectionBudget, Pools, ServerPool, pool_size
from mailgate.transports.smtp import SMTPTransport
from smtp_servers import RecordingServer, ScriptedServer, ServerConfig, scripted, serve

ENVELOPE = Envelope("no-reply@example.com", ("alice@example.org",))


def doc(server: RecordingServer | ScriptedServer, **connection: Any) -> MailServer:
    return MailServer.model_validate({
        "from_address": "no-reply@example.com",
        "smtp": {"host": server.host, "port": server.port, "security": "none"},
        "connection": {"connect_timeout": 5, "protocol_timeout": 2, **connection},
    })  # fmt: skip


def note(i: int = 0) -> Message:
    return Message(from_="no-reply@example.com", to="alice@example.org", subject=f"note {i}", text="hello")


def pool_of(server: MailServer, budget: ConnectionBudget | None = None) -> ServerPool:
    return ServerPool(
        lambda: SMTPTransport.from_server(server), pool_size(server), max_idle=server.connection.max_idle, budget=budget
    )


async def send_through(pool: ServerPool, i: int = 0) -> SMTPTransport:
    async with pool.transport() as t:
        delivery = await t.send(ENVELOPE, note(i))
        assert delivery.results[0].accepted
        assert isinstance(t, SMTPTransport)
        return t


async def test_a_connection_idle_longer_than_check_idle_after_gets_a_noop_first() -> None:
    async with serve(ServerConfig()) as server:
        pool = pool_of(doc(server, check_idle_after=0.2))
        await send_through(pool, 1)
        await send_through(pool, 2)  # at once: no NOOP
        await asyncio.sleep(0.4)
        await send_through(pool, 3)
        await pool.aclose()
    assert server.connection_count == 1
    verbs = [c.split()[0].upper() for c in server.connections[0].commands]
    assert verbs.count("NOOP") == 1
    assert verbs.index("NOOP") > [i for i, v in enumerate(verbs) if v == "MAIL"][1]  # before the third message
    assert len(server.messages) == 3


async def test_a_kept_connection_that_fails_its_noop_is_replaced_and_the_message_still_goes() -> None:
    async with scripted("silent-after-message") as server:
        pool = pool_of(doc(server, check_idle_after=0.1, protocol_timeout=0.5))
        first = await send_through(pool, 1)
        await asyncio.sleep(0.2)
        second = await send_through(pool, 2)
        await pool.aclose()
    assert first is second and second.replaced_stale == 1 and second.connections == 2
    assert server.connection_count == 2
    assert b"NOOP" in bytes(server.connections[0].received)
    assert b"Subject: note 2" in bytes(server.connections[1].received)


async def test_at_most_max_messages_per_connection() -> None:
    async with serve(ServerConfig()) as server:
        pool = pool_of(doc(server, max_messages_per_connection=2, pool_size=1))
        for i in range(5):
            await send_through(pool, i)
        await pool.aclose()
    assert server.connection_count == 3
    assert [sum(1 for c in conn.commands if c.upper().startswith("MAIL")) for conn in server.connections] == [2, 2, 1]
    assert len(server.messages) == 5


async def test_connections_idle_longer_than_max_idle_are_closed() -> None:
    async with serve(ServerConfig()) as server:
        pool = pool_of(doc(server, max_idle=0.2))
        await send_through(pool)
        assert pool.sweep() == 0 and pool.count == 1
        await asyncio.sleep(0.35)
        assert pool.sweep() == 1 and pool.count == 0
        await server.wait_until(lambda: server.connections[0].closed)
        assert server.connections[0].commands[-1].upper() == "QUIT"
        await send_through(pool)  # a new one when needed
        await pool.aclose()
    assert server.connection_count == 2


async def test_a_quota_of_concurrent_connections_caps_the_pool() -> None:
    async with serve(ServerConfig()) as server:
        server_doc = doc(server, pool_size=10)
        assert pool_size(server_doc) == 10
        capped = MailServer.model_validate({**server_doc.model_dump(), "quota": {"max_concurrent_connections": 3}})
        pool = pool_of(capped)
        assert pool.size == 3
        await asyncio.gather(*(send_through(pool, i) for i in range(12)))
        await pool.aclose()
    assert server.connection_count == 3 and len(server.messages) == 12


async def test_the_budget_takes_an_idle_connection_from_the_pool_that_holds_most() -> None:
    async with serve(ServerConfig()) as a_server, serve(ServerConfig()) as b_server:
        budget = ConnectionBudget(2)
        a, b = pool_of(doc(a_server), budget), pool_of(doc(b_server), budget)
        await asyncio.gather(send_through(a, 1), send_through(a, 2))  # two connections, now idle
        assert (a.count, a.idle_count, budget.open) == (2, 2, 2)
        await send_through(b)
        assert (a.count, b.count, budget.open) == (1, 1, 2)
        await a_server.wait_until(lambda: sum(c.closed for c in a_server.connections) == 1)
        await a.aclose()
        await b.aclose()
    assert budget.open == 0


async def test_a_pool_with_a_big_backlog_gives_up_connections_to_a_waiting_pool() -> None:
    async with serve(ServerConfig()) as a_server, serve(ServerConfig()) as b_server:
        budget = ConnectionBudget(2)
        a, b = pool_of(doc(a_server), budget), pool_of(doc(b_server), budget)
        release_a = asyncio.Event()
        holding = asyncio.Event()

        async def busy_a() -> None:
            async with a.transport() as t:
                holding.set()
                await t.send(ENVELOPE, note())
                await release_a.wait()

        a_tasks = [asyncio.create_task(busy_a()) for _ in range(2)]
        await holding.wait()
        await asyncio.sleep(0.1)
        assert budget.open == 2 and budget.held(a) == 2
        b_task = asyncio.create_task(send_through(b))
        await asyncio.sleep(0.1)
        assert not b_task.done()  # waits: every connection is in use
        release_a.set()
        await asyncio.wait_for(b_task, 5)
        await asyncio.gather(*a_tasks)
        # A gave one up rather than keep both idle while B waited.
        assert budget.held(a) == 1 and budget.held(b) == 1 and budget.open == 2
        await a.aclose()
        await b.aclose()


async def test_a_waiter_that_is_cancelled_leaves_the_budget_whole() -> None:
    async with serve(ServerConfig()) as server:
        budget = ConnectionBudget(1)
        a, b = pool_of(doc(server), budget), pool_of(doc(server), budget)
        async with a.transport():
            waiter = asyncio.create_task(send_through(b))
            await asyncio.sleep(0.05)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        assert budget.open == 1 and budget.held(b) == 0
        await send_through(b)  # A's idle one is closed for it
        assert budget.held(b) == 1 and budget.held(a) == 0
        await a.aclose()
        await b.aclose()


async def test_a_settings_change_drains_the_old_pool_and_never_reuses_its_connections() -> None:
    async with serve(ServerConfig()) as server:
        pools = Pools(max_connections=10)
        old = pools.get(7, 1, doc(server))
        first = await send_through(old)
        new = pools.get(7, 2, doc(server))
        assert new is not old
        second = await send_through(new)
        assert second is not first
        await server.wait_until(lambda: server.connections[0].closed)
        assert server.connections[0].commands[-1].upper() == "QUIT"
        assert pools.open_connections == 1
        await pools.aclose()
    assert server.connection_count == 2
    assert pools.open_connections == 0
