"""Connections to mail servers, kept between messages.

One `ServerPool` per (server id, settings version), so a settings change never reuses a connection
made with the old settings: asking for a newer version drains the old pool (its sends finish, then
its connections close). What a server taught one connection (its recipient limit) holds for the
whole pool. A pool holds up to `pool_size` transports (fewer when the server's quota
allows fewer concurrent connections); each SMTP transport is one connection, which it checks with
a NOOP when it was idle longer than `check_idle_after` (0: before every reuse), replaces after
`max_messages_per_connection` messages and closes before its XOAUTH2 token expires. The pool
closes transports idle longer than `max_idle`.

All pools share one `ConnectionBudget`: a cap on the connections open at once in this process.
The budget is shared max-min fairly: when it is used up, a pool that wants a connection takes an
idle one from the pool that holds the most, and a pool that holds more than a waiting pool gives
its connection up when its send is done instead of keeping it idle. A tenant with a huge backlog
can't hold every connection.

Graph servers get one Graph transport over the shared HTTP client, which allows 4 requests in
flight per mailbox; HTTP connections are the HTTP client's business, outside the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from ..destinations import DestinationPolicy, Destinations
from ..errors import DeliveryError
from ..oauth.cache import TokenCache, TokenHandle, graph_token_source, smtp_token_source
from ..settings.document import MailServer, OAuth2AuthSettings
from ..smtp.auth import LearntMechanism
from ..smtp.client import RecipientLimit
from ..smtp.protocol import ProtocolLog
from .base import Transport
from .graph import GraphTransport, MailboxSlots
from .smtp import SMTPTransport

# Stores a rotated refresh token for (server id, version).
RefreshTokenStore = Callable[[int, int, str], Awaitable[bool]]

FORGET_AFTER = 600.0  # seconds: an empty, unused pool is dropped (its token handle with it)
SLOT_WAIT = 5.0  # seconds a lane waits before asking again for a connection slot held elsewhere


class Admission(Protocol):
    """Connection slots of servers with `max_concurrent_connections`, shared with other workers."""

    async def acquire(self, server_id: int, limit: int) -> int | None: ...

    async def release(self, server_id: int, slot: int) -> None: ...


class QuotaWait(DeliveryError):
    """Not a failure: the server's quota allows no more now. Its messages wait (retry_after)."""

    transient = True


def pool_size(server: MailServer) -> int:
    """How many connections to this server at once: its pool_size, or fewer when its quota says so."""
    limit = server.quota.max_concurrent_connections
    return min(server.connection.pool_size, limit) if limit else server.connection.pool_size


