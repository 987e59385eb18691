"""Real SMTP servers on 127.0.0.1 for the SMTP client's tests.

- `serve(config)`: an aiosmtpd server inside the test's running event loop
  (`async with serve(ServerConfig(...)) as server:`).
- `serve_in_thread(config)`: the same server in a background thread with its own
  loop (`with ...:`), for tests that run the mailgate CLI in a subprocess.
- `scripted(behaviour)` / `scripted_in_thread(behaviour)`: a tiny raw asyncio
  server that misbehaves on purpose (421 greeting, silence, dropped connection).

Every server listens on 127.0.0.1 on an ephemeral port, records what the client
sent, and on context exit closes its listener, aborts open connections and
(thread variants) joins its thread, all with bounded waits.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import functools
import hmac
import json
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, AnyStr, Literal, NoReturn, TypeVar

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from certs import PKI, make_pki

__all__ = [
    "AUTH_LINE_LIMIT",
    "EXCHANGE_BAD_CREDENTIALS",
    "EXIM_TOO_MANY_RECIPIENTS",
    "GMAIL_BAD_CREDENTIALS",
    "GMAIL_XOAUTH2_CHALLENGE",
    "GREETING_421",
    "MTA",
    "OPENSMTPD_TOO_MANY_RECIPIENTS",
    "POSTFIX_NON_FQDN_HELO",
    "POSTFIX_TOO_MANY_RECIPIENTS",
    "AuthAttempt",
    "ConnectionLog",
    "MTAMessage",
    "MTASession",
    "ReceivedMessage",
    "RecordingServer",
    "ScriptedConnection",
    "ScriptedMTA",
    "ScriptedServer",
    "ServerConfig",
    "default_ca_file",
    "default_pki",
    "raw_peer",
    "scripted",
    "scripted_in_thread",
    "scripted_mta",
    "serve",
    "serve_in_thread",
    "xoauth2_payload",
]

HOST = "127.0.0.1"
AUTH_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"})
# RFC 4954 section 4: an AUTH command line may be up to 12288 octets, which is
# what a realistic (~3 KB) OAuth2 access token needs once base64-encoded.
AUTH_LINE_LIMIT = 12288

STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0
TLS_HANDSHAKE_TIMEOUT = 5.0
# Upper bound on how long a thread-run server or a scripted connection lives,
# so nothing outlives a test that forgot to exit its context.
MAX_LIFETIME = 120.0

GMAIL_XOAUTH2_CHALLENGE = json.dumps(
    {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"},
    separators=(",", ":"),
)
GMAIL_BAD_CREDENTIALS = (
    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
    "535 5.7.8  https://support.google.com/mail/?p=BadCredentials"
)
EXCHANGE_BAD_CREDENTIALS = "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0054.namprd05.prod.outlook.com]"
XOAUTH2_SYNTAX_ERROR = "555 5.5.2 Syntax error, cannot decode response"
GREETING_421 = "421 4.3.2 Service not available, closing transmission channel"

Security = Literal["none", "starttls", "starttls-required", "tls"]
XOAuth2Style = Literal["gmail", "exchange"]
Behaviour = Literal["greeting-421", "silent", "silent-after-ehlo", "drop-after-data", "silent-after-message"]
T = TypeVar("T")


def xoauth2_payload(user: str, token: str) -> str:
    """The XOAUTH2 initial client response, before base64 encoding."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def _parse_xoauth2(payload: bytes) -> tuple[str, str] | None:
    """(user, token) from an XOAUTH2 client response, or None if malformed."""
    fields: dict[str, str] = {}
    for part in payload.decode("utf-8", "replace").split("\x01"):
        key, equals, value = part.partition("=")
        if equals:
            fields[key] = value
    auth = fields.get("auth", "")
    if "user" not in fields or not auth.startswith("Bearer "):
        return None
    return fields["user"], auth.removeprefix("Bearer ")


@functools.cache
def _default_pki_in_tempdir() -> tuple[PKI, tempfile.TemporaryDirectory[str]]:
    # Cached for the whole process; removed explicitly at exit (an implicit
    # cleanup would raise a ResourceWarning).
    directory = tempfile.TemporaryDirectory(prefix="mailgate-smtpd-pki-")
    atexit.register(directory.cleanup)
    return make_pki(Path(directory.name)), directory


_default_pki_lock = threading.Lock()


def default_pki() -> PKI:
    """The module-cached test CA and localhost certificate used by TLS servers
    whose config has no `ssl_context`. Made once per process."""
    with _default_pki_lock:  # servers in several threads may ask at once
        return _default_pki_in_tempdir()[0]


def default_ca_file() -> Path:
    """PEM file of the CA behind `default_pki()`; give it to the client as `ca_file`."""
    return default_pki().ca_file


