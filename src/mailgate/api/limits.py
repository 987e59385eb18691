"""Bounds on work a request starts that takes long: how many test e-mails run at once (in this
process, and per mail server so that one tenant can't take them all), and stopping such work
when its client goes away instead of finishing it for nobody."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from starlette.requests import Request

from .errors import TooManyRequests

T = TypeVar("T")

# A test e-mail holds a connection to a mail server for up to its timeouts (a silent server:
# connect_timeout, then protocol_timeout at every step). The admin UI's runs are bounded apart.
MAX_TEST_EMAILS = 16
MAX_TEST_EMAILS_PER_SCOPE = 2
BUSY_RETRY_AFTER = 10  # seconds: most test e-mails end within that


class Slots:
    """At most `total` things at once, and at most `per_key` of them for one key."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.running: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, key: str, what: str) -> Iterator[None]:
        """Hold a slot for `key` while the block runs; TooManyRequests (429) when none is free."""
        if self.running.get(key, 0) >= self.per_key:
            raise TooManyRequests(f"{self.per_key} {what} are under way for {key} already: wait for them to end "
                                  f"and try again", BUSY_RETRY_AFTER)  # fmt: skip
        if sum(self.running.values()) >= self.total:
            raise TooManyRequests(f"{self.total} {what} are under way already: try again in a few seconds",
                                  BUSY_RETRY_AFTER)  # fmt: skip
        self.running[key] = self.running.get(key, 0) + 1
        try:
            yield
        finally:
            self.running[key] -= 1
            if not self.running[key]:
                del self.running[key]


async def while_connected(request: Request, work: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
    """Run `work` while the client waits for its answer: (True, its result), or, when the client
    disconnects first, cancel it and answer (False, None) once it has ended (a test e-mail's
    cleanup — QUIT, closing the connection — runs before its slot is given back)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        left = not task.done()
    finally:  # also when this request itself is cancelled (the server stops)
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if left:
        return False, None
    return True, task.result()


async def _disconnect(request: Request) -> None:
    # The body was read whole before the route ran, so what arrives now is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
