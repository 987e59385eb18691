"""Connections to mail servers, kept between messages: up to `pool_size` per server, keyed by
(server id, settings version), so a settings change never reuses a connection made with the old
settings. (Idle checks, quotas and fairness between tenants are still to come.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from ..settings.document import MailServer
from ..smtp.protocol import ProtocolLog
from .smtp import SMTPTransport


class ServerPool:
    """Up to `size` transports for one mail server; a send borrows one for its duration."""

    def __init__(self, make: Callable[[], SMTPTransport], size: int) -> None:
        self._make = make
        self._slots = asyncio.Semaphore(size)
        self._idle: list[SMTPTransport] = []
        self._all: list[SMTPTransport] = []

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[SMTPTransport]:
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


class Pools:
    """One ServerPool per (server id, version). Asking for a newer version of a server closes the
    pool of the older one once its sends are done."""

    def __init__(self, protocol_log: Callable[[str], ProtocolLog] | None = None) -> None:
        self._pools: dict[tuple[int, int], ServerPool] = {}
        self._protocol_log = protocol_log
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, server_id: int, version: int, server: MailServer) -> ServerPool:
        key = (server_id, version)
        pool = self._pools.get(key)
        if pool is None:
            for old in [k for k in self._pools if k[0] == server_id and k[1] < version]:
                task = asyncio.create_task(self._pools.pop(old).aclose())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            log = None
            if server.debug.protocol_log and self._protocol_log is not None:
                log = self._protocol_log(f"server {server_id} v{version}")
            pool = ServerPool(lambda: SMTPTransport.from_server(server, protocol_log=log), server.connection.pool_size)
            self._pools[key] = pool
        return pool

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.aclose() for p in pools), *self._retiring, return_exceptions=True)