# --------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """How a `serve()` server behaves. Reply hooks return a full reply line to
    refuse (e.g. "550 5.1.1 ...") or None to accept."""

    security: Security = "none"
    # AUTH mechanisms offered, among AUTH_MECHANISMS; empty means no AUTH at all.
    auth: AbstractSet[str] = frozenset()
    username: str = "user@example.com"
    password: str = "correct horse battery staple"
    # Valid XOAUTH2 access tokens; the XOAUTH2 user must also equal `username`.
    tokens: AbstractSet[str] = frozenset()
    # Or ask someone else whether a token is valid now (the fake identity provider's `check`).
    token_check: Callable[[str], object] | None = None
    xoauth2_style: XOAuth2Style = "gmail"
    # Offer and accept AUTH only once the session is encrypted (ignored for
    # implicit TLS, which always is).
    auth_require_tls: bool = True
    # The reply to a wrong password (PLAIN, LOGIN, CRAM-MD5); None: aiosmtpd's 535 5.7.8.
    auth_failure: str | None = None
    # Refuse MAIL/RCPT/DATA with 530 until the client authenticated.
    auth_required: bool = False
    pipelining: bool = False
    smtputf8: bool = False
    eightbitmime: bool = True
    # Advertised as "SIZE n" and enforced; None means no limit and no SIZE.
    size: int | None = None
    enhanced_status_codes: bool = True
    ehlo_supported: bool = True
    mail_reply: Callable[[str, list[str]], str | None] | None = None
    rcpt_reply: Callable[[str, int], str | None] | None = None
    data_reply: Callable[[ReceivedMessage], str | None] | None = None
    drop_after_data: bool = False
    # Server-side context for the TLS modes; default: one from `default_pki()`.
    ssl_context: ssl.SSLContext | None = None
    # The CA behind `ssl_context`, only passed through to `server.ca_file`.
    ca_file: Path | None = None
    hostname: str = "mx.mailgate.test"
    # aiosmtpd closes a connection that stays idle this long.
    idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        # Normalise to frozensets so callers may pass plain sets or lists.
        object.__setattr__(self, "auth", frozenset(m.upper() for m in self.auth))
        object.__setattr__(self, "tokens", frozenset(self.tokens))
        if unknown := self.auth - AUTH_MECHANISMS:
            raise ValueError(f"unsupported AUTH mechanisms: {sorted(unknown)}")
        if self.security not in ("none", "starttls", "starttls-required", "tls"):
            raise ValueError(f"unknown security mode: {self.security!r}")
        if self.xoauth2_style not in ("gmail", "exchange"):
            raise ValueError(f"unknown xoauth2_style: {self.xoauth2_style!r}")


@dataclass
class ReceivedMessage:
    """One message whose data the server received completely, whatever it replied."""

    index: int  # position in server.messages
    connection: int  # index into server.connections
    mail_from: str
    rcpt_tos: list[str]  # accepted recipients only
    content: bytes  # as received: CRLF line ends, dot-stuffing removed
    mail_options: list[str]  # e.g. ["SIZE=1234", "BODY=8BITMIME", "SMTPUTF8"]
    rcpt_options: list[str]
    tls: bool
    auth_mechanism: str | None
    auth_login: str | None
    reply: str | None = None  # None: the connection was dropped without a reply
    queue_id: str | None = None  # set when the default 250 reply was sent

    @property
    def accepted(self) -> bool:
        return self.reply is not None and self.reply.startswith("2")

    def parsed(self) -> EmailMessage:
        # Raw UTF-8 headers (RFC 6532) are decoded as text first: the bytes parser reads headers
        # as ASCII and would hand back surrogates.
        if self.content.isascii():
            message = BytesParser(policy=default_policy).parsebytes(self.content)
        else:
            message = Parser(policy=default_policy).parsestr(self.content.decode("utf-8"))
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class AuthAttempt:
    """One completed AUTH exchange."""

    connection: int
    mechanism: str
    login: str | None
    success: bool
    # XOAUTH2 (gmail style) only: the decoded answer to the 334 error challenge,
    # b"" for the empty line the client must send; None if no challenge was sent
    # or the answer was not valid base64.
    challenge_answer: bytes | None = None

    @property
    def answered_challenge_with_empty_line(self) -> bool:
        return self.challenge_answer == b""


@dataclass
class ConnectionLog:
    """Everything seen on one TCP connection."""

    index: int
    peer: Any
    # Raw data_received() chunks (decrypted for TLS): shows whether pipelined
    # commands arrived together.
    chunks: list[bytes] = field(default_factory=list)
    # Client lines outside message data, as received (AUTH arguments and AUTH
    # continuation lines included, CRLF stripped).
    commands: list[str] = field(default_factory=list)
    # Every reply pushed (multi-line replies as one string with CRLFs inside).
    replies: list[str] = field(default_factory=list)
    tls: bool = False
    closed: bool = False


class _Recorder:
    """Change notification shared by the servers, so tests can wait from the
    event loop (`wait_until`) or from another thread (`wait_until_sync`)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll `predicate` until true; raise TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s: {self!r}")
            await asyncio.sleep(0.01)

    def wait_until_sync(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Blocking `wait_until`, for thread-run servers (it would block an
        in-loop server's own loop)."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"condition not met within {timeout}s: {self!r}")


class _ScriptedPeer(_Recorder):
    """What the scripted servers share: where they listen, each connection's task and writer,
    and a shut-down that lets every connection's handler end. A subclass handles a connection in
    `_handle`, inside `async with self._connection(writer)`."""

    def __init__(self) -> None:
        super().__init__()
        self.host = HOST
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def _connection(self, writer: asyncio.StreamWriter) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            yield
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), SHUTDOWN_TIMEOUT)

    async def _shut_down(self) -> None:
        # Aborting makes pending reads return EOF so each handler ends normally;
        # cancelling them instead trips Python 3.11's start_server done-callback,
        # which calls task.exception() on the cancelled task.
        for writer in list(self._writers):
            writer.transport.abort()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            _, still_pending = await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT)
            for task in still_pending:
                task.cancel()


P = TypeVar("P", bound=_ScriptedPeer)


@asynccontextmanager
async def _listening(peer: P, host: str = HOST) -> AsyncIterator[P]:
    """Run `peer` on `host`:<ephemeral> in the running loop."""
    listener = await asyncio.start_server(peer._handle, host, 0)
    peer.host, peer.port = host, listener.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        listener.close()
        await peer._shut_down()
        await asyncio.wait_for(listener.wait_closed(), SHUTDOWN_TIMEOUT)


