"""Group commit: single-message submits that arrive together (concurrent API requests) are stored
in one transaction, so a busy API pays one commit per batch instead of one per message.

Each submit still returns only once its own message is committed: nothing is acknowledged that a
crash could lose. While one batch is being written the next one gathers; a lone submit waits no
longer than it would alone. When a batch fails as a whole (an idempotency key taken meanwhile, a
database error), each of its messages is stored on its own, so one submit's failure is never
another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from .store import Entry

MAX_BATCH = 500


class GroupCommit:
    def __init__(
        self,
        store_many: Callable[[Sequence[Entry]], Awaitable[list[int]]],
        store_one: Callable[[Entry], Awaitable[int]],
    ) -> None:
        self._store_many = store_many
        self._store_one = store_one
        self._pending: list[tuple[Entry, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, entry: Entry) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return await asyncio.shield(future)  # a caller that gives up does not cancel the others' batch

    async def _write(self) -> None:
        batch: list[tuple[Entry, asyncio.Future[int]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if len(batch) == 1:
                    await self._alone(*batch[0])
                    continue
                try:
                    ids = await self._store_many([entry for entry, _ in batch])
                except Exception:
                    await asyncio.gather(*(self._alone(entry, future) for entry, future in batch))
                    continue
                for (_, future), pk in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(pk)
        finally:
            self._writer = None
            # Only when cancelled (shutdown): the transaction under way rolled back, nothing stored.
            for _, future in batch + self._pending:
                if not future.done():
                    future.cancel()
            self._pending = []

    async def _alone(self, entry: Entry, future: asyncio.Future[int]) -> None:
        try:
            pk = await self._store_one(entry)
        except Exception as e:
            if not future.done():
                future.set_exception(e)
        else:
            if not future.done():
                future.set_result(pk)