class ConnectionBudget:
    """At most `limit` connections open at once across all pools, shared max-min fairly."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection budget must be at least 1")
        self.limit = limit
        self.open = 0
        self._held: dict[ServerPool, int] = {}
        self._waiting: dict[ServerPool, deque[asyncio.Future[None]]] = {}

    def held(self, pool: ServerPool) -> int:
        return self._held.get(pool, 0)

    async def acquire(self, pool: ServerPool) -> None:
        """One more connection for `pool`; waits while the budget is used up and no idle
        connection of another pool can be closed for it."""
        if self.open < self.limit and not self._waiting:
            self._grant(pool)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(pool, deque()).append(future)
        self._evict_for()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(pool)  # granted, but its taker is gone
            else:
                self._forget(pool, future)
            raise

    def release(self, pool: ServerPool) -> None:
        """A connection of `pool` is gone: its place goes to the waiting pool that holds fewest."""
        held = self._held.get(pool, 0) - 1
        if held > 0:
            self._held[pool] = held
        else:
            self._held.pop(pool, None)
        self.open -= 1
        while self.open < self.limit and self._waiting:
            taker = min(self._waiting, key=self.held)
            future = self._waiting[taker].popleft()
            if not self._waiting[taker]:
                del self._waiting[taker]
            if not future.done():
                self._grant(taker)
                future.set_result(None)

    def should_give_up(self, pool: ServerPool) -> bool:
        """True when a pool is waiting that holds fewer connections than `pool` would keep:
        `pool` then closes a connection it has done with instead of keeping it idle."""
        if not self._waiting:
            return False
        fewest = min(self.held(p) for p in self._waiting)
        return self.held(pool) > fewest + 1

    def _grant(self, pool: ServerPool) -> None:
        self._held[pool] = self._held.get(pool, 0) + 1
        self.open += 1

    def _forget(self, pool: ServerPool, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(pool)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(future)
            if not queue:
                del self._waiting[pool]

    def _evict_for(self) -> None:
        """Close idle connections of the pools that hold most, while someone waits."""
        while self._waiting and self.open >= self.limit:
            candidates = [p for p in self._held if p.idle_count]
            if not candidates:
                return
            victim = max(candidates, key=self.held)
            victim.close_idle(1)


class ServerPool:
    """Up to `size` transports for one mail server; a send borrows one for its duration."""

    def __init__(
        self,
        make: Callable[[], Transport],
        size: int,
        *,
        max_idle: float | None = None,
        budget: ConnectionBudget | None = None,
        admission: tuple[Admission, int, int] | None = None,  # (slots, server id, limit)
    ) -> None:
        self._make = make
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[float, Transport]] = []  # (idle since, transport), oldest first
        self._count = 0  # transports that exist: idle and borrowed
        self._max_idle = max_idle
        self._budget = budget
        self._closing: set[asyncio.Task[None]] = set()
        self._admission = admission
        self._held_slots: dict[int, int] = {}  # id(transport) → its connection slot
        self.used_at = time.monotonic()
        self.opened = 0  # transports made, ever (for tests and metrics)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def count(self) -> int:
        return self._count

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        async with self._slots:
            self.close_idle(max_idle=self._max_idle)
            if self._idle:
                transport = self._idle.pop()[1]  # the most recently used: likeliest to be alive
            else:
                if self._budget is not None:
                    await self._budget.acquire(self)
                try:
                    slot = await self._admit()
                    transport = self._make()
                except BaseException:
                    if self._budget is not None:
                        self._budget.release(self)
                    raise
                if slot is not None:
                    self._held_slots[id(transport)] = slot
                self._count += 1
                self.opened += 1
            try:
                yield transport
            finally:
                self.used_at = time.monotonic()
                if self._budget is not None and self._budget.should_give_up(self):
                    self._close(transport)
                else:
                    self._idle.append((self.used_at, transport))

    async def _admit(self) -> int | None:
        """A connection slot when the server's quota limits connections across workers."""
        if self._admission is None:
            return None
        slots, server_id, limit = self._admission
        slot = await slots.acquire(server_id, limit)
        if slot is None:
            raise QuotaWait(
                f"waiting for the mail server's quota: max_concurrent_connections is {limit}, all in use by other "
                "workers",
                retry_after=SLOT_WAIT,
            )
        return slot

    def close_idle(self, count: int | None = None, *, max_idle: float | None = None) -> int:
        """Close idle transports, oldest first: `count` of them, or those idle longer than
        `max_idle` seconds. Returns how many."""
        now = time.monotonic()
        closed = 0
        while self._idle and (count is None or closed < count):
            since, transport = self._idle[0]
            if max_idle is not None and now - since <= max_idle:
                break
            self._idle.pop(0)
            self._close(transport)
            closed += 1
        return closed

    def _close(self, transport: Transport) -> None:
        """Close in the background (a polite QUIT takes a round trip); its budget is free at once."""
        self._count -= 1
        if self._budget is not None:
            self._budget.release(self)
        slot = self._held_slots.pop(id(transport), None)
        task = asyncio.get_running_loop().create_task(self._close_and_free(transport, slot))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_and_free(self, transport: Transport, slot: int | None) -> None:
        try:
            await transport.aclose()
        finally:
            if slot is not None and self._admission is not None:
                slots, server_id, _ = self._admission
                await slots.release(server_id, slot)

    def sweep(self) -> int:
        return self.close_idle(max_idle=self._max_idle) if self._max_idle is not None else 0

    async def aclose(self) -> None:
        """Wait for the sends under way, then close every transport."""
        for _ in range(self.size):
            await self._slots.acquire()
        self.close_idle()
        await asyncio.gather(*self._closing, return_exceptions=True)


class SharedPool(ServerPool):
    """One transport that takes concurrent sends itself (Graph: its own per-mailbox limit)."""

    def __init__(self, transport: Transport, size: int) -> None:
        super().__init__(lambda: transport, size)
        self._shared = transport

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        async with self._slots:
            self.used_at = time.monotonic()
            yield self._shared

    async def aclose(self) -> None:
        for _ in range(self.size):
            await self._slots.acquire()
        await self._shared.aclose()


