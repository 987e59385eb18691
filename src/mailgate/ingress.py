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
- Bounds: connections at once (`MAILGATE_SMTP_MAX_CONNECTIONS`), messages per connection, AUTH
  attempts, unknown commands (aiosmtpd: 5), line length, idle time, and a per-token rate
  (`MAILGATE_SMTP_TOKEN_RATE` messages per second, bursts of that many times BURST_SECONDS).
"""

from __future__ import annotations

import asyncio
import email.errors
import email.policy
import logging
import mimetypes
import re
import ssl
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from email.header import decode_header, make_header
from email.headerregistry import AddressHeader
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser, HeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

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
TLS_HANDSHAKE_TIMEOUT = 10.0
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


@dataclass(frozen=True)
class _Login:
    principal: Principal
    tenant: str
    token: str  # looked up again at every MAIL: a token revoked meanwhile stops sending


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
        token_rate: float = 50.0,
        max_size: int = DEFAULT_MAX_SIZE,
        hostname: str = "localhost",
    ) -> None:
        self.mg = mg
        self.host, self._port = host, port
        self.tls = tls
        self.max_connections = max_connections
        self.max_size = max_size
        self.hostname = hostname
        self.rate = TokenRate(token_rate)
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[_Session] = weakref.WeakSet()
        self._handler = _Handler(self)

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        _quiet_message_content()  # aiosmtpd logs message lines at DEBUG: never a message's content
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.BaseProtocol:
            if len(self._sessions) >= self.max_connections:
                return _Refuse()
            session = _Session(self)
            self._sessions.add(session)
            return session

        self._server = await loop.create_server(protocol, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await close_smtp_server(server, self._sessions)

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
            message = from_bytes(raw, list(envelope.rcpt_tos), max_size=self.max_size)
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


class _Refuse(asyncio.Protocol):
    """A connection over the limit: told so (RFC 5321 4.3.2: 421 at the greeting) and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
        transport.close()


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

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd parses PLAIN and LOGIN and then asks synchronously; the token is looked up in
        # the database, so the answer here is provisional and auth_PLAIN/auth_LOGIN below decide.
        return AuthResult(success=True, auth_data=auth_data)

    async def _decide(self, provisional: AuthResult) -> AuthResult:
        if not provisional.success or not isinstance(provisional.auth_data, LoginPassword):
            return provisional
        found = await self._ingress.login(provisional.auth_data.login, provisional.auth_data.password)
        if isinstance(found, str):
            return AuthResult(success=False, handled=False, message=found)
        return AuthResult(success=True, auth_data=found)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._decide(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._decide(await super().auth_LOGIN(_, args))


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
        msg = BytesParser(policy=_POLICY).parsebytes(raw)
        head = _utf8_headers(raw) or msg
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