class RecordingServer(_Recorder):
    """What `serve()` yields: the address to connect to and everything recorded."""

    def __init__(self, config: ServerConfig, ca_file: Path | None) -> None:
        super().__init__()
        self.config = config
        self.host = HOST
        self.port = 0
        # The CA that signed the server certificate (TLS modes), for `ca_file`.
        self.ca_file = ca_file
        self.messages: list[ReceivedMessage] = []
        self.commands: list[str] = []  # all connections, in arrival order
        self.connections: list[ConnectionLog] = []
        self.auth_attempts: list[AuthAttempt] = []
        # SMTP sessions = accepted HELO/EHLO greetings (a client greets again
        # after STARTTLS, so a STARTTLS connection counts two).
        self.session_count = 0
        self._live: set[_RecordingSMTP] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<RecordingServer {self.host}:{self.port} connections={self.connection_count}"
            f" messages={len(self.messages)} commands={self.commands[-5:]!r}>"
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    @property
    def chunks(self) -> list[list[bytes]]:
        """Raw received chunks, one list per connection."""
        return [connection.chunks for connection in self.connections]

    async def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        await self.wait_until(lambda: len(self.messages) >= count, timeout)
        return list(self.messages)

    def wait_for_messages_sync(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        self.wait_until_sync(lambda: len(self.messages) >= count, timeout)
        return list(self.messages)

    async def _abort_connections(self) -> None:
        for protocol in list(self._live):
            protocol.abort()
        pending = [task for task in self._tasks if not task.done()]
        # A handler waiting on a TLS handshake is not woken by the abort (aiosmtpd swaps the
        # transport's protocol during STARTTLS): cancel rather than sit out its timeout.
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT)


# --------------------------------------------------------------------------
# aiosmtpd server
# --------------------------------------------------------------------------


class _Session(Session):
    # aiosmtpd sets the deprecated login_data itself on every successful AUTH,
    # and the inherited setter logs a deprecation warning each time.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Envelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.rcpt_attempts = 0  # RCPT commands seen in this transaction


