"""SMTP submission ingress: any SMTP-speaking application hands mail to mailgate as it would to a
mail provider, and it lands in the tenant's outbox exactly like an HTTP submit.

`mailgate serve --smtp-port 587` starts it (off by default; `--demo` starts it on a loopback port
with a self-signed certificate). The rules:

- TLS first. Every command but EHLO, NOOP, QUIT and STARTTLS is refused (530) until STARTTLS,
  also on loopback: an API token never crosses a connection in clear. The certificate and key come
  from `MAILGATE_SMTP_CERT` / `MAILGATE_SMTP_KEY` (or `--smtp-cert` / `--smtp-key`).
- AUTH PLAIN or LOGIN: the password is an API token (`access.ApiTokens.authenticate`, the same
  check the HTTP API makes), the user the tenant id, or empty. A sender token sends for its
  tenant; a system-admin token for the tenant the user names. Nothing else authenticates (535).
- MAIL FROM and RCPT TO are validated as addresses (553); RCPT TO at most MAX_RECIPIENTS (452).
  The envelope decides who gets the message: recipients in To/Cc that are not in RCPT TO are left
  out of the headers, and RCPT TO recipients not in To/Cc are Bcc (never in the headers). The
  envelope sender is the mail server's, as for an HTTP submit (MAIL FROM is checked, not used).
- DATA is parsed into a `Message` (message.py validates it: header injection, bounds, forbidden
  characters) and stored through `Mailgate.accept`, the HTTP path's group commit: `250` only once
  it is committed, `451 4.3.0` when the database can't be used, `552` over the size limit,
  `550 5.7.1` when sending is disabled for the tenant, `554 5.6.0` for a message mailgate can't
  send as given. The server's sender policy applies to the From header at send time, as it does
  to an HTTP submit's `from`.
- Bounds: connections at once (`MAILGATE_SMTP_MAX_CONNECTIONS`) and from one client address
  (`MAILGATE_SMTP_MAX_CONNECTIONS_PER_ADDRESS`, 10; an IPv6 client by its /64), time to complete
  the TLS handshake (TLS_HANDSHAKE_TIMEOUT) and to authenticate (AUTH_DEADLINE), messages per
  connection, AUTH attempts per connection and failed ones per client address (`AuthFailures`,
  the admin sign-in's numbers), unknown commands (aiosmtpd: 5), line length (an AUTH answer too),
  idle time, MIME parts, their depth and header fields of a message, and a per-token rate
  (`MAILGATE_SMTP_TOKEN_RATE` messages per second, bursts of that many times BURST_SECONDS).
- No token reaches a log: aiosmtpd logs the lines a client sends, and a filter on its logger keeps
  only the command of a line (an AUTH line without its argument).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.errors
import email.policy
import ipaddress
import logging
import mimetypes
import re
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from email.headerregistry import AddressHeader
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser, HeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException, syntax

from .accounts import FAILURE_WINDOW, FAILURES_ALLOWED
from .capture import _quiet_message_content, close_smtp_server
from .errors import InvalidInput, MessageError, NotFound, SendingDisabled, traceback_of
from .message import (
    DEFAULT_MAX_SIZE,
    FORBIDDEN_HEADERS,
    MAX_RECIPIENTS,
    Address,
    Attachment,
    Message,
    with_charset,
)

if TYPE_CHECKING:
    from .access import Principal
    from .service import Mailgate

log = logging.getLogger("mailgate.ingress")

MAX_MESSAGES_PER_CONNECTION = 1_000  # then 421: a client reconnects, and connections are shared fairly
MAX_AUTH_ATTEMPTS = 3  # per connection: a guessed token costs a new TLS handshake every 3 tries
IDLE_TIMEOUT = 120.0  # seconds without a command before the connection is closed
BURST_SECONDS = 2.0  # a token may send token_rate × this at once before the rate applies
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds from STARTTLS to a completed handshake; then the connection is closed
MAX_CONNECTIONS_PER_ADDRESS = 10  # from one client address at once (an IPv6 client: its /64); then 421
AUTH_DEADLINE = 30.0  # seconds from connecting to a successful AUTH; then 421 and the connection is closed
MAX_TRACKED_ADDRESSES = 10_000  # client addresses AuthFailures remembers (the oldest window goes first)
MAX_AUTH_LINE = 1_000  # bytes of an AUTH answer (a token and a tenant id in base64 need ~150); then 501
MAX_MIME_PARTS = 500  # entities of a message's MIME tree, the message itself included; then 554 5.6.0
MAX_HEADER_FIELDS = 5_000  # header fields of a message, its parts' included; then 554 5.6.0
# Parts inside parts (an attached message/rfc822 and its own parts included); then 554 5.6.0. Real
# mail nests 3-5 deep, each message forwarded as an attachment 2-3 more. The email package and
# from_bytes walk the tree recursively (~300 deep was a RecursionError), and each line of a part is
# matched against every boundary open around it: 3 MB of short lines took 0.4 s to parse 1 deep,
# 1.9 s 20 deep, 2.8 s 30 deep.
MAX_MIME_DEPTH = 20
# Headers a client adds that mean nothing once mailgate composes the message again (a DKIM or ARC
# signature would fail, and the receiving side adds its own Authentication-Results).
_DROPPED_HEADERS = frozenset({"bcc", "dkim-signature", "arc-seal", "arc-message-signature",
                              "arc-authentication-results", "authentication-results", "x-mailer-sender",
                              "delivered-to", "content-length", "x-original-to"})  # fmt: skip
_POLICY = email.policy.default
_BARE = r"[^\s<>\"(),;:\\\[\]@]+@[^\s<>\"(),;:\\\[\]@]+"
_BARE_LIST = re.compile(f"{_BARE}(?:\\s*,\\s*{_BARE})*")
_UTF8_LOCAL = email.errors.NonASCIILocalPartDefect  # RFC 6532 allows it; Address checks the rest


class TokenRate:
    """Per-token token buckets (in memory, per process): `rate` messages a second, bursts of
    rate × BURST_SECONDS."""

    def __init__(self, rate: float) -> None:
        self.rate, self.burst = rate, max(1.0, rate * BURST_SECONDS)
        self._buckets: dict[int | None, tuple[float, float]] = {}

    def take(self, key: int | None) -> float:
        """0 when a message may go now (and counts it); else the seconds until one may."""
        at = time.monotonic()
        level, last = self._buckets.get(key, (self.burst, at))
        level = min(self.burst, level + (at - last) * self.rate)
        if level < 1:
            self._buckets[key] = (level, at)
            return (1 - level) / self.rate
        if len(self._buckets) > 10_000:
            self._buckets.clear()
        self._buckets[key] = (level - 1, at)
        return 0.0


class AuthFailures:
    """Failed AUTH per client address (`client_address`), in memory (per process): after
    `allowed` in a window of `window` seconds from the first, every AUTH from the address is
    refused (454) until the window has passed. The admin sign-in's lockout (accounts.py) with
    the same numbers, and as there, parallel guesses get no more token lookups than are allowed:
    a lookup starts only while the failures so far and the lookups in flight stay below
    `allowed`, else it waits for those to end (an application opening a pool of connections
    authenticates them all; a guesser is refused). At most `limit` addresses are remembered;
    past that the oldest window is forgotten first."""

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window: float = FAILURE_WINDOW,
        limit: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed, self.window, self.limit, self.clock = allowed, window, limit, clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # (failures, window start), oldest first
        self._in_flight: dict[str, int] = {}  # lookups begun and not ended, by address
        self._ended = asyncio.Event()  # set (and replaced) when a lookup ends

    def __len__(self) -> int:
        return len(self._failures)

    def _count(self, address: str) -> int:
        found = self._failures.get(address)
        if found is None:
            return 0
        if found[1] <= self.clock() - self.window:
            del self._failures[address]
            return 0
        return found[0]

    def refused(self, address: str) -> bool:
        """Whether an AUTH from `address` is refused now."""
        return self._count(address) >= self.allowed

    async def begin(self, address: str) -> bool:
        """A token lookup for `address` may begin (end() must follow); False when refused."""
        while True:
            failures, in_flight = self._count(address), self._in_flight.get(address, 0)
            if failures >= self.allowed:
                return False
            if failures + in_flight < self.allowed:
                self._in_flight[address] = in_flight + 1
                return True
            await self._ended.wait()  # in_flight > 0 here: one of them ends

    def end(self, address: str, *, failed: bool) -> None:
        left = self._in_flight.get(address, 0) - 1
        if left > 0:
            self._in_flight[address] = left
        else:
            self._in_flight.pop(address, None)
        if failed:
            self.fail(address)
        self._ended.set()
        self._ended = asyncio.Event()

    def fail(self, address: str) -> None:
        failures = self._count(address)
        if failures:
            self._failures[address] = (failures + 1, self._failures[address][1])
            return
        at = self.clock()
        while self._failures:  # windows that have passed, then the oldest while full
            oldest, (_, start) = next(iter(self._failures.items()))
            if start > at - self.window and len(self._failures) < self.limit:
                break
            del self._failures[oldest]
        self._failures[address] = (1, at)

    def clear(self) -> None:
        self._failures.clear()


def client_address(peer: Any) -> str:
    """The address a client's connections and failed AUTH are counted by: its IPv4 address, or
    the /64 of its IPv6 address (one subscriber usually has a whole /64 to pick addresses from)."""
    host = str(peer[0] if isinstance(peer, tuple) and peer else peer)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class _Login:
    principal: Principal
    tenant: str
    token: str = field(repr=False)  # looked up again at every MAIL: a token revoked meanwhile stops sending


class IngressServer:
    """`async with IngressServer(mg, "127.0.0.1", 587, tls) as ingress:` serves until the block ends."""

    def __init__(
        self,
        mg: Mailgate,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        *,
        max_connections: int = 100,
        max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        token_rate: float = 50.0,
        max_size: int = DEFAULT_MAX_SIZE,
        hostname: str = "localhost",
    ) -> None:
        self.mg = mg
        self.host, self._port = host, port
        self.tls = tls
        self.max_connections, self.max_connections_per_address = max_connections, max_connections_per_address
        self.max_size = max_size
        self.hostname = hostname
        self.rate = TokenRate(token_rate)
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[_Session] = weakref.WeakSet()
        self._per_address: dict[str, int] = {}  # connections open, by client_address
        self.auth_failures = AuthFailures()
        self._handler = _Handler(self)

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        _quiet_message_content()  # aiosmtpd logs message lines at DEBUG: never a message's content
        mail_log = logging.getLogger("mail.log")
        if _no_secrets not in mail_log.filters:
            mail_log.addFilter(_no_secrets)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Session(self), self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await close_smtp_server(server, self._sessions)

    def admit(self, session: _Session, address: str) -> str | None:
        """Take a new connection from `address`; else the greeting refusing it (RFC 5321 4.3.2)."""
        if len(self._sessions) >= self.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        if self._per_address.get(address, 0) >= self.max_connections_per_address:
            return "421 4.7.0 Too many connections from your address, try again later"
        self._sessions.add(session)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def release(self, session: _Session, address: str) -> None:
        self._sessions.discard(session)
        left = self._per_address.get(address, 0) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    async def __aenter__(self) -> IngressServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def login(self, user: bytes, password: bytes) -> _Login | str:
        """The login a user and password stand for, or the reply refusing them."""
        refused = "535 5.7.8 Authentication credentials invalid"
        try:
            name, token = user.decode("utf-8").strip(), password.decode("utf-8").strip()
        except UnicodeDecodeError:
            return refused
        try:
            principal = await self.mg.api_tokens.authenticate(token)
            if principal is None or principal.role not in ("sender", "system-admin"):
                return refused  # unknown, revoked, or a role that may not submit (tenant-admin)
            if principal.role == "sender":
                assert principal.tenant is not None
                if name not in ("", principal.tenant):
                    return refused  # the token of another tenant than the one named
                tenant = principal.tenant
            else:
                if not name:
                    return refused  # a system-admin token sends for the tenant the user names
                await self.mg.tenants.get(name)
                tenant = name
        except NotFound:
            return refused
        except Exception as e:
            return _trouble("AUTH", e, "454 4.7.0 Temporary authentication failure, try again later")
        return _Login(principal, tenant, token)

    async def may_send(self, login: _Login) -> str | None:
        """None when this login may start a message now; else the reply refusing it."""
        try:
            if await self.mg.api_tokens.authenticate(login.token) is None:
                return "535 5.7.8 The token was revoked"
        except Exception as e:
            return _trouble("MAIL", e, "451 4.3.0 mailgate's database can't be used just now, try again later")
        wait = self.rate.take(login.principal.token_id)
        if wait:
            return f"451 4.7.1 This token's sending rate is used up, try again in {wait:.1f} s"
        return None

    async def store(self, login: _Login, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if len(raw) > self.max_size:
            return f"552 5.3.4 The message is larger than {self.max_size:,} bytes"
        try:
            # In a worker thread: parsing a large message takes a while, and other tenants'
            # sessions share this event loop.
            message = await asyncio.to_thread(from_bytes, raw, list(envelope.rcpt_tos), max_size=self.max_size)
        except MessageError as e:
            if any(field == "size" for field, _ in e.problems):
                return f"552 5.3.4 The message would be larger than {self.max_size:,} bytes once composed"
            return "554 5.6.0 " + _one_line(str(e))
        except Exception as e:  # the email package's parser bugs: this message, not a passing trouble
            log.error("could not read a message received by SMTP: %s", traceback_of(e))
            return "554 5.6.0 mailgate could not read this message (the operator's log has the error type)"
        try:
            done = await self.mg.accept(login.tenant, message)
        except SendingDisabled as e:
            return "550 5.7.1 Sending is disabled for this tenant: " + _one_line(str(e))
        except InvalidInput as e:
            return "554 5.6.0 " + _one_line(str(e))
        except Exception as e:
            return _trouble("DATA", e, "451 4.3.0 mailgate's database can't be used just now, try again later")
        return f"250 2.0.0 Ok: queued as {done.id}" + (" (held: sending is disabled)" if done.status == "held" else "")


def _trouble(where: str, e: Exception, reply: str) -> str:
    from .api.errors import unavailable

    reason = unavailable(e)
    if reason is not None:
        log.warning("database unavailable in SMTP %s: %s (%s)", where, reason, type(e).__name__)
        return reply
    log.error("internal error in SMTP %s: %s", where, traceback_of(e))
    return "451 4.3.0 mailgate failed to take this message, try again later (the operator's log says why)"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_LINE_TOO_LONG = f"501 5.5.6 Authentication exchange line is too long (at most {MAX_AUTH_LINE:,} bytes)"
_LOCKED_OUT = "454 4.7.0 Too many failed authentications from your address, try again later"
_COMMANDS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
                       "STARTTLS"})  # fmt: skip
# aiosmtpd's log records that quote what a client sent: a line, or its first word.
_CLIENT_TEXT = frozenset({"_handle_client readline: %r", "%r >> %r", "%r unrecognised: %s", "%r over limit for %s",
                          "%r can't decode base64: %s"})  # fmt: skip


def _command_only(text: object) -> object:
    """What a client sent, as far as it is an SMTP command: an AUTH line without its argument,
    anything else not a known command by its length. A client out of step with the AUTH exchange
    sends its base64 token as a line of its own, and aiosmtpd's sanitizing misses that."""
    if not isinstance(text, bytes | str):
        return text
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    words = raw.split()
    verb = words[0].decode("ascii", "replace").upper() if words else ""
    if verb == "AUTH":
        return "AUTH" + (" " + words[1].decode("ascii", "replace")[:20] if len(words) > 1 else "") + (
            " ********" if len(words) > 2 else "")  # fmt: skip
    if verb in _COMMANDS:
        return text
    return f"<{len(raw)} bytes, not a command>"