class Pools:
    """One ServerPool per (server id, version), all within one ConnectionBudget. Asking for a
    newer version of a server drains the pool of the older one: its sends finish, then its
    connections close, and none of them is used again."""

    def __init__(
        self,
        protocol_log: Callable[[str], ProtocolLog] | None = None,
        *,
        tokens: TokenCache | None = None,
        store_refresh_token: RefreshTokenStore | None = None,
        max_connections: int = 100,
        admission: Admission | None = None,
        destinations: Destinations | None = None,
    ) -> None:
        self._admission = admission
        self._destinations = destinations
        self._pools: dict[tuple[int, int], ServerPool] = {}
        self._protocol_log = protocol_log
        self._retiring: set[asyncio.Task[None]] = set()
        self.tokens = tokens or TokenCache()
        self._own_tokens = tokens is None
        self._store_refresh_token = store_refresh_token
        self._mailbox_slots = MailboxSlots()
        self.budget = ConnectionBudget(max_connections)
        # The token source of each server's newest pool (oauth2 and Graph), for credential health.
        self.token_handles: dict[int, TokenHandle] = {}

    def get(self, server_id: int, version: int, server: MailServer, *, scope: str | None = None) -> ServerPool:
        """The pool of this server version. Raises TokenError when the server's token source can't
        work at all (a delegated grant with no mailbox connected).

        `scope` ("global", or the tenant's) chooses the destination policy its SMTP connections
        are checked against: the global server's, or tenants' (also for None). Without
        `destinations` nothing is checked."""
        key = (server_id, version)
        pool = self._pools.get(key)
        if pool is None:
            log = None
            if server.debug.protocol_log and self._protocol_log is not None:
                log = self._protocol_log(f"server {server_id} v{version}")
            pool = self._new_pool(server_id, version, server, log, scope)
            for old in [k for k in self._pools if k[0] == server_id and k[1] < version]:
                self._retire(old)
            self._pools[key] = pool
        return pool

    def _retire(self, key: tuple[int, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._pools.pop(key).aclose())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _new_pool(
        self, server_id: int, version: int, server: MailServer, log: ProtocolLog | None, scope: str | None
    ) -> ServerPool:
        size = pool_size(server)
        policy = self._destinations.for_scope(scope) if self._destinations is not None else None
        if server.kind == "graph":
            keep_graph = self._store_refresh_token
            graph_store = None
            if keep_graph is not None:  # a delegated grant's rotated refresh token, stored back

                async def graph_store(value: str) -> None:
                    await keep_graph(server_id, version, value)

            source = graph_token_source(
                server, name=f"mail server {server_id}", store_refresh_token=graph_store, destinations=policy
            )
            handle = self.tokens.handle(source)
            self.token_handles[server_id] = handle
            http = self.tokens.http_for(policy)
            graph = GraphTransport(server, handle, http, slots=self._mailbox_slots, protocol_log=log)
            return SharedPool(graph, size)
        token = None
        if isinstance(server.auth, OAuth2AuthSettings):
            store = None
            if self._store_refresh_token is not None:
                keep = self._store_refresh_token

                async def store(value: str) -> None:
                    await keep(server_id, version, value)

            source = smtp_token_source(server, name=f"mail server {server_id}", store_refresh_token=store,
                                       destinations=policy)  # fmt: skip
            token = self.tokens.handle(source)
            self.token_handles[server_id] = token
        if server.kind == "ews":
            return SharedPool(self._ews(server, token, policy, log), size)
        limit = server.quota.max_concurrent_connections
        recipients = RecipientLimit()  # learnt by any of the pool's connections, kept by all
        mechanism = LearntMechanism()  # likewise: a refused password mechanism is tried once per pool
        resolve = policy.resolve if policy is not None else None
        return ServerPool(
            lambda: SMTPTransport.from_server(
                server,
                token=token,
                protocol_log=log,
                recipient_limit=recipients,
                resolve=resolve,
                learnt_mechanism=mechanism,
            ),
            size,
            max_idle=server.connection.max_idle,
            budget=self.budget,
            admission=(self._admission, server_id, limit) if self._admission is not None and limit else None,
        )

    def _ews(
        self, server: MailServer, token: TokenHandle | None, policy: DestinationPolicy | None, log: ProtocolLog | None
    ) -> Transport:
        """An EWS server's one transport over the scope's guarded HTTP client; NTLM, which
        authenticates connections, gets clients of its own (guarded by the same policy)."""
        from .._http import new_client
        from .ews import EWSTransport

        http = self.tokens.http_for(policy)
        return EWSTransport(server, http, tokens=token, new_http=lambda: new_client(policy), protocol_log=log)

    def sweep(self) -> None:
        """Close connections idle longer than their server's max_idle; forget pools long unused."""
        now = time.monotonic()
        for key, pool in list(self._pools.items()):
            pool.sweep()
            if pool.count == 0 and now - pool.used_at > FORGET_AFTER and not isinstance(pool, SharedPool):
                self._retire(key)

    @property
    def open_connections(self) -> int:
        return self.budget.open

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.aclose() for p in pools), *self._retiring, return_exceptions=True)
        if self._own_tokens:
            await self.tokens.aclose()