@dataclass(frozen=True)
class _Identity:
    """Stored by aiosmtpd as session.auth_data after a successful AUTH."""

    mechanism: str
    login: str


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP protocol plus recording and a few limits adjusted.

    As on the handler, names starting with auth_ or smtp_ would become AUTH
    mechanisms or SMTP commands.
    """

    def __init__(self, handler: _Handler, recorder: RecordingServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.recorder = recorder
        self.connection_log = ConnectionLog(index=-1, peer=None)
        self._raw_transport: asyncio.BaseTransport | None = None
        self._partial_line = b""
        self._in_data = False
        # aiosmtpd keeps command_size_limits on the class and clears it in every
        # __init__; a per-connection dict keeps our AUTH limit in place and stops
        # EHLO's MAIL-limit increments from piling up across connections.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit, {"AUTH": AUTH_LINE_LIMIT})
        # The StreamReader is created with limit=line_length_limit (1001), so a
        # longer AUTH line would be refused before command_size_limits is even
        # consulted. Raise only the reader's limit: DATA still checks each line
        # against line_length_limit itself and answers "500 Line too long".
        reader: asyncio.StreamReader = self._stream_reader  # type: ignore[attr-defined]
        reader._limit = AUTH_LINE_LIMIT + len(b"\r\n")  # type: ignore[attr-defined]

    def _create_session(self) -> _Session:
        return _Session(self.loop)

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    @property
    def is_tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    @property
    def authenticated_as(self) -> _Identity | None:
        auth_data = self.session.auth_data if self.session else None
        return auth_data if isinstance(auth_data, _Identity) else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again with the TLS transport after STARTTLS.
        first_call = self._raw_transport is None
        super().connection_made(transport)
        if first_call:
            self._raw_transport = transport
            recorder = self.recorder
            self.connection_log = ConnectionLog(len(recorder.connections), transport.get_extra_info("peername"))
            recorder.connections.append(self.connection_log)
            recorder._live.add(self)
            if self._handler_coroutine is not None:
                recorder._tasks.add(self._handler_coroutine)
        else:
            self._partial_line = b""  # aiosmtpd discards pre-TLS leftovers too
        self.connection_log.tls = self.is_tls
        self.recorder._notify()

    def connection_lost(self, error: Exception | None) -> None:
        self.connection_log.closed = True
        self.recorder._live.discard(self)
        super().connection_lost(error)
        self.recorder._notify()

    def data_received(self, data: bytes) -> None:
        self.connection_log.chunks.append(bytes(data))
        self._record_lines(data)
        super().data_received(data)
        self.recorder._notify()

    def _record_lines(self, data: bytes) -> None:
        # Message data starts after our 354 reply and ends at the lone dot; a
        # client that sends data before seeing 354 has it recorded as commands.
        *lines, self._partial_line = (self._partial_line + data).split(b"\n")
        for line in lines:
            if self._in_data:
                self._in_data = line != b".\r"
                continue
            command = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
            self.connection_log.commands.append(command)
            self.recorder.commands.append(command)

    async def push(self, status: AnyStr) -> None:
        reply = status if isinstance(status, str) else status.decode("utf-8", "replace")
        self.connection_log.replies.append(reply)
        if reply.startswith("354"):
            self._in_data = True
        await super().push(status)

    def abort(self) -> None:
        if isinstance(self._raw_transport, asyncio.WriteTransport):
            self._raw_transport.abort()

    async def drop_connection(self) -> NoReturn:
        """Close the connection without replying and end this session."""
        assert self.transport is not None
        self.transport.close()
        # Returning to aiosmtpd would write the reply onto the socket, which is
        # only closed on the next loop iteration. Ending the handler task the way
        # a lost connection does avoids that.
        raise asyncio.CancelledError


class _Handler:
    """aiosmtpd handler: the hooks that implement ServerConfig.

    aiosmtpd treats every attribute named auth_* as an AUTH mechanism and
    every handle_* as a hook, so other names must avoid those prefixes.
    """

    def __init__(self, config: ServerConfig, recorder: RecordingServer) -> None:
        self.config = config
        self.recorder = recorder

    def _ok(self, enhanced: str, text: str = "Ok") -> str:
        return f"250 {enhanced} {text}" if self.config.enhanced_status_codes else f"250 {text}"

    def _record_auth(self, attempt: AuthAttempt) -> None:
        self.recorder.auth_attempts.append(attempt)
        self.recorder._notify()

    async def handle_EHLO(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        if not self.config.ehlo_supported:
            session.extended_smtp = False
            return ["502 5.5.1 Command not implemented"]
        # With the 5-argument hook, remembering the client's name is ours to do.
        session.host_name = hostname
        self.recorder.session_count += 1
        # responses = ["250-<hostname>", "250-SIZE n", "250-8BITMIME", ..., "250 HELP"]
        extensions = [line[4:] for line in responses[1:-1]]
        if not self.config.eightbitmime:
            # aiosmtpd always advertises 8BITMIME unless decode_data=True, which
            # would change how it parses MAIL and stores content.
            extensions.remove("8BITMIME")
        if not self.config.auth:
            # With every mechanism excluded aiosmtpd would still say "AUTH ".
            extensions = [e for e in extensions if not e.startswith("AUTH")]
        if self.config.pipelining:
            extensions.insert(0, "PIPELINING")
        if self.config.enhanced_status_codes:
            extensions.append("ENHANCEDSTATUSCODES")
        lines = [server.hostname, *extensions, "HELP"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_HELO(self, server: _RecordingSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        self.recorder.session_count += 1
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if not self.config.eightbitmime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 Unsupported option: BODY=8BITMIME"
        if self.config.mail_reply is not None:
            refusal = self.config.mail_reply(address, mail_options)
            if refusal is not None:
                return refusal
        # A handle_MAIL hook replaces aiosmtpd's own bookkeeping.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self._ok("2.1.0")

    async def handle_RCPT(
        self, server: _RecordingSMTP, session: Session, envelope: _Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        index = envelope.rcpt_attempts
        envelope.rcpt_attempts += 1
        if self.config.rcpt_reply is not None:
            refusal = self.config.rcpt_reply(address, index)
            if refusal is not None:
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return self._ok("2.1.5")

    async def handle_DATA(self, server: _RecordingSMTP, session: Session, envelope: Envelope) -> str:
        identity = server.authenticated_as
        assert envelope.mail_from is not None and envelope.original_content is not None
        message = ReceivedMessage(
            index=len(self.recorder.messages),
            connection=server.connection_log.index,
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            tls=server.is_tls,
            auth_mechanism=identity.mechanism if identity else None,
            auth_login=identity.login if identity else None,
        )
        if self.config.drop_after_data:
            self._add_message(message)
            await server.drop_connection()
        reply = self.config.data_reply(message) if self.config.data_reply else None
        if reply is None:
            message.queue_id = secrets.token_hex(5).upper()
            reply = self._ok("2.0.0", f"Ok: queued as {message.queue_id}")
        message.reply = reply
        self._add_message(message)
        return reply

    def _add_message(self, message: ReceivedMessage) -> None:
        self.recorder.messages.append(message)
        self.recorder._notify()

    # --- authentication -------------------------------------------------

    def check_password(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd `authenticator` for its built-in PLAIN and LOGIN."""
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        success = login == self.config.username and password == self.config.password
        self._record_auth(AuthAttempt(server.connection_log.index, mechanism, login, success))
        if success:
            return AuthResult(success=True, auth_data=_Identity(mechanism, login))
        return AuthResult(success=False, handled=False, message=self.config.auth_failure)  # None: 535 5.7.8

    async def auth_CRAM__MD5(self, server: _RecordingSMTP, args: list[str]) -> AuthResult:
        """RFC 2195: challenge "<unique@host>", answer "user hex(HMAC-MD5(password, challenge))"."""
        if len(args) != 1:
            await server.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.randbelow(10**10)}.{int(time.time())}@{server.hostname}>"
        answer = await server.challenge_auth(challenge)
        if answer is MISSING:
            return AuthResult(success=False, handled=True)  # aiosmtpd already replied 501
        assert isinstance(answer, bytes)
        login, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        expected = hmac.new(self.config.password.encode(), challenge.encode(), "md5").hexdigest()
        success = login == self.config.username and hmac.compare_digest(digest.lower(), expected)
        self._record_auth(AuthAttempt(server.connection_log.index, "CRAM-MD5", login, success))
        if success:
            return AuthResult(success=True, auth_data=_Identity("CRAM-MD5", login))
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server: _RecordingSMTP, args: list[str]) -> AuthResult:
        """Google/Microsoft XOAUTH2, with either provider's failure behaviour."""
        if len(args) == 2:
            try:
                payload = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push(XOAUTH2_SYNTAX_ERROR)
                return AuthResult(success=False, handled=True)
        else:
            answer = await server.challenge_auth("")  # "334 " with an empty challenge
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(answer, bytes)
            payload = answer
        connection = server.connection_log.index
        parsed = _parse_xoauth2(payload)
        if parsed is None:
            self._record_auth(AuthAttempt(connection, "XOAUTH2", None, False))
            return AuthResult(success=False, handled=False, message=XOAUTH2_SYNTAX_ERROR)
        user, token = parsed
        valid = token in self.config.tokens or (self.config.token_check is not None and self.config.token_check(token))
        if user == self.config.username and valid:
            self._record_auth(AuthAttempt(connection, "XOAUTH2", user, True))
            return AuthResult(success=True, auth_data=_Identity("XOAUTH2", user))
        if self.config.xoauth2_style == "exchange":
            self._record_auth(AuthAttempt(connection, "XOAUTH2", user, False))
            return AuthResult(success=False, handled=False, message=EXCHANGE_BAD_CREDENTIALS)
        # Gmail sends an error challenge that the client must acknowledge with an
        # empty line before it gets the final 535.
        answer = await server.challenge_auth(GMAIL_XOAUTH2_CHALLENGE)
        challenge_answer = answer if isinstance(answer, bytes) else None
        self._record_auth(AuthAttempt(connection, "XOAUTH2", user, False, challenge_answer))
        if answer is MISSING:
            return AuthResult(success=False, handled=True)  # aiosmtpd already replied 501
        return AuthResult(success=False, handled=False, message=GMAIL_BAD_CREDENTIALS)


