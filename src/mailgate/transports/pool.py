"""Connections to mail servers, kept between messages: up to `pool_size` per server, keyed by
(server id, settings version), so a settings change never reuses a connection made with the old
settings. (Idle checks, quotas and fairness between tenants are still to come.)

SMTP servers get SMTP transports (with XOAUTH2 tokens from the shared token cache when their auth
is oauth2); Graph servers one Graph transport over the shared HTTP client, which allows 4 requests
in flight per mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from ..oauth.cache import TokenCache, graph_token_source, smtp_token_source
from ..settings.document import MailServer, OAuth2AuthSettings
from ..smtp.protocol import ProtocolLog
from .base import Transport
from .graph import GraphTransport, MailboxSlots
from .smtp import SMTPTransport

# Stores a rotated refresh token for (server id, version).
RefreshTokenStore = Callable[[int, int, str], Awaitable[bool]]


class ServerPool:
    """Up to `size` transports for one mail server; a send borrows one for its duration."""

    def __init__(self, make: Callable[[], Transport], size: int) -> None:
        self._make = make
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Transport] = []
        self._all: list[Transport] = []

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        async with self._slots:
            if self._idle:
                transport = self._idle.pop()
            else:
                transport = self._make()
                self._all.append(transport)
            try:
                yield transport
            finally:
                self._idle.append(transport)

    async def aclose(self) -> None:
        transports, self._all, self._idle = self._all, [], []
        await asyncio.gather(*(t.aclose() for t in transports), return_exceptions=True)


class SharedPool(ServerPool):
    """One transport that takes concurrent sends itself (Graph: its own per-mailbox limit)."""

    def __init__(self, transport: Transport, size: int) -> None:
        super().__init__(lambda: transport, size)
        self._shared = transport

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        async with self._slots:
            yield self._shared

    async def aclose(self) -> None:
        await self._shared.aclose()


class Pools:
    """One ServerPool per (server id, version). Asking for a newer version of a server closes the
    pool of the older one once its sends are done."""

    def __init__(
        self,
        protocol_log: Callable[[str], ProtocolLog] | None = None,
        *,
        tokens: TokenCache | None = None,
        store_refresh_token: RefreshTokenStore | None = None,
    ) -> None:
        self._pools: dict[tuple[int, int], ServerPool] = {}
        self._protocol_log = protocol_log
        self._retiring: set[asyncio.Task[None]] = set()
        self.tokens = tokens or TokenCache()
        self._own_tokens = tokens is None
        self._store_refresh_token = store_refresh_token
        self._mailbox_slots = MailboxSlots()

    def get(self, server_id: int, version: int, server: MailServer) -> ServerPool:
        """The pool of this server version. Raises TokenError when the server's token source can't
        work at all (a delegated grant with no mailbox connected)."""
        key = (server_id, version)
        pool = self._pools.get(key)
        if pool is None:
            log = None
            if server.debug.protocol_log and self._protocol_log is not None:
                log = self._protocol_log(f"server {server_id} v{version}")
            pool = self._new_pool(server_id, version, server, log)
            for old in [k for k in self._pools if k[0] == server_id and k[1] < version]:
                task = asyncio.create_task(self._pools.pop(old).aclose())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            self._pools[key] = pool
        return pool

    def _new_pool(self, server_id: int, version: int, server: MailServer, log: ProtocolLog | None) -> ServerPool:
        size = server.connection.pool_size
        if server.kind == "graph":
            handle = self.tokens.handle(graph_token_source(server))
            graph = GraphTransport(server, handle, self.tokens.http, slots=self._mailbox_slots, protocol_log=log)
            return SharedPool(graph, size)
        token = None
        if isinstance(server.auth, OAuth2AuthSettings):
            store = None
            if self._store_refresh_token is not None:
                keep = self._store_refresh_token

                async def store(value: str) -> None:
                    await keep(server_id, version, value)

            source = smtp_token_source(server, name=f"mail server {server_id}", store_refresh_token=store)
            token = self.tokens.handle(source)
        return ServerPool(lambda: SMTPTransport.from_server(server, token=token, protocol_log=log), size)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.aclose() for p in pools), *self._retiring, return_exceptions=True)
        if self._own_tokens:
            await self.tokens.aclose()