def _reply_only(reply: object) -> object:
    """A reply as logged: without the client's text that aiosmtpd quotes in some of its replies
    ('500 Error: command "…" not recognized', '421 4.7.0 … sent too many times')."""
    if isinstance(reply, bytes) and (b'"' in reply or reply.endswith(b" sent too many times")):
        return reply[:3].decode("ascii", "replace") + " (a reply quoting what the client sent)"
    return reply


class _NoSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            if record.msg in _CLIENT_TEXT:
                record.args = tuple(_command_only(a) if isinstance(a, bytes | str) else a for a in record.args)
            elif record.msg == "%r << %r":
                record.args = tuple(_reply_only(a) for a in record.args)
        return True


_no_secrets = _NoSecrets()


class _QuietSession(Session):
    # aiosmtpd sets login_data at every AUTH and logs a deprecation warning each time it does.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Session(SMTP):
    def __init__(self, ingress: IngressServer) -> None:
        super().__init__(
            ingress._handler,
            data_size_limit=ingress.max_size,
            enable_SMTPUTF8=True,
            hostname=ingress.hostname,  # else socket.getfqdn(), which may wait on DNS
            ident="mailgate ESMTP submission",
            tls_context=ingress.tls,
            require_starttls=True,
            timeout=IDLE_TIMEOUT,
            auth_required=True,
            auth_require_tls=True,
            auth_exclude_mechanism=["CRAM-MD5"],
            command_call_limit={
                "AUTH": MAX_AUTH_ATTEMPTS,
                "MAIL": MAX_MESSAGES_PER_CONNECTION,
                "STARTTLS": 1,
                "EHLO": 10,
                "HELO": 10,
                "*": 100 * MAX_RECIPIENTS,
            },
            loop=asyncio.get_running_loop(),
        )
        self._ingress = ingress
        self._address: str | None = None  # client_address, once the connection is taken
        self._deadline: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Timeout | None = None  # from STARTTLS to the end of its handshake

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._address is not None:  # again at STARTTLS, with the TLS transport
            super().connection_made(transport)
            return
        address = client_address(transport.get_extra_info("peername"))
        refused = self._ingress.admit(self, address)
        if refused is not None:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refused.encode() + b"\r\n")
            transport.close()
            return
        self._address = address
        self._deadline = self.loop.call_later(AUTH_DEADLINE, self._not_authenticated)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        address, self._address = self._address, None
        if address is None:
            return  # refused at the greeting (aiosmtpd never saw it), or already lost
        if self._deadline is not None:
            self._deadline.cancel()
        self._ingress.release(self, address)
        super().connection_lost(error)

    def _not_authenticated(self) -> None:
        if self.transport is None or self.session is None or self.session.authenticated:
            return
        log.info("an SMTP client at %s did not authenticate within %s s", self._address, AUTH_DEADLINE)
        if self._handshake is not None:  # amid the handshake: ended as a stalled one is (see smtp_STARTTLS)
            self._handshake.reschedule(self.loop.time())
            return
        assert isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(f"421 4.7.0 Not authenticated within {AUTH_DEADLINE:g} seconds, closing\r\n".encode())
        self.transport.close()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # A handshake that does not complete in TLS_HANDSHAKE_TIMEOUT ends as a failed one does:
        # aiosmtpd closes the connection and calls connection_lost for TLSSetupException. Closing
        # the transport amid the handshake is not enough: asyncio's SSL layer then tells neither
        # aiosmtpd nor us, the session waits for a line forever and its connection stays counted
        # against the client's address.
        try:
            async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT) as self._handshake:
                await super().smtp_STARTTLS(arg)
        except TimeoutError:
            raise TLSSetupException("the TLS handshake did not complete in time") from None
        finally:
            self._handshake = None

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self._address is not None and self._ingress.auth_failures.refused(self._address):
            await self.push(_LOCKED_OUT)
            return
        # A mechanism is named in upper case only (RFC 4422 3.1), so "plain" can only mean PLAIN,
        # and an SMTP command's argument values are not case-sensitive (RFC 5321 2.4): aiosmtpd's
        # case-sensitive lookup answered "AUTH plain" 504.
        words = arg.split(None, 1)
        if words:
            arg = " ".join([words[0].upper(), *words[1:]])
        await super().smtp_AUTH(arg)

    # PLAIN and LOGIN are ours, not aiosmtpd's: its logs an answer that is not base64 (a token
    # sent as is) and took an answer longer than a line for an internal error (451), reading the
    # rest of that line as commands; and the token is looked up in the database, asynchronously.

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._answer(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        fields = blob.split(b"\0")  # authorization id (unused), user, password (RFC 4616)
        if len(fields) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._decide(fields[1], fields[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        user = await self._answer(args, self.AuthLoginUsernameChallenge)
        if user is None:
            return AuthResult(success=False, handled=True)
        password = await self._answer([], self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._decide(user, password)

    async def _answer(self, args: list[str], challenge: str) -> bytes | None:
        """The decoded initial response in `args`, or the answer to a 334 `challenge`; None when
        a refusal was sent."""
        if len(args) > 1:
            line = args[1].encode("utf-8", "surrogateescape")
            line = b"" if line == b"=" else line  # RFC 4954 4: "=" is an empty initial response
        else:
            await self.push(b"334 " + base64.b64encode(challenge.encode()))
            try:
                line = (await self._reader.readuntil(b"\n")).strip()
            except asyncio.IncompleteReadError:
                return None  # the client went away
            except asyncio.LimitOverrunError as e:  # no more than the reader's limit is buffered
                if not await self._skip_line(e.consumed):
                    return None
                await self.push(_LINE_TOO_LONG)
                return None
            if line == b"*":
                await self.push("501 5.7.0 Auth aborted")
                return None
        if len(line) > MAX_AUTH_LINE:
            await self.push(_LINE_TOO_LONG)
            return None
        try:
            return base64.b64decode(line, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _skip_line(self, consumed: int) -> bool:
        """Read past the end of an overlong line, keeping no more than the reader's limit; False
        when the client went away. A line that never ends is ended by AUTH_DEADLINE."""
        try:
            await self._reader.readexactly(consumed)
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    return True
                except asyncio.LimitOverrunError as e:
                    await self._reader.readexactly(e.consumed)
        except asyncio.IncompleteReadError:
            return False

    async def _decide(self, user: bytes, password: bytes) -> AuthResult:
        address, failures = self._address, self._ingress.auth_failures
        assert address is not None
        if not await failures.begin(address):
            return AuthResult(success=False, handled=False, message=_LOCKED_OUT)
        found: _Login | str = "454 4.7.0 The connection ended"
        try:
            found = await self._ingress.login(user, password)
        finally:  # also when the connection ends meanwhile
            failures.end(address, failed=isinstance(found, str) and found.startswith("535"))
        if isinstance(found, str):
            return AuthResult(success=False, handled=False, message=found)
        if self._deadline is not None:
            self._deadline.cancel()
        return AuthResult(success=True, auth_data=found)


class _Handler:
    # aiosmtpd takes every handle_* attribute as a hook and every auth_* as a mechanism.
    def __init__(self, ingress: IngressServer) -> None:
        self._ingress = ingress

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands one line at a time and answers each in order, so pipelined
        # commands (RFC 2920) work; it just does not say so.
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        login = session.auth_data
        assert isinstance(login, _Login)
        if address != "<>":  # a null reverse-path is a bounce's, taken as is (it is not used)
            try:
                Address(address)
            except ValueError as e:
                return "553 5.1.7 The sender address is not valid: " + _one_line(str(e), 200)
        refused = await self._ingress.may_send(login)
        if refused is not None:
            return refused
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS:,} per message"
        try:
            Address(address)
        except ValueError as e:
            return "553 5.1.3 The recipient address is not valid: " + _one_line(str(e), 200)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data
        assert isinstance(login, _Login)
        return await self._ingress.store(login, envelope)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client's handshake failed or stalled; aiosmtpd closes
            cause = error.__cause__ or error
            log.info("an SMTP client's TLS handshake failed: %s", _one_line(f"{type(cause).__name__}: {cause}", 200))
            return "421 4.7.0 TLS handshake failed"
        log.error("internal error in an SMTP session: %s", traceback_of(error))
        return "451 4.3.0 mailgate failed to answer this command (the operator's log says why)"


# ---- RFC 5322 bytes to a Message -------------------------------------------------------------------


def from_bytes(raw: bytes, rcpt_tos: list[str], *, max_size: int = DEFAULT_MAX_SIZE) -> Message:
    """The Message a client's RFC 5322 bytes and envelope recipients stand for: From, To, Cc,
    Reply-To, Subject, Message-ID, Date and other headers from the top-level header, the first
    text/plain and text/html parts as the bodies, every other part an attachment (inline when it
    has a Content-ID). Delivery follows the envelope: To/Cc keep only envelope recipients, the
    rest of the envelope becomes Bcc. MessageError lists what can't be sent as given."""
    try:
        return _from_bytes(raw, rcpt_tos, max_size)
    except RecursionError:
        # The email package reads a header's comments inside comments recursively, when the
        # header is first used: one nested ~300 deep in Content-Transfer-Encoding, ~1,000 deep in
        # From or Content-Disposition, ran out of Python's recursion limit. (MIME parts are
        # bounded by MAX_MIME_DEPTH before that.)
        raise MessageError([("message", "has a header with comments nested too deep to be read")]) from None


def _from_bytes(raw: bytes, rcpt_tos: list[str], max_size: int) -> Message:
    try:
        msg = _parse(raw)
        head = _utf8_headers(raw) or msg
    except MessageError:
        raise
    except Exception:  # the email package has parser bugs; one odd message is one refusal
        raise MessageError([("message", "could not be parsed as an RFC 5322 message")]) from None
    problems: list[tuple[str, str]] = []
    present = {name.lower() for name in head}

    def mailboxes(name: str) -> list[Address]:
        found: list[Address] = []
        if name not in present:
            return []
        raw_values = [v for n, v in head.raw_items() if n.lower() == name]
        if all(_BARE_LIST.fullmatch(v.strip()) for v in raw_values):
            # Bare addresses, comma-separated (what most programs write): Address checks them
            # without the email package's parser (~100 µs a header).
            return [one for v in raw_values for a in v.split(",") if (one := _bare(name, a.strip())) is not None]
        try:
            values = head.get_all(name) or []
        except ValueError:  # the email package's own refusal, e.g. a line break in a display name
            problems.append((name, "is not a valid address list (a line break in a name or address?)"))
            return []
        for value in values:
            if not isinstance(value, AddressHeader) or any(
                not isinstance(d, _UTF8_LOCAL) for d in getattr(value, "defects", ())
            ):
                problems.append((name, "is not a valid address list"))
                continue
            for a in value.addresses:
                try:
                    found.append(Address(a.addr_spec, a.display_name or ""))
                except ValueError as e:
                    problems.append((name, f"{a.addr_spec!r} is not a valid address: {e}"))
        return found

    def _bare(name: str, text: str) -> Address | None:
        try:
            return Address(text)
        except ValueError as e:
            problems.append((name, f"{text!r} is not a valid address: {e}"))
            return None

    envelope: dict[str, Address] = {}
    for i, r in enumerate(rcpt_tos):
        try:
            a = Address(r)
        except ValueError as e:
            problems.append((f"rcpt_to[{i}]", f"{r!r} is not a valid address: {e}"))
            continue
        envelope.setdefault(a.address, a)
    senders = mailboxes("from")
    if len(senders) > 1:
        problems.append(("from", "names more than one mailbox; mailgate sends from one"))
    to = [a for a in mailboxes("to") if a.address in envelope]
    cc = [a for a in mailboxes("cc") if a.address in envelope]
    shown = {a.address for a in (*to, *cc)}
    bcc = [a for key, a in envelope.items() if key not in shown]
    reply_to = mailboxes("reply-to")

    # The other headers from their raw text (unfolded, RFC 2047 words decoded): the email package's
    # header objects cost ~100 µs each and are made again at every access; only addresses need them.
    headers: list[tuple[str, str]] = []
    first: dict[str, str] = {}
    for name, raw_value in head.raw_items():
        value = _unstructured(raw_value)
        first.setdefault(name.lower(), value)
        if name.lower() not in FORBIDDEN_HEADERS and name.lower() not in _DROPPED_HEADERS:
            headers.append((name, value))
    date: datetime | None = None
    if "date" in first:
        try:
            parsed = parsedate_to_datetime(first["date"])
            date = parsed if parsed.tzinfo is not None else None
        except (TypeError, ValueError):
            date = None  # a Date mailgate can't read: the time it was received
    message_id = first.get("message-id") or None

    text = html = None
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    if text_part is not None:
        text = _decoded(text_part)
    if html_part is not None:
        html = _decoded(html_part)
    attachments = []
    for i, part in enumerate(p for p in _leaves(msg) if p is not text_part and p is not html_part):
        content_type = part.get_content_type()
        if part.get_content_maintype() == "message":
            inner = part.get_payload()
            data = inner[0].as_bytes() if isinstance(inner, list) and inner and not isinstance(inner[0], str) else b""
        else:
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename() or f"attachment-{i + 1}{mimetypes.guess_extension(content_type) or '.bin'}"
        cid = part["content-id"]
        content_id = str(cid).strip().strip("<>") if cid is not None else None
        charset = part.get_content_charset() if part.get_content_maintype() != "message" else None
        attachments.append(Attachment(filename, with_charset(content_type, charset), data, content_id or None))
    if problems:
        raise MessageError(problems)
    return Message(
        from_=senders[0] if senders else None, to=to, cc=cc, bcc=bcc, reply_to=reply_to,
        subject=first.get("subject", ""), text=text, html=html, attachments=attachments,
        headers=headers, message_id=message_id, date=date, max_size=max_size,
    )  # fmt: skip


# While _parse runs (in its thread or task): the MIME entities and header fields made so far.
_PARSED: ContextVar[list[int] | None] = ContextVar("_PARSED", default=None)


class _CountedMessage(EmailMessage):
    """An EmailMessage that counts, while _parse runs, the parts and header fields the parser
    makes: a message of a million empty parts is refused at the 501st, not built (~70 µs and a few
    KB each) and then refused. It also knows how deep it is: the parser attaches each part to
    the one around it as it starts reading it, so a part nested too deep is refused before the
    parser (one generator per level) goes any deeper."""

    _depth = 0  # the message itself; a part inside it 1, and so on

    def __init__(self, policy: Any = None) -> None:
        super().__init__(policy)
        _count(0, MAX_MIME_PARTS, "MIME parts")

    def attach(self, payload: Any) -> None:
        if isinstance(payload, _CountedMessage) and _PARSED.get() is not None:
            payload._depth = self._depth + 1
            if payload._depth > MAX_MIME_DEPTH:
                raise MessageError([("message", f"has MIME parts nested more than {MAX_MIME_DEPTH} deep")])
        super().attach(payload)

    def set_raw(self, name: str, value: Any) -> None:
        _count(1, MAX_HEADER_FIELDS, "header fields")
        super().set_raw(name, value)


def _count(which: int, limit: int, what: str) -> None:
    counts = _PARSED.get()
    if counts is not None:
        counts[which] += 1
        if counts[which] > limit:
            raise MessageError([("message", f"has more than {limit:,} {what}")])


_COUNTED_POLICY = _POLICY.clone(message_factory=_CountedMessage)


def _parse(raw: bytes) -> EmailMessage:
    reset = _PARSED.set([0, 0])
    try:
        parsed = BytesParser(policy=_COUNTED_POLICY).parsebytes(raw)
    finally:
        _PARSED.reset(reset)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _unstructured(raw_value: str) -> str:
    """A header's text: unfolded, RFC 2047 encoded words decoded (unknown charsets left as sent)."""
    value = " ".join(raw_value.split())
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        return value


def _utf8_headers(raw: bytes) -> EmailMessage | None:
    """The top-level header parsed as UTF-8 (RFC 6532, what SMTPUTF8 clients send), when it is not
    plain ASCII: the bytes parser would read those octets as unknown-8bit."""
    end = raw.find(b"\r\n\r\n")
    block = raw if end < 0 else raw[: end + 2]
    if block.isascii():
        return None
    parsed = HeaderParser(policy=_POLICY).parsestr(block.decode("utf-8"))
    assert isinstance(parsed, EmailMessage)
    return parsed


def _decoded(part: MIMEPart) -> str:
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):  # a charset Python does not know
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return str(content).replace("\r\n", "\n")


def _leaves(part: MIMEPart) -> list[MIMEPart]:
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        return [leaf for sub in part.iter_parts() for leaf in _leaves(sub)]
    return [part]


# ---- TLS ---------------------------------------------------------------------------------------------


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """The submission server's TLS context (TLS 1.2 or newer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def self_signed(directory: Path, hostnames: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
                ) -> tuple[Path, Path]:  # fmt: skip
    """A self-signed certificate and its key (mode 0600) written into `directory`, for `--demo`:
    clients must be told not to verify it (or to trust this file)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    at = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(at - dt.timedelta(days=1))
        .not_valid_after(at + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = directory / "smtp.crt", directory / "smtp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


__all__ = ["IngressServer", "TokenRate", "from_bytes", "self_signed", "server_context"]