def _tls_for(config: ServerConfig) -> tuple[ssl.SSLContext | None, Path | None]:
    if config.security == "none":
        return None, config.ca_file
    if config.ssl_context is not None:
        return config.ssl_context, config.ca_file
    pki = default_pki()
    return pki.server_context(), pki.ca_file


@asynccontextmanager
async def serve(config: ServerConfig | None = None) -> AsyncIterator[RecordingServer]:
    """Run an aiosmtpd server on 127.0.0.1:<ephemeral> in the running loop."""
    config = config or ServerConfig()
    loop = asyncio.get_running_loop()
    tls_context, ca_file = _tls_for(config)
    implicit_tls = config.security == "tls"
    recorder = RecordingServer(config, ca_file)
    handler = _Handler(config, recorder)

    def protocol_factory() -> _RecordingSMTP:
        return _RecordingSMTP(
            handler,
            recorder,
            hostname=config.hostname,  # aiosmtpd would otherwise call socket.getfqdn()
            ident="mailgate test ESMTP",
            data_size_limit=config.size,
            enable_SMTPUTF8=config.smtputf8,
            # A tls_context makes aiosmtpd offer STARTTLS, wrong for implicit TLS.
            tls_context=None if implicit_tls else tls_context,
            require_starttls=config.security == "starttls-required",
            timeout=config.idle_timeout,
            auth_required=config.auth_required,
            # aiosmtpd only counts STARTTLS as encryption, so with implicit TLS
            # it would refuse AUTH forever.
            auth_require_tls=config.auth_require_tls and not implicit_tls,
            auth_exclude_mechanism=AUTH_MECHANISMS - config.auth,
            authenticator=handler.check_password,
            loop=loop,
        )

    server = await loop.create_server(
        protocol_factory,
        HOST,
        0,
        ssl=tls_context if implicit_tls else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
    )
    recorder.port = server.sockets[0].getsockname()[1]
    try:
        yield recorder
    finally:
        server.close()
        # Python 3.12+ wait_closed() waits for open connections, so end them.
        await recorder._abort_connections()
        await asyncio.wait_for(server.wait_closed(), SHUTDOWN_TIMEOUT)


# --------------------------------------------------------------------------
# Thread runner
# --------------------------------------------------------------------------


@contextmanager
def _in_thread(open_server: Callable[[], AbstractAsyncContextManager[T]], name: str) -> Iterator[T]:
    """Run `async with open_server()` in a worker thread with its own event loop."""
    started: Future[tuple[T, Callable[[], None]]] = Future()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def stop_soon() -> None:  # called from the test thread
            loop.call_soon_threadsafe(stop.set)

        async with open_server() as value:
            started.set_result((value, stop_soon))
            # Bounded even if the test never leaves its with-block.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MAX_LIFETIME)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    # The executor's future carries any exception out of the server thread.
    finished = executor.submit(lambda: asyncio.run(main()))
    executor.shutdown(wait=False)  # no more jobs: the worker exits after this one
    futures: list[Future[Any]] = [started, finished]
    done, _ = concurrent.futures.wait(futures, timeout=STARTUP_TIMEOUT, return_when=concurrent.futures.FIRST_COMPLETED)
    if started not in done:
        if finished in done:
            finished.result()  # re-raises the startup error
        raise TimeoutError(f"{name} did not start within {STARTUP_TIMEOUT}s")
    value, stop = started.result()
    try:
        yield value
    finally:
        # The loop is already closed if MAX_LIFETIME ran out.
        with contextlib.suppress(RuntimeError):
            stop()
        finished.result(timeout=SHUTDOWN_TIMEOUT * 2)  # re-raises shutdown errors


@contextmanager
def serve_in_thread(config: ServerConfig | None = None) -> Iterator[RecordingServer]:
    """`serve(config)` in a background thread; use the blocking `*_sync` waits."""
    with _in_thread(lambda: serve(config), "mailgate-test-smtpd") as server:
        yield server


# --------------------------------------------------------------------------
# Scripted raw server
# --------------------------------------------------------------------------


@dataclass
class ScriptedConnection:
    index: int
    received: bytearray = field(default_factory=bytearray)
    closed: bool = False


