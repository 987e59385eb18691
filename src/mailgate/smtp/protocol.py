"""Bytes on the wire: writes commands, parses replies, and hands them over in batches.

A pipelined group of N commands is answered by N replies; the caller waits for all N with one
future and one timer, instead of a wake-up per reply. This is where the client's speed comes
from, so this module stays small and does nothing per byte in Python.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .auth import REDACTED
from .errors import SMTPDisconnectedError, SMTPError, SMTPProtocolError, SMTPTimeoutError
from .reply import Reply

ProtocolLog = Callable[[str], None]

# A hostile or broken server can't fill memory, the database or a screen with what it sends:
MAX_LINE = 65536  # a reply line longer than this is not SMTP (RFC 5321 4.5.3.1.5: 512 octets)
MAX_TEXT = 512  # characters of a reply line kept; the rest is cut
MAX_REPLY_LINES = 100  # lines of one (multi-line) reply
MAX_UNREAD = 1024  # complete replies waiting to be read (a pipelined batch needs about a hundred)
_REPLY_START = frozenset(f"{code}{sep}".encode() for code in range(200, 600) for sep in " -")


class SMTPProtocol(asyncio.Protocol):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, log: ProtocolLog | None = None, *, server: str = "the server"
    ) -> None:
        self.loop = loop
        self.log = log
        self.server = server  # "host:port", for errors
        self.transport: asyncio.Transport | None = None
        self._tail = b""
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0
        self._error: SMTPError | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: asyncio.Future[None] = loop.create_future()
        self._secrets: tuple[str, ...] = ()  # replaced by "[redacted]" in every reply text
        self._seen_reply = False
        # One timer per connection, not one per wait: waits are short and many, and a timer
        # created and cancelled per round trip costs more than the rest of the round trip.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timeout = 0.0

    # ---- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        log = self.log
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if line[:4] not in _REPLY_START and (len(line) != 3 or line + b" " not in _REPLY_START):
                self._not_smtp(line)
                return
            self._seen_reply = True
            text = line[4:].decode("utf-8", "replace")
            if len(text) > MAX_TEXT:
                text = text[: MAX_TEXT - 1] + "…"
            if not text.isprintable():  # no terminal escapes or NULs into logs, screens and the database
                text = "".join(c if c.isprintable() else "\ufffd" for c in text)
            for secret in self._secrets:
                if secret in text:
                    text = text.replace(secret, REDACTED)
            if log is not None:
                log(f"S: {line[:4].decode()}{text}")
            self._lines.append(text)
            if line[3:4] != b"-":
                self._replies.append(Reply(int(line[:3]), self._lines))
                self._lines = []
            elif len(self._lines) >= MAX_REPLY_LINES:
                self._fail(SMTPProtocolError(f"{self.server} sent a reply of more than {MAX_REPLY_LINES} lines"))
                return
        if len(self._replies) > MAX_UNREAD:
            self._fail(SMTPProtocolError(f"{self.server} sent more replies than there were commands"))
            return
        if self._tail[:4] not in _REPLY_START and len(self._tail) >= 4:
            self._not_smtp(self._tail)  # no need to wait for the end of the line to know
            return
        if len(self._tail) > MAX_LINE:
            self._fail(SMTPProtocolError(f"{self.server} sent a reply line longer than 64 KiB"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._want and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            last = self._replies[-1] if self._replies else None
            if last is not None and last.code == 421:
                err: SMTPError = SMTPDisconnectedError.from_reply("the server closed the connection", last)
            else:
                err = SMTPDisconnectedError("the server closed the connection" + (f" ({exc})" if exc else ""))
            self._fail(err)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ---- used by the client ----------------------------------------------------------------

    @property
    def error(self) -> SMTPError | None:
        return self._error

    @property
    def has_buffered_input(self) -> bool:
        return bool(self._tail or self._lines or self._replies)

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.write(data)

    async def read(self, n: int, timeout: float) -> list[Reply]:
        """The next `n` replies, or SMTPTimeoutError if they don't all arrive in `timeout`."""
        if len(self._replies) < n:
            if self._error is not None:
                raise self._error
            fut: asyncio.Future[None] = self.loop.create_future()
            self._waiter, self._want = fut, n
            self._timeout = timeout
            self._deadline = self.loop.time() + timeout
            if self._timer is None:
                self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            try:
                await fut
            finally:
                self._waiter = None
        replies = self._replies
        return [replies.popleft() for _ in range(n)]

    def redact(self, secrets: list[str]) -> None:
        """Replace these secrets (and only long enough ones: "[redacted]" in place of every "a"
        would hide nothing and garble the text) in every reply from now on, before anything
        sees it: the replies' texts, and so the errors, results and log made from them."""
        self._secrets = tuple(dict.fromkeys(s for s in (*self._secrets, *secrets) if len(s) >= 4))

    def salvage(self) -> list[Reply]:
        """The complete replies that arrived but were not read (a read failed: the connection
        broke or timed out half-way through a pipelined group)."""
        replies = list(self._replies)
        self._replies.clear()
        return replies

    async def drain(self, timeout: float) -> None:
        """Wait until the write buffer is below its high-water mark, failing only when no
        progress at all is made for `timeout` (a large body may take longer than that to send)."""
        while self._paused and self._error is None:
            assert self.transport is not None
            before = self.transport.get_write_buffer_size()
            self._drain = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drain), timeout)
            except TimeoutError:
                if self.transport.get_write_buffer_size() >= before:
                    self._fail(SMTPTimeoutError(f"the server took no data for {timeout:g} s"))
            finally:
                self._drain = None
        if self._error is not None:
            raise self._error

    async def close(self, timeout: float) -> None:
        """Close gracefully: what is written goes out, then the end of the stream (over TLS a
        close_notify, which asyncio's SSL transport sends on close(), not on abort()); wait up
        to `timeout` for the connection to end, then drop it."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self._error is None:
            self._error = SMTPDisconnectedError("the connection was closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    # ---- internals -------------------------------------------------------------------------

    def _not_smtp(self, line: bytes) -> None:
        """Not an SMTP reply. What it is stays out of errors and logs (an HTTP server's or a
        database's answer is the operator's network talking, not something to show a tenant)."""
        if self.log is not None:
            self.log(f"S: [not an SMTP reply, {len(line)} bytes]")
        if self._seen_reply:
            what = f"{self.server} sent a line that is not an SMTP reply"
        else:
            what = f"the server at {self.server} did not answer as an SMTP server (its first line is not an SMTP reply)"
        self._fail(SMTPProtocolError(what))

    def _fail(self, error: SMTPError) -> None:
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next read arms the timer again
        if self.loop.time() >= self._deadline:
            self._fail(SMTPTimeoutError(f"the server did not answer within {self._timeout:g} s"))
        else:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
