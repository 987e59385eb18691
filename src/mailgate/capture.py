"""The capture SMTP server of `mailgate serve --demo`: a real SMTP server on loopback that accepts
every message and keeps the newest ones in memory, parsed, for the admin UI to show."""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
import ipaddress
import logging
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import MIMEPart

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_SIZE = 10 * 1024 * 1024
_SHUTDOWN_TIMEOUT = 5.0
_UNPARSED_SUBJECT = "(could not parse)"


@dataclass(frozen=True)
class CapturedMessage:
    id: int  # 1, 2, 3 … in arrival order, never reused (not even after `clear`)
    received_at: datetime  # aware, UTC
    mail_from: str  # envelope sender
    rcpt_tos: tuple[str, ...]  # envelope recipients
    subject: str  # decoded; '' if none
    from_header: str
    to_header: str
    text: str | None  # the text/plain body, decoded, lines ending in \n
    html: str | None  # the text/html body, decoded, lines ending in \n
    attachments: tuple[tuple[str, str, int], ...]  # (filename, content type, size in bytes)
    size: int  # bytes of the raw message
    raw: bytes


class CaptureServer:
    """`async with CaptureServer() as capture:` listens on 127.0.0.1:`capture.port` in the running
    loop until the block ends. No TLS and no AUTH, which is why it binds to loopback only."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep: int = 200) -> None:
        self._host = _loopback(host)
        self._port = port
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self._messages: collections.deque[CapturedMessage] = collections.deque(maxlen=keep)
        self._last_id = 0
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for until then)."""
        return self._port

    async def start(self) -> None:
        """Bind and listen. Port 0 takes any free port; a port in use raises OSError."""
        if self._server is not None:
            raise RuntimeError("the capture server is already started")
        _quiet_message_content()
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def session() -> SMTP:
            smtp = SMTP(
                handler,
                hostname="localhost",  # aiosmtpd would otherwise call socket.getfqdn(), which may wait on DNS
                ident="mailgate capture ESMTP",
                data_size_limit=MAX_MESSAGE_SIZE,
                enable_SMTPUTF8=True,
                loop=loop,
            )
            self._sessions.add(smtp)
            return smtp

        self._server = await loop.create_server(session, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and end open sessions. Calling it again does nothing."""
        server, self._server = self._server, None
        if server is not None:
            await close_smtp_server(server, self._sessions)

    async def __aenter__(self) -> CaptureServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def messages(self) -> list[CapturedMessage]:
        """Newest first."""
        return list(reversed(self._messages))

    def get(self, message_id: int) -> CapturedMessage | None:
        return next((m for m in self._messages if m.id == message_id), None)

    def clear(self) -> None:
        self._messages.clear()

    def _capture(self, mail_from: str, rcpt_tos: tuple[str, ...], raw: bytes) -> None:
        self._last_id += 1
        self._messages.append(_parse(self._last_id, mail_from, rcpt_tos, raw))


class _Handler:
    # aiosmtpd takes every handle_* attribute of a handler as a hook and every auth_* as an AUTH
    # mechanism, so this class has nothing else.
    def __init__(self, capture: CaptureServer) -> None:
        self._capture_server = capture

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        self._capture_server._capture(envelope.mail_from or "", tuple(envelope.rcpt_tos), raw)
        return "250 2.0.0 Ok: captured"


def _loopback(host: str) -> str:
    if host == "localhost":
        # Not the name: with port 0 it would bind 127.0.0.1 and ::1 to two different ports.
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"the capture server has no TLS and no AUTH, so it only listens on loopback, not on {host!r}")


def _parse(message_id: int, mail_from: str, rcpt_tos: tuple[str, ...], raw: bytes) -> CapturedMessage:
    received_at = datetime.now(UTC)
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        text = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        return CapturedMessage(
            id=message_id,
            received_at=received_at,
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            subject=str(msg.get("subject", "")),
            from_header=str(msg.get("from", "")),
            to_header=str(msg.get("to", "")),
            text=None if text is None else _decoded(text),
            html=None if html is None else _decoded(html),
            attachments=tuple(
                (part.get_filename() or "", part.get_content_type(), _size(part))
                for part in _leaves(msg)
                if part is not text and part is not html
            ),
            size=len(raw),
            raw=raw,
        )
    except Exception:  # the email package has parser bugs; one odd message must not end the session
        return CapturedMessage(
            id=message_id,
            received_at=received_at,
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            subject=_UNPARSED_SUBJECT,
            from_header="",
            to_header="",
            text=None,
            html=None,
            attachments=(),
            size=len(raw),
            raw=raw,
        )


def _decoded(part: MIMEPart) -> str:
    try:
        content: str = part.get_content()
    except LookupError:  # a charset Python does not know: show what it can rather than nothing
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content.replace("\r\n", "\n")


def _leaves(part: MIMEPart) -> Iterator[MIMEPart]:
    """The non-multipart parts, depth first; an attached message/rfc822 counts as one."""
    # is_multipart() too: a multipart whose boundary never shows up keeps a str payload.
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        for sub in part.iter_parts():
            yield from _leaves(sub)
    else:
        yield part


def _size(part: MIMEPart) -> int:
    payload = part.get_payload(decode=True)  # None for a message/rfc822 part
    return len(payload) if isinstance(payload, bytes) else len(part.as_bytes())


class _NoMessageContent(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "DATA readline: %s"


_no_message_content = _NoMessageContent()


async def close_smtp_server(server: asyncio.Server, sessions: Iterable[SMTP]) -> None:
    """Stop an aiosmtpd server made with loop.create_server, ending its open sessions."""
    server.close()
    sessions = list(sessions)
    for smtp in sessions:
        if isinstance(smtp.transport, asyncio.WriteTransport):
            smtp.transport.abort()  # not close(): that waits for a client that may not be reading
    # The loop then delivers connection_lost, which cancels each session's task: wait for them.
    tasks = [smtp._handler_coroutine for smtp in sessions if smtp._handler_coroutine is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=_SHUTDOWN_TIMEOUT)
    await asyncio.wait_for(server.wait_closed(), _SHUTDOWN_TIMEOUT)


def _quiet_message_content() -> None:
    # aiosmtpd logs every line of message data at DEBUG; notification mail carries reset links
    # and other secrets in its body.
    logger = logging.getLogger("mail.log")
    if _no_message_content not in logger.filters:
        logger.addFilter(_no_message_content)