class ScriptedServer(_ScriptedPeer):
    """A raw asyncio server playing one misbehaviour on every connection:

    - "greeting-421": send GREETING_421 and close.
    - "silent": accept, never send anything; closed when the context exits.
    - "silent-after-ehlo": greet and answer EHLO/HELO, then never answer again.
    - "drop-after-data": behave normally until the final dot of the message
      data, then close without a reply.
    - "silent-after-message": accept one message per connection, then never
      answer again on it (a connection a firewall dropped while idle).
    """

    def __init__(self, behaviour: Behaviour, hostname: str = "scripted.mailgate.test") -> None:
        super().__init__()
        if behaviour not in ("greeting-421", "silent", "silent-after-ehlo", "drop-after-data", "silent-after-message"):
            raise ValueError(f"unknown behaviour: {behaviour!r}")
        self.behaviour = behaviour
        self.hostname = hostname
        self.connections: list[ScriptedConnection] = []

    def __repr__(self) -> str:
        return f"<ScriptedServer {self.behaviour} {self.host}:{self.port} received={self.received[-200:]!r}>"

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    @property
    def received(self) -> bytes:
        """Everything received, all connections concatenated."""
        return b"".join(bytes(connection.received) for connection in self.connections)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = ScriptedConnection(len(self.connections))
        self.connections.append(connection)
        self._notify()
        async with self._connection(writer):
            try:
                await asyncio.wait_for(self._play(reader, writer, connection), MAX_LIFETIME)
            except (ConnectionError, TimeoutError, ValueError):
                pass  # peer went away, lifetime over, or an over-long line: just close
            finally:
                connection.closed = True
                self._notify()

    async def _play(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: ScriptedConnection
    ) -> None:
        async def send(*lines: str) -> None:
            writer.write("".join(f"{line}\r\n" for line in lines).encode())
            await writer.drain()

        async def read_line() -> bytes:
            line = await reader.readline()
            connection.received += line
            self._notify()
            return line

        async def record_until_eof() -> None:
            while chunk := await reader.read(4096):
                connection.received += chunk
                self._notify()

        if self.behaviour == "greeting-421":
            await send(GREETING_421)
            return
        if self.behaviour == "silent":
            await record_until_eof()
            return

        await send(f"220 {self.hostname} ESMTP scripted")
        while line := await read_line():
            verb = line.split(maxsplit=1)[0].upper() if line.strip() else b""
            if verb in (b"EHLO", b"HELO"):
                if verb == b"EHLO":
                    await send(f"250-{self.hostname}", "250-8BITMIME", "250 ENHANCEDSTATUSCODES")
                else:
                    await send(f"250 {self.hostname}")
                if self.behaviour == "silent-after-ehlo":
                    await record_until_eof()
                    return
            elif verb == b"MAIL":
                await send("250 2.1.0 Ok")
            elif verb == b"RCPT":
                await send("250 2.1.5 Ok")
            elif verb in (b"RSET", b"NOOP"):
                await send("250 2.0.0 Ok")
            elif verb == b"DATA":
                # "drop-after-data": read to the final dot, then hang up without
                # a reply; "silent-after-message": accept it, then go silent.
                await send("354 End data with <CR><LF>.<CR><LF>")
                while await read_line() not in (b".\r\n", b""):
                    pass
                if self.behaviour == "silent-after-message":
                    await send("250 2.0.0 Ok: queued")
                    await record_until_eof()
                return
            elif verb == b"QUIT":
                await send("221 2.0.0 Bye")
                return
            else:
                await send("502 5.5.2 Error: command not recognized")


@asynccontextmanager
async def scripted(behaviour: Behaviour) -> AsyncIterator[ScriptedServer]:
    """Run a ScriptedServer on 127.0.0.1:<ephemeral> in the running loop."""
    async with _listening(ScriptedServer(behaviour)) as server:
        yield server


@contextmanager
def scripted_in_thread(behaviour: Behaviour) -> Iterator[ScriptedServer]:
    """`scripted(behaviour)` in a background thread with its own loop."""
    with _in_thread(lambda: scripted(behaviour), "mailgate-test-scripted-smtpd") as server:
        yield server


# --------------------------------------------------------------------------
# Scripted MTA: a small SMTP server written from real MTAs' documented replies
# --------------------------------------------------------------------------

POSTFIX_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"  # smtpd(8), past smtpd_recipient_limit
EXIM_TOO_MANY_RECIPIENTS = "452 too many recipients"  # Exim, past recipients_max (no enhanced codes)
OPENSMTPD_TOO_MANY_RECIPIENTS = "451 4.5.3 Too many recipients: Too many recipients"  # smtpd, past max-rcpt
POSTFIX_NON_FQDN_HELO = "504 5.5.2 <{helo}>: Helo command rejected: need fully-qualified hostname"

TLSMode = Literal["none", "starttls", "implicit"]


@dataclass(frozen=True)
class MTA:
    """How a `scripted_mta()` server behaves. The defaults and knobs follow Postfix 3.7's smtpd
    (postconf(5)); the reply texts of Exim 4.96 and OpenSMTPD 6.8 are above, to pass in.

    - `recipient_limit` is smtpd_recipient_limit: RCPTs past it in one transaction get
      `too_many_recipients`. The first `overshoot_limit` of those are free
      (smtpd_recipient_overshoot_limit); each further one counts as an error, as does every
      other refused command, and once a session made `hard_error_limit` errors without
      delivering mail (smtpd_hard_error_limit) it gets "421 4.7.0 … Error: too many errors" and
      is closed. A delivered message clears the count.
    - `reject_non_fqdn_helo` is reject_non_fqdn_helo_hostname with smtpd_delay_reject=yes (the
      default): the refusal comes at RCPT TO, for every recipient.
    - `drop_after_body`: read the n-th message body of a connection (1-based), then hang up
      without a reply.
    - `max_mail_commands` is Exim's smtp_accept_max_per_connection.
    - `greeting(index)`: the greeting of connection `index`; a non-220 one ends the session.
    - `auth_reply`: the reply to AUTH (PLAIN, XOAUTH2); "{password}" and "{payload}" are filled in
      with what the client sent (a server that echoes the secret). None: 235 for PLAIN with
      `password`, else 535.
    """

    hostname: str = "mx.scripted.test"
    tls: TLSMode = "none"
    ssl_context: ssl.SSLContext | None = None  # default: default_pki()'s
    greeting_delay: float = 0.0
    greeting: Callable[[int], str | None] | None = None
    pipelining: bool = True
    size: int | None = None
    auth: bool = False  # offer AUTH PLAIN and XOAUTH2 (only once TLS is on, unless tls is "none")
    username: str = "user@example.com"
    password: str = "correct horse battery staple"
    auth_reply: str | None = None
    recipient_limit: int | None = None
    too_many_recipients: str = POSTFIX_TOO_MANY_RECIPIENTS
    overshoot_limit: int = 1000
    hard_error_limit: int = 20
    reject_non_fqdn_helo: bool = False
    rcpt_reply: Callable[[str], str | None] | None = None
    drop_after_body: int | None = None
    # Exim smtp_accept_max_per_connection (also Amazon SES): MAIL commands past it get
    # "421 too many messages in this connection", and the connection closes.
    max_mail_commands: int | None = None


@dataclass
class MTAMessage:
    mail_from: str
    mail_params: list[str]
    rcpt_tos: list[str]  # accepted
    content: bytes  # as received, dot-stuffing removed, the final CRLF included
    reply: str | None = None  # None: the server hung up instead


@dataclass
class MTASession:
    """One connection, as the server saw it."""

    index: int
    commands: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    helo: str | None = None
    tls: bool = False
    messages: list[MTAMessage] = field(default_factory=list)
    # How the client ended it: "close_notify" (a clean TLS shutdown), "ragged" (TLS, the TCP
    # connection closed without close_notify), "reset", "eof" (plain TCP), or None while open.
    ended: str | None = None
    tls_hello: bool = False  # the client's first bytes were a TLS handshake (a client probing for TLS)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]

    @property
    def rcpt_counts(self) -> list[int]:
        """RCPT commands per transaction, in order."""
        counts: list[int] = []
        for verb in self.verbs:
            if verb == "MAIL":
                counts.append(0)
            elif verb == "RCPT" and counts:
                counts[-1] += 1
        return counts


class _Wire:
    """A connection's bytes, in clear or through TLS (an ssl.SSLObject over memory BIOs, so the
    server sees exactly how the client ends the TLS session)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: MTASession) -> None:
        self.reader, self.writer, self.session = reader, writer, session
        self.buffer = bytearray()
        self.tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self.tls = context.wrap_bio(self._in, self._out, server_side=True)
        if self.buffer:
            self._in.write(bytes(self.buffer))
            self.buffer.clear()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("EOF during the TLS handshake") from None
                self._in.write(data)
        self._flush()
        self.session.tls = True

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.writer.write(data)

    async def _fill(self) -> bool:
        """More bytes into `buffer`; False at the end (recorded in session.ended)."""
        try:
            if self.tls is None:
                data = await self.reader.read(65536)
                if not data:
                    self.session.ended = "eof"
                    return False
                if not self.session.commands and not self.buffer and data[:1] == b"\x16":
                    self.session.tls_hello = True
                self.buffer += data
                return True
            while True:
                try:
                    data = self.tls.read(65536)
                    if not data:  # the client's close_notify (the ssl module says b"", not SSLZeroReturnError)
                        raise ssl.SSLZeroReturnError
                    self.buffer += data
                    return True
                except ssl.SSLWantReadError:
                    self._flush()
                    raw = await self.reader.read(65536)
                    if raw:
                        self._in.write(raw)
                    else:
                        self._in.write_eof()
        except ssl.SSLZeroReturnError:
            self.session.ended = "close_notify"
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()  # our close_notify in answer
            self._flush()
        except ssl.SSLError:  # SSLEOFError: "EOF occurred in violation of protocol"
            self.session.ended = "ragged"
        except ConnectionError:
            self.session.ended = "reset"
        return False

    async def readline(self) -> bytes:
        """One line with its LF, or what is left (b"" at the end)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > 1 << 20 or not await self._fill():
                line = bytes(self.buffer)
                self.buffer.clear()
                return line

    async def send(self, *lines: str) -> None:
        data = "".join(f"{line}\r\n" for line in lines).encode()
        self.session.replies.extend(lines)
        if self.tls is not None:
            self.tls.write(data)
            self._flush()
        else:
            self.writer.write(data)
        await self.writer.drain()

    async def until_end(self) -> None:
        while await self._fill():
            self.buffer.clear()


class ScriptedMTA(_ScriptedPeer):
    """What `scripted_mta()` yields: the address and every session as the server saw it."""

    def __init__(self, mta: MTA) -> None:
        super().__init__()
        self.mta = mta
        self.sessions: list[MTASession] = []

    def __repr__(self) -> str:
        return f"<ScriptedMTA {self.host}:{self.port} sessions={len(self.sessions)}>"

    @property
    def ca_file(self) -> Path:
        return default_pki().ca_file

    @property
    def messages(self) -> list[MTAMessage]:
        return [m for s in self.sessions for m in s.messages]

    @property
    def delivered(self) -> list[MTAMessage]:
        return [m for m in self.messages if m.reply is not None and m.reply.startswith("250")]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = MTASession(len(self.sessions))
        self.sessions.append(session)
        self._notify()
        try:
            async with self._connection(writer):
                await asyncio.wait_for(self._play(_Wire(reader, writer, session)), MAX_LIFETIME)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            session.ended = session.ended or "closed by the server"
            self._notify()

    def _context(self) -> ssl.SSLContext:
        return self.mta.ssl_context or default_pki().server_context()

    async def _play(self, wire: _Wire) -> None:
        mta, session = self.mta, wire.session
        if mta.tls == "implicit":
            await wire.start_tls(self._context())
        if mta.greeting_delay:
            # Like postscreen's greet wait, notice a client that talks first (a pregreet).
            loop = asyncio.get_running_loop()
            until = loop.time() + mta.greeting_delay
            with contextlib.suppress(TimeoutError):
                early = await asyncio.wait_for(wire.reader.read(65536), mta.greeting_delay)
                if not early:
                    session.ended = "eof"
                    return
                session.tls_hello = early[:1] == b"\x16"
                wire.buffer += early
            await asyncio.sleep(max(0.0, until - loop.time()))
        greeting = mta.greeting(session.index) if mta.greeting else None
        if greeting is not None and not greeting.startswith("220"):
            await wire.send(greeting)
            return
        await wire.send(greeting or f"220 {mta.hostname} ESMTP Postfix")
        errors = 0
        message: MTAMessage | None = None
        accepted = overshoot = bodies = mail_commands = 0
        while True:
            if errors >= mta.hard_error_limit:
                await wire.send(f"421 4.7.0 {mta.hostname} Error: too many errors")
                return
            raw = await wire.readline()
            self._notify()
            if not raw.endswith(b"\n"):
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            session.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            reply = "250 2.0.0 Ok"
            if verb in ("EHLO", "HELO"):
                session.helo = arg.strip()
                message = None
                if verb == "HELO":
                    reply = f"250 {mta.hostname}"
                else:
                    extensions = ["PIPELINING"] if mta.pipelining else []
                    extensions += [f"SIZE {mta.size}"] if mta.size else []
                    if mta.tls == "starttls" and wire.tls is None:
                        extensions.append("STARTTLS")
                    if mta.auth and (wire.tls is not None or mta.tls == "none"):
                        extensions.append("AUTH PLAIN XOAUTH2")
                    extensions += ["ENHANCEDSTATUSCODES", "8BITMIME"]
                    lines = [mta.hostname, *extensions]
                    await wire.send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
                    continue
            elif verb == "STARTTLS" and mta.tls == "starttls" and wire.tls is None:
                await wire.send("220 2.0.0 Ready to start TLS")
                await wire.start_tls(self._context())
                continue
            elif verb == "AUTH":
                payload = arg.partition(" ")[2]
                try:
                    _, user, password = base64.b64decode(payload).decode("utf-8", "replace").split("\0")
                except (ValueError, binascii.Error):
                    user = password = ""
                if mta.auth_reply is not None:
                    reply = mta.auth_reply.format(password=password, payload=payload)
                elif (user, password) == (mta.username, mta.password):
                    reply = "235 2.7.0 Authentication successful"
                else:
                    reply = "535 5.7.8 Error: authentication failed: authentication failure"
            elif verb == "MAIL":
                mail_commands += 1
                if mta.max_mail_commands is not None and mail_commands > mta.max_mail_commands:
                    await wire.send("421 too many messages in this connection")
                    return
                params = arg.split()[1:]
                size = next((int(p[5:]) for p in params if p.upper().startswith("SIZE=") and p[5:].isdigit()), 0)
                if mta.size and size > mta.size:
                    reply = "552 5.3.4 Message size exceeds fixed limit"
                else:
                    address = arg.partition(":")[2].split(">")[0].lstrip(" <")
                    message = MTAMessage(address, params, [], b"")
                    accepted = overshoot = 0
                    reply = "250 2.1.0 Ok"
            elif verb == "RCPT":
                address = arg.partition(":")[2].split(">")[0].lstrip(" <")
                helo = session.helo or ""
                if message is None:
                    reply = "503 5.5.1 Error: need MAIL command"
                elif mta.recipient_limit is not None and accepted >= mta.recipient_limit:
                    await wire.send(mta.too_many_recipients)
                    overshoot += 1
                    if overshoot > mta.overshoot_limit:
                        errors += 1
                    continue
                elif mta.reject_non_fqdn_helo and "." not in helo and not helo.startswith("["):
                    reply = POSTFIX_NON_FQDN_HELO.format(helo=helo)
                elif mta.rcpt_reply is not None and (refusal := mta.rcpt_reply(address)) is not None:
                    reply = refusal
                else:
                    message.rcpt_tos.append(address)
                    accepted += 1
                    reply = "250 2.1.5 Ok"
            elif verb == "DATA":
                if message is None or not message.rcpt_tos:
                    reply = "554 5.5.1 Error: no valid recipients" if message else "503 5.5.1 Error: need RCPT command"
                else:
                    await wire.send("354 End data with <CR><LF>.<CR><LF>")
                    content = bytearray()
                    while (data_line := await wire.readline()) != b".\r\n":
                        if not data_line.endswith(b"\n"):
                            return
                        content += data_line[1:] if data_line.startswith(b".") else data_line
                    message.content = bytes(content)
                    session.messages.append(message)
                    self._notify()
                    bodies += 1
                    if mta.drop_after_body == bodies:
                        return
                    message.reply = f"250 2.0.0 Ok: queued as {secrets.token_hex(5).upper()}"
                    await wire.send(message.reply)
                    self._notify()
                    message, errors = None, 0
                    continue
            elif verb == "RSET":
                message = None
            elif verb == "NOOP":
                pass
            elif verb == "QUIT":
                await wire.send("221 2.0.0 Bye")
                await wire.until_end()  # how the client ends its side is what a test looks at
                return
            else:
                reply = "502 5.5.2 Error: command not recognized"
            if reply[:1] in "45":
                errors += 1
            await wire.send(reply)


@asynccontextmanager
async def scripted_mta(mta: MTA | None = None, host: str = HOST) -> AsyncIterator[ScriptedMTA]:
    """Run a ScriptedMTA on `host` (127.0.0.1, or ::1):<ephemeral> in the running loop."""
    async with _listening(ScriptedMTA(mta or MTA()), host) as server:
        yield server


@asynccontextmanager
async def raw_peer(answer: bytes) -> AsyncIterator[tuple[str, int]]:
    """A TCP server on 127.0.0.1:<ephemeral> that sends `answer` to every connection at once and
    then reads until the client leaves: something that is not an SMTP server (an HTTP server's
    "400 Bad Request", a Redis error, binary). Yields (host, port)."""
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            writer.write(answer)
            await writer.drain()
            await asyncio.wait_for(reader.read(), MAX_LIFETIME)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, HOST, 0)
    try:
        yield HOST, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(listener.wait_closed(), SHUTDOWN_TIMEOUT)
