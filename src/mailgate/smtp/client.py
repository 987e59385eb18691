"""The SMTP client: one connection, its session set-up, and message transactions over it.

It pipelines (RFC 2920) when the server offers PIPELINING: MAIL FROM, every RCPT TO and DATA go
out in one write and their replies are matched in order, then the body goes out in a second
write: two round trips per message instead of 2 + recipients. `send_many` goes further for a
row of messages: each body and final dot go out with the next message's MAIL/RCPT/DATA, one
round trip (and one write) per message. Everything a transaction learns
is returned per recipient in a `Delivery`; errors that stop the session itself (connect, TLS,
AUTH, a timeout) raise an `SMTPError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..delivery import Delivery, Outcome, RecipientResult
from ..errors import MessageError
from ..message import Envelope
from . import auth as _auth
from .auth import Credentials
from .errors import (
    SMTPAuthError,
    SMTPConnectError,
    SMTPDisconnectedError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPProtocolError,
    SMTPResponseError,
    SMTPSecurityError,
    SMTPTimeoutError,
    SMTPTLSError,
)
from .protocol import ProtocolLog, SMTPProtocol
from .reply import Reply

Security = Literal["none", "starttls", "starttls-required", "tls"]
Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
SECURITY_MODES: tuple[Security, ...] = ("none", "starttls", "starttls-required", "tls")

_UNSAFE_IN_PATH = re.compile(r"[\x00-\x20\x7f<>]")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FQDN = re.compile(rf"(?=.{{4,253}}$){_LABEL}(?:\.{_LABEL})*\.[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_SMALL_BODY = 1 << 16  # below this, body and final dot go out in one write
QUIT_TIMEOUT = 5.0  # seconds for QUIT's reply, and then for the server to end its side
GREETING_PROBE_AFTER = 3.0  # seconds of silence (at most connect_timeout) before checking for implicit TLS


@dataclass(frozen=True)
class SMTPConfig:
    """Where and how to connect. Timeouts are seconds; `protocol_timeout` bounds every wait for
    a reply, `connect_timeout` the TCP connect and each TLS handshake.

    `resolve`, when given, turns `host` into the addresses to connect to (a destination policy:
    `DestinationPolicy.resolve`, which checks each address and raises DestinationRefused); the
    client then connects to those addresses only, never to the name again, and still checks the
    certificate against `host`. None: the name is resolved by the connect itself, unchecked.
    """

    host: str
    port: int = 587
    security: Security = "starttls-required"
    verify_certificate: bool = True
    ca_file: str | None = None  # a file on this machine, read off the event loop
    ca_certificate: str | None = None  # PEM text; wins over ca_file
    helo_name: str | None = None
    connect_timeout: float = 30.0
    protocol_timeout: float = 60.0
    auth: Credentials | None = None
    resolve: Resolve | None = field(default=None, compare=False)

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"


# RFC 5321 4.5.3.1.8: a server must take at least 100 recipients per transaction; more in one
# transaction is never sent, even before a server said where its limit is.
MAX_RECIPIENTS = 100


class RecipientLimit:
    """How many recipients one transaction to a server may carry: as many as it accepted before
    it first answered "too many recipients" (Postfix smtpd_recipient_limit, Exim recipients_max,
    OpenSMTPD max-rcpt), at most MAX_RECIPIENTS.

    One per pool, shared by its connections: once learnt, no transaction to that server goes past
    it again (past it, Postfix counts every further RCPT as an error and, at smtpd_hard_error_limit,
    drops the session with "421 4.7.0 Error: too many errors")."""

    def __init__(self) -> None:
        self.learnt: int | None = None

    @property
    def per_transaction(self) -> int:
        return min(self.learnt, MAX_RECIPIENTS) if self.learnt else MAX_RECIPIENTS

    def learn(self, recipients: list[str], replies: list[Reply]) -> None:
        """Learn from one transaction's RCPT replies (in order, possibly cut short)."""
        accepted = 0
        for reply in replies[: len(recipients)]:
            if reply.code >= 400 and reply.too_many_recipients:
                if accepted and (self.learnt is None or accepted < self.learnt):
                    self.learnt = accepted
                return
            accepted += reply.code in (250, 251)


MAX_CA_FILE = 1 << 20  # bytes: a CA bundle (the system's is ~200 KiB) is never larger


async def tls_context(config: SMTPConfig) -> ssl.SSLContext:
    """The client context for `config`: TLS 1.2 or newer; with a private CA (`ca_certificate`,
    or the file `ca_file`) only that CA is trusted. A CA file is read in a thread, never on the
    event loop; contexts are kept by the CA's content."""
    if not config.verify_certificate:
        return _context(False, None)
    cadata = config.ca_certificate
    if cadata is None and config.ca_file:
        cadata = await asyncio.to_thread(read_ca_file, config.ca_file)
    return _context(True, cadata)


def read_ca_file(path: str) -> str:
    """The PEM text of a CA file: a regular file of at most MAX_CA_FILE bytes, else SMTPTLSError.

    Opened with O_NONBLOCK (a FIFO doesn't wait for a writer) and O_NOCTTY, and only after a
    stat said it is a regular file (opening a device can act on it); checked again on the open
    file (it may have been swapped meanwhile). Errors say no more than what is wrong with it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SMTPTLSError("the CA file (smtp.ca_file) is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        raise SMTPTLSError("the CA file (smtp.ca_file) cannot be read") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SMTPTLSError("the CA file (smtp.ca_file) is not a regular file")
        chunks, size = [], 0
        while size <= MAX_CA_FILE and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        raise SMTPTLSError("the CA file (smtp.ca_file) cannot be read") from None
    finally:
        os.close(fd)
    if size > MAX_CA_FILE:
        raise SMTPTLSError(f"the CA file (smtp.ca_file) is larger than {MAX_CA_FILE >> 20} MiB")
    return b"".join(chunks).decode("ascii", "replace")


@functools.lru_cache(maxsize=32)
def _context(verify: bool, cadata: str | None) -> ssl.SSLContext:
    if verify:
        if cadata is not None and not cadata.strip():  # not a reason to trust every public CA instead
            raise SMTPTLSError("the CA certificate is empty")
        try:
            ctx = ssl.create_default_context(cadata=cadata)  # without cadata: the system's CAs
        except (OSError, ssl.SSLError, ValueError):
            raise SMTPTLSError("the CA certificate is not valid: it must be PEM certificates") from None
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def default_helo_name(local_address: str | None) -> str:
    """The name to greet with when the settings give none: this machine's host name when it is
    fully qualified, else the address literal of our side of the connection (RFC 5321 4.1.3:
    "[192.0.2.5]", "[IPv6:2001:db8::1]"), never a bare single label, which Postfix's
    reject_non_fqdn_helo_hostname refuses ("504 5.5.2 … need fully-qualified hostname").

    Not socket.getfqdn(): it may wait seconds on DNS, on the event loop."""
    host = socket.gethostname().rstrip(".")
    if _FQDN.fullmatch(host):
        return host
    try:
        ip = ipaddress.ip_address((local_address or "").split("%", 1)[0])
    except ValueError:
        return "[127.0.0.1]"  # no address to tell (a transport that does not say): a literal all the same
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]" if ip.version == 4 else f"[IPv6:{ip}]"


class SMTPClient:
    """One SMTP connection. Use as `async with SMTPClient(config) as smtp: await smtp.send(…)`.

    `protocol_log`, when given, receives every line of the conversation ("C: …" / "S: …") with
    AUTH payloads replaced by "[redacted]" and message content by its size only (notification
    mail carries reset links and other secrets in its body).
    """

    def __init__(
        self,
        config: SMTPConfig,
        *,
        protocol_log: ProtocolLog | None = None,
        recipient_limit: RecipientLimit | None = None,
        learnt_mechanism: _auth.LearntMechanism | None = None,
    ) -> None:
        self.config = config
        self._log = protocol_log
        self.recipient_limit = recipient_limit or RecipientLimit()
        # Shared by a pool's connections, like the recipient limit: the password mechanism that worked.
        self.learnt_mechanism = learnt_mechanism or _auth.LearntMechanism()
        self._refusal: Reply | None = None  # a refusal of our HELO name in the transaction under way
        self._proto: SMTPProtocol | None = None
        self.greeting: Reply | None = None
        self.esmtp = False
        self.tls_version: str | None = None
        self.peer_certificate: dict[str, object] | None = None
        self.peer_certificate_der: bytes | None = None
        self.auth_mechanism: str | None = None
        self.auth_tries: list[_auth.AuthTry] = []  # every AUTH of this session, with the server's reply
        # XOAUTH2: the token this connection authenticated with, and when to stop using the
        # connection (the token's expiry less the margin; time.time() seconds).
        self.access_token: str | _auth.BearerToken | None = None
        self.token_renew_at: float | None = None
        self._learn({})

    def _learn(self, extensions: dict[str, str]) -> None:
        """Keep what EHLO said, and what the transactions need from it, worked out once."""
        self.extensions = extensions
        size = extensions.get("SIZE", "")
        self._max_size = int(size) if size.isdigit() and int(size) > 0 else None
        self._size = "SIZE" in extensions
        self._pipelining = "PIPELINING" in extensions
        self._8bitmime = "8BITMIME" in extensions
        self._smtputf8 = "SMTPUTF8" in extensions

    # ---- state ---------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        p = self._proto
        return p is not None and p.error is None and p.transport is not None and not p.transport.is_closing()

    @property
    def tls_active(self) -> bool:
        return self.tls_version is not None

    @property
    def pipelining(self) -> bool:
        return self._pipelining

    @property
    def max_size(self) -> int | None:
        """The server's SIZE limit in octets; None when it announces none (or "SIZE 0")."""
        return self._max_size

    @property
    def smtputf8(self) -> bool:
        return self._smtputf8

    @property
    def helo_name(self) -> str:
        """What the client greets the server with (EHLO/HELO)."""
        if self.config.helo_name:
            return self.config.helo_name
        transport = self._proto.transport if self._proto is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        return default_helo_name(local[0] if local else None)

    @property
    def auth_mechanisms(self) -> list[str]:
        return self.extensions.get("AUTH", "").upper().split()

    # ---- session -------------------------------------------------------------------------------

    async def __aenter__(self) -> SMTPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.quit()

    async def connect(self) -> None:
        """Connect, read the greeting, EHLO, STARTTLS as configured, EHLO again, and AUTH.

        The same phases are public one by one (`open`, `read_greeting`, `ehlo`, `starttls`,
        `authenticate`) for the test e-mail, which reports each as a step."""
        cfg = self.config
        try:
            await self.open()
            await self.read_greeting()
            await self.ehlo()
            if cfg.security in ("starttls", "starttls-required"):
                await self.starttls()
            if cfg.auth is not None:
                await self.authenticate(cfg.auth)
        except (SMTPAuthError, SMTPSecurityError, SMTPResponseError, SMTPConnectError) as e:
            # Refused, but the session itself still works (a reply came, in step): end it the
            # way the server expects, with QUIT and, over TLS, a close_notify.
            if e.code is not None or not isinstance(e, SMTPConnectError):
                await self.quit()
            self.close()
            raise
        except BaseException:  # a timeout, a broken session, a cancellation: drop it
            self.close()
            raise

    async def read_greeting(self) -> Reply:
        """The server's greeting, waited for up to protocol_timeout. A port that stays silent for
        GREETING_PROBE_AFTER seconds (less when connect_timeout or half the protocol_timeout is
        less) is checked for implicit TLS."""
        cfg = self.config
        read = asyncio.ensure_future(self._proto_().read(1, cfg.protocol_timeout))
        try:
            if cfg.security != "tls":
                await self._unless_implicit_tls(read)
            greeting = (await read)[0]
        finally:
            read.cancel()
        self.greeting = greeting
        if greeting.code != 220:
            raise SMTPConnectError.from_reply(f"{self.config.server} refused the session", greeting)
        return greeting

    async def _unless_implicit_tls(self, read: asyncio.Future[list[Reply]]) -> None:
        """Raise SMTPSecurityError when the server is silent because it waits for our TLS
        handshake (an implicit TLS port, 465, with security starttls or none).

        Such a server sends nothing until it gets a ClientHello, so the greeting would only time
        out after protocol_timeout, saying nothing useful. After a short silence (no byte at all:
        Postfix's postscreen sends its "220-" at once), a second connection to the same address
        tries a TLS handshake. Only a completed handshake counts; a slow SMTP server answers it
        with its greeting, which fails it, and the first connection's greeting is still awaited."""
        cfg = self.config
        proto = self._proto_()
        # Well before protocol_timeout, so the check has time to finish before the greeting's wait does.
        await asyncio.wait({read}, timeout=min(cfg.connect_timeout, GREETING_PROBE_AFTER, cfg.protocol_timeout / 2))
        if read.done() or proto.has_buffered_input:
            return
        probe = asyncio.ensure_future(self._answers_tls())
        try:
            either: list[asyncio.Future[Any]] = [read, probe]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probe.cancel()
        if read.done() or probe.cancelled() or not probe.result():
            return
        self.close()
        raise SMTPSecurityError(
            f"{cfg.server} speaks implicit TLS: it sent no SMTP greeting and answered a TLS handshake instead; "
            f"set security to tls for this port (usually 465), not {cfg.security}"
        )

    async def _answers_tls(self) -> bool:
        """Whether the server's address and port complete a TLS handshake (nothing is verified:
        only the protocol is in question; nothing is sent after it)."""
        cfg = self.config
        transport = self._proto_().transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return False
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                _, writer = await asyncio.open_connection(peer[0], peer[1], ssl=ctx, server_hostname=cfg.host)
        except (OSError, TimeoutError, ValueError):
            return False
        writer.transport.abort()
        return True

    async def open(self) -> None:
        """The TCP connection (and, for security tls, the TLS handshake)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        proto = SMTPProtocol(loop, self._log, server=cfg.server)
        self._proto = proto
        ctx: ssl.SSLContext | None = None

        def connect(host: str) -> Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]:
            # Whatever address it goes to, the certificate is checked against the name.
            return loop.create_connection(
                lambda: proto, host, cfg.port, ssl=ctx, server_hostname=cfg.host if ctx else None
            )

        try:
            async with asyncio.timeout(cfg.connect_timeout):
                if cfg.security == "tls":
                    ctx = await tls_context(cfg)
                if cfg.resolve is None:
                    await connect(cfg.host)
                else:
                    addresses = await cfg.resolve(cfg.host, cfg.port)
                    for n, address in enumerate(addresses, 1):  # the first that takes the connection
                        try:
                            await connect(address)
                            break
                        except ssl.SSLError:
                            raise
                        except OSError:
                            if n == len(addresses):
                                raise
        except TimeoutError:
            raise SMTPTimeoutError(f"connecting to {cfg.server} took longer than {cfg.connect_timeout:g} s") from None
        except socket.gaierror as e:
            raise SMTPConnectError(f"cannot resolve {cfg.host!r}: {e.strerror}") from None
        except ssl.SSLCertVerificationError as e:
            raise _certificate_error(cfg, e) from None
        except ssl.SSLError as e:
            raise SMTPTLSError(f"TLS with {cfg.server} failed: {_tls_reason(e)}") from None
        except OSError as e:
            raise SMTPConnectError(f"cannot connect to {cfg.server}: {e.strerror or e}") from None
        if ctx is not None:
            self._note_tls()
        if self._log:
            self._log(f"-- connected to {cfg.server}" + (f" ({self.tls_version})" if ctx else ""))

    async def ehlo(self) -> None:
        """EHLO (HELO for a server from before ESMTP); the extensions go to `extensions`."""
        name = self.helo_name
        reply = await self.command(f"EHLO {name}")
        self._learn({})
        if reply.code == 250:
            self.esmtp = True
            extensions: dict[str, str] = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                keyword = keyword.upper()
                if keyword.startswith("AUTH="):  # pre-RFC 4954 servers: "AUTH=LOGIN PLAIN"
                    keyword, params = "AUTH", keyword[5:] + " " + params
                if keyword == "AUTH" and "AUTH" in extensions:
                    params = extensions["AUTH"] + " " + params
                extensions[keyword] = params.strip()
            self._learn(extensions)
            return
        if reply.code in (500, 502, 504):  # a server from before ESMTP: HELO, no extensions
            reply = await self.command(f"HELO {name}")
            if reply.code == 250:
                self.esmtp = False
                return
        raise SMTPResponseError.from_reply("the server refused EHLO", reply)

    async def starttls(self) -> None:
        """STARTTLS when offered (an error when not offered and security is starttls-required),
        then EHLO again."""
        cfg = self.config
        required = cfg.security == "starttls-required"
        if "STARTTLS" not in self.extensions:
            if required:
                raise SMTPSecurityError(f"{cfg.server} does not offer STARTTLS, and security is starttls-required")
            return
        ctx = await tls_context(cfg)  # before STARTTLS: nothing waits between its reply and the handshake
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            if required:
                raise SMTPSecurityError.from_reply("the server refused STARTTLS", reply)
            return
        proto = self._proto_()
        if proto.has_buffered_input:
            # Anything that arrived before the handshake could have been injected by an attacker
            # on the path (CVE-2011-0411 style): never read it as part of the encrypted session.
            raise SMTPProtocolError("the server sent data after its STARTTLS reply, before TLS started")
        loop = asyncio.get_running_loop()
        assert proto.transport is not None
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                transport = await loop.start_tls(proto.transport, proto, ctx, server_hostname=cfg.host)
        except TimeoutError:
            raise SMTPTimeoutError(
                f"the TLS handshake with {cfg.server} took longer than {cfg.connect_timeout:g} s"
            ) from None
        except ssl.SSLCertVerificationError as e:
            raise _certificate_error(cfg, e) from None
        except (ssl.SSLError, ConnectionError) as e:
            raise SMTPTLSError(f"TLS with {cfg.server} failed: {_tls_reason(e)}") from None
        if transport is None:
            raise SMTPDisconnectedError("the server closed the connection during the TLS handshake")
        proto.transport = transport
        self._note_tls()
        await self.ehlo()  # RFC 3207: forget what was learnt before TLS

    def _note_tls(self) -> None:
        transport = self._proto_().transport
        assert transport is not None
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_version = sslobj.version() if sslobj is not None else "TLS"
        self.peer_certificate = sslobj.getpeercert() if sslobj is not None else None
        # The certificate itself, also when it was not verified (then the dict above is empty).
        self.peer_certificate_der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None

    async def authenticate(self, creds: Credentials) -> None:
        """AUTH with the best mechanism both sides have (`auth_mechanism` says which, `auth_tries`
        lists every try). With a password and mechanism auto, a mechanism the server refuses for
        itself (504, or 535 not blaming something else: `auth.falls_back`) is followed by the next
        one; the pool's `learnt_mechanism` keeps the one that worked for its other connections."""
        cfg = self.config
        if not self.tls_active and cfg.security != "none":
            secret = "access token" if isinstance(creds, _auth.OAuth2Auth) else "password"
            raise SMTPSecurityError(
                f"{cfg.server} did not offer STARTTLS, so the {secret} would cross the network "
                "unencrypted; mailgate sends it in clear only when security is none"
            )
        mechanisms = _auth.candidates(creds, self.auth_mechanisms)
        access_token = ""
        if isinstance(creds, _auth.OAuth2Auth):
            token = await creds.token()
            if isinstance(token, str):
                access_token = token
            else:
                access_token, self.token_renew_at = token.value, token.renew_at
            self.access_token = token
        # From now on no reply text leaves the client with a credential in it, whatever the server echoes.
        self._proto_().redact(_auth.secret_forms(creds, access_token))
        memory = self.learnt_mechanism
        if len(mechanisms) == 1 or memory.learnt in mechanisms:
            await self._auth(memory.learnt if memory.learnt in mechanisms else mechanisms[0], creds, access_token)
            return
        rounds = memory.rounds
        async with memory.lock:  # one connection of the pool tries the mechanisms; the others wait for it
            if memory.learnt in mechanisms:
                await self._auth(memory.learnt, creds, access_token)
                return
            if memory.rounds != rounds and memory.failed is not None:
                raise memory.failed  # refused while we waited: trying again would only count more failures
            for mechanism in mechanisms:
                try:
                    await self._auth(mechanism, creds, access_token)
                except SMTPAuthError as e:
                    last = mechanism == mechanisms[-1]
                    if not last and _auth.falls_back(e) and self.is_connected:
                        continue
                    # A 535 to the last after others were refused: the credentials, not the mechanisms.
                    every = last and e.code == 535 and _auth.falls_back(e) and len(self.auth_tries) > 1
                    failure = _auth.every_mechanism_refused(self.auth_tries, e) if every else e
                    if not failure.transient:
                        memory.rounds, memory.failed = memory.rounds + 1, failure
                    raise failure from None
                memory.learnt = mechanism
                return

    async def _auth(self, mechanism: str, creds: Credentials, access_token: str) -> None:
        try:
            reply = await _auth.authenticate(self._exchange, mechanism, creds, access_token)
        except SMTPAuthError as e:
            said = (e.reply or "") if e.code is not None else e.message
            self.auth_tries.append(_auth.AuthTry(mechanism, e.code, e.enhanced, said))
            raise
        self.auth_tries.append(_auth.AuthTry(mechanism, reply.code, reply.enhanced, reply.text))
        self.auth_mechanism = mechanism

    async def _exchange(self, line: bytes, log_as: str) -> Reply:
        proto = self._proto_()
        if self._log:
            self._log("C: " + log_as)
        proto.write(line + b"\r\n")
        return (await proto.read(1, self.config.protocol_timeout))[0]

    async def command(self, line: str) -> Reply:
        """Send one command line and return its reply (whatever the code)."""
        return await self._exchange(line.encode("utf-8"), line)

    async def noop(self) -> Reply:
        reply = await self.command("NOOP")
        if reply.code != 250:
            raise SMTPResponseError.from_reply("NOOP failed", reply)
        return reply

    async def rset(self) -> Reply:
        reply = await self.command("RSET")
        if reply.code != 250:
            raise SMTPResponseError.from_reply("RSET failed", reply)
        return reply

    async def quit(self) -> None:
        """QUIT politely if the connection still works, then close it gracefully (a TLS session
        ends with close_notify), each step within QUIT_TIMEOUT; dropped in any case."""
        proto = self._proto
        try:
            if proto is not None and self.is_connected:
                wait = min(self.config.protocol_timeout, QUIT_TIMEOUT)
                with contextlib.suppress(SMTPError, TimeoutError):
                    await asyncio.wait_for(self.command("QUIT"), wait)
                await proto.close(wait)
        finally:
            self.close()  # also when cancelled while waiting: never a socket left open

    def close(self) -> None:
        """Drop the connection at once (no QUIT, no TLS close_notify): for a broken session."""
        if self._proto is not None:
            self._proto.abort()

    def _proto_(self) -> SMTPProtocol:
        if self._proto is None:
            raise SMTPDisconnectedError("not connected")
        return self._proto

    # ---- transactions --------------------------------------------------------------------------

    async def mail(self, mail_from: str, recipients: list[str], data: bytes) -> Reply:
        """MAIL FROM alone, with the parameters `data` needs (SIZE, BODY, SMTPUTF8), for a test
        that reports each command; `send` is the way to send."""
        params, _ = self._mail_parameters(mail_from, recipients, _normalize(data))
        return await self.command(f"MAIL FROM:<{mail_from}>{params}")

    async def data(self, data: bytes) -> Reply:
        """DATA, then the message (dot-stuffed) and its final dot: the server's final reply (or its
        refusal of DATA itself)."""
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        proto = self._proto_()
        if self._log:
            self._log(f"C: [message, {len(data):,} bytes]")
        proto.write(_stuff(_normalize(data)) + b".\r\n")
        return (await proto.read(1, self.config.protocol_timeout))[0]

    async def send(self, envelope: Envelope, data: bytes) -> Delivery:
        """Hand `data` (RFC 5322 bytes) to the server for every recipient of `envelope`.

        Raises SMTPNotSupportedError, before sending anything, when the message needs SMTPUTF8 or
        8BITMIME and the server lacks it, or exceeds its SIZE. Everything else the server says
        ends up, per recipient, in the returned Delivery. A transaction carries at most
        `recipient_limit.per_transaction` recipients; those refused with "too many recipients"
        go in a further transaction on the same connection, and the limit is learnt.
        """
        proto = self._proto_()
        if proto.error is not None:
            raise proto.error
        recipients = list(dict.fromkeys(envelope.rcpt_to))
        data = _normalize(data)
        params, encoding = self._mail_parameters(envelope.mail_from, recipients, data)
        payload = _stuff(data)
        results: dict[str, RecipientResult] = {}
        self._refusal = None
        pending = recipients
        body_sent: list[str] = []
        try:
            while pending:
                body_sent = []
                batch = pending[: self.recipient_limit.per_transaction]
                retry = await self._transaction(
                    envelope.mail_from, params, batch, payload, encoding, results, body_sent
                )
                if retry and len(retry) == len(batch):  # no progress: leave the rest for later
                    reply = next(iter(retry.values()))
                    for rcpt in pending:
                        results[rcpt] = _result(rcpt, retry.get(rcpt, reply))
                    break
                pending = [*retry, *pending[len(batch) :]]
        except SMTPError as e:
            self.close()  # the session's state is unknown: never reuse it
            for rcpt in recipients:
                if rcpt not in results:
                    results[rcpt] = _cut_off(rcpt, e, uncertain=rcpt in body_sent)
        except BaseException:
            # Cancelled (a worker stopping) or worse, half-way through a transaction: replies
            # still due would be read as answers to the next one. Drop the connection.
            self.close()
            raise
        delivery = Delivery(self.config.server, [results[r] for r in recipients])
        if self._refusal is not None and not delivery.accepted:
            raise self._refused_helo(self._refusal)
        return delivery

    def _refused_helo(self, reply: Reply) -> SMTPError:
        """The server refuses mailgate itself (its HELO name), not the message or a recipient: an
        error of the server's settings, which marks it broken when permanent."""
        return SMTPResponseError.from_reply(
            f"{self.config.server} refused the name mailgate greeted it with ({self.helo_name})", reply
        )

    async def send_many(self, items: list[tuple[Envelope, bytes]]) -> list[Delivery | SMTPError | MessageError]:
        """Send several messages in a row, each message's body and final dot in the same write as
        the next one's MAIL, RCPT and DATA (RFC 2920 allows a message's content as the first
        "command" of a group): one round trip per message instead of two.

        Returns, per item, its Delivery, or the error that refused that message alone before
        anything was sent (SMTPNotSupportedError, MessageError); it never raises an SMTPError.
        Without PIPELINING, or for one message, this is `send` in a loop. Recipients refused as
        "too many recipients" go in a further transaction after the others, as with `send`. A
        session error (the connection dropped, a timeout) ends the batch: a message the server
        answered keeps its answer (also one that arrived just before the end), the one whose
        content went out unanswered is uncertain (it may have been delivered), the others are
        transient, and the connection is closed.
        """
        out: list[Delivery | SMTPError | MessageError | None] = [None] * len(items)
        proto = self._proto_()
        if not self._pipelining or len(items) < 2:
            for i, (envelope, data) in enumerate(items):
                if proto.error is not None:  # an earlier message broke the session: this one waits
                    out[i] = self._cut_off(envelope, proto.error)
                    continue
                try:
                    out[i] = await self.send(envelope, data)
                except (SMTPError, MessageError) as e:  # refused before anything went: this message only
                    out[i] = e
            return [o for o in out if o is not None]
        if proto.error is not None:
            return [self._cut_off(envelope, proto.error) for envelope, _ in items]
        timeout = self.config.protocol_timeout
        log = self._log
        results: list[dict[str, RecipientResult]] = [{} for _ in items]
        retries: dict[int, list[str]] = {}  # recipients for a further transaction: "too many", or past the limit
        body_out: set[int] = set()  # messages whose content was written and whose reply is due
        refusals: dict[int, Reply] = {}  # messages whose transaction refused our HELO name
        buffer: list[bytes] = []  # written with the next group
        owed: list[tuple[int, list[str]] | str] = []  # replies due before the next group's: a final, "RSET" or "."
        try:
            for i, (envelope, data) in enumerate(items):
                recipients = list(dict.fromkeys(envelope.rcpt_to))
                data = _normalize(data)
                try:
                    params, encoding = self._mail_parameters(envelope.mail_from, recipients, data)
                except (SMTPNotSupportedError, MessageError) as e:
                    out[i] = e
                    continue
                first = recipients[: self.recipient_limit.per_transaction]
                mail = f"MAIL FROM:<{envelope.mail_from}>{params}\r\n".encode(encoding)
                rcpts = [f"RCPT TO:<{r}>\r\n".encode(encoding) for r in first]
                if log:
                    for line in (mail, *rcpts, b"DATA\r\n"):
                        log("C: " + line[:-2].decode(encoding))
                proto.write(b"".join((*buffer, mail, *rcpts, b"DATA\r\n")))
                buffer = []
                try:
                    replies = await proto.read(len(owed) + len(rcpts) + 2, timeout)
                except SMTPError:
                    # What did arrive still counts: finals of earlier messages, and how many
                    # recipients the server took before it gave up on the session.
                    replies = proto.salvage()
                    self._settle_owed(owed, replies[: len(owed)], results, body_out, partial=True)
                    self._learn_limit(first, replies[len(owed) :])
                    raise
                self._settle_owed(owed, replies[: len(owed)], results, body_out)
                replies = replies[len(owed) :]
                owed = []
                mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
                self._refusal = None
                accepted, retry = self._sort_replies(first, mail_reply, rcpt_replies, data_reply, results[i])
                if self._refusal is not None:
                    refusals[i] = self._refusal
                if retry or len(first) < len(recipients):
                    retries[i] = [*retry, *recipients[len(first) :]]
                if mail_reply.code != 250 or data_reply.code != 354 or not accepted:
                    if data_reply.code == 354:  # 354 with no recipient (RFC 2920 3.1 says it shouldn't)
                        buffer.append(b".\r\n")
                        owed.append(".")
                    if log:
                        log("C: RSET")
                    buffer.append(b"RSET\r\n")
                    owed.append("RSET")
                    continue
                if log:
                    log(f"C: [message content, {len(data):,} bytes]")
                    log("C: .")
                buffer.append(_stuff(data) + b".\r\n")
                body_out.add(i)
                owed.append((i, accepted))
            if buffer:
                proto.write(b"".join(buffer))
                self._settle_owed(owed, await proto.read(len(owed), timeout), results, body_out)
        except SMTPError as e:
            self.close()  # the session's state is unknown: never reuse it
            for i, (envelope, _) in enumerate(items):
                if out[i] is None:
                    for rcpt in dict.fromkeys(envelope.rcpt_to):
                        if rcpt not in results[i]:
                            results[i][rcpt] = _cut_off(rcpt, e, uncertain=i in body_out)
            retries = {}
        except BaseException:
            self.close()
            raise
        for i, rest in retries.items():  # "too many recipients": the rest in further transactions
            envelope, data = items[i]
            rest_of = Envelope(envelope.mail_from, tuple(rest))
            try:
                more = self._cut_off(rest_of, proto.error) if proto.error else await self.send(rest_of, data)
            except (SMTPError, MessageError) as e:  # not for a message that went once already
                more = self._cut_off(rest_of, e)
            for r in more.results:
                results[i][r.recipient] = r
        for i, (envelope, _) in enumerate(items):
            if out[i] is None:
                out[i] = Delivery(self.config.server, [results[i][r] for r in dict.fromkeys(envelope.rcpt_to)])
                if i in refusals and not any(r.accepted for r in results[i].values()):
                    out[i] = self._refused_helo(refusals[i])
        return [o for o in out if o is not None]

    def _cut_off(self, envelope: Envelope, error: SMTPError | MessageError) -> Delivery:
        """A message not tried because the session ended before its turn."""
        return Delivery(self.config.server, [_cut_off(r, error) for r in dict.fromkeys(envelope.rcpt_to)])

    @staticmethod
    def _settle_owed(
        owed: list[tuple[int, list[str]] | str],
        replies: list[Reply],
        results: list[dict[str, RecipientResult]],
        body_out: set[int],
        *,
        partial: bool = False,  # what arrived before the connection broke: maybe fewer replies
    ) -> None:
        for due, reply in zip(owed, replies, strict=not partial):
            if due == "RSET":
                if reply.code != 250 and not partial:
                    raise SMTPResponseError.from_reply("RSET failed", reply)
                continue
            if isinstance(due, str):  # the dot of an empty body: its answer means nothing
                continue
            i, accepted = due
            for rcpt in accepted:
                results[i][rcpt] = _result(rcpt, reply)
            body_out.discard(i)

    def _learn_limit(self, recipients: list[str], replies: list[Reply]) -> None:
        """Learn the recipient limit from a transaction's replies (MAIL's first), maybe cut short."""
        if replies and replies[0].code == 250:
            self.recipient_limit.learn(recipients, replies[1:])

    def _sort_replies(
        self,
        recipients: list[str],
        mail_reply: Reply,
        rcpt_replies: list[Reply],
        data_reply: Reply | None,  # None: DATA not sent (no recipient accepted, no pipelining)
        results: dict[str, RecipientResult],
    ) -> tuple[list[str], dict[str, Reply]]:
        """Recipients accepted for the content, and those to retry ("too many recipients");
        every other recipient gets its final result."""
        refusal = next((r for r in (mail_reply, *rcpt_replies) if r.refuses_helo), None)
        self._refusal = self._refusal or refusal
        if mail_reply.code != 250:
            for rcpt in recipients:
                results[rcpt] = _result(rcpt, mail_reply)
            return [], {}
        self.recipient_limit.learn(recipients, rcpt_replies)
        accepted: list[str] = []
        retry: dict[str, Reply] = {}
        for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
            if reply.code in (250, 251):
                accepted.append(rcpt)
            elif reply.too_many_recipients:
                retry[rcpt] = reply
            else:
                results[rcpt] = _result(rcpt, reply)
        if data_reply is None or data_reply.code != 354:
            for rcpt in accepted:
                assert data_reply is not None
                results[rcpt] = _result(rcpt, data_reply)
            return [], retry
        return accepted, retry

    def _mail_parameters(self, mail_from: str, recipients: list[str], data: bytes) -> tuple[str, str]:
        """MAIL FROM's parameters for `data` (the message as `_normalize` made it) and the encoding
        of its commands; SMTPNotSupportedError or MessageError when it can't go to this server."""
        for addr in (mail_from, *recipients):
            if _UNSAFE_IN_PATH.search(addr):
                raise MessageError([("envelope", f"{addr!r} cannot be used in an SMTP command")])
        if not recipients:
            raise MessageError([("envelope", "no recipients")])
        needs_utf8 = not (mail_from.isascii() and all(r.isascii() for r in recipients))
        eight_bit = not data.isascii()
        if eight_bit and not needs_utf8:
            end = data.find(b"\r\n\r\n")
            needs_utf8 = not (data if end < 0 else data[:end]).isascii()
        params = []
        server = self.config.server
        if self._max_size is not None and len(data) > self._max_size:
            raise SMTPNotSupportedError(
                f"the message is {len(data):,} bytes and {server} accepts at most {self._max_size:,} (SIZE)"
            )
        if self._size:
            params.append(f"SIZE={len(data)}")
        if eight_bit:
            if self._8bitmime:
                params.append("BODY=8BITMIME")
            elif not needs_utf8:
                raise SMTPNotSupportedError(f"the message has 8-bit content and {server} does not offer 8BITMIME")
        if needs_utf8:
            if not self._smtputf8:
                raise SMTPNotSupportedError(
                    f"the message has an internationalized address or UTF-8 headers, and {server} "
                    "does not offer SMTPUTF8"
                )
            params.append("SMTPUTF8")
        return "".join(" " + p for p in params), ("utf-8" if needs_utf8 else "ascii")

    async def _transaction(
        self,
        mail_from: str,
        params: str,
        recipients: list[str],
        payload: bytes,
        encoding: str,
        results: dict[str, RecipientResult],
        body_sent: list[str],
    ) -> dict[str, Reply]:
        """One MAIL … DATA transaction. Fills `results` with final outcomes and returns the
        recipients refused as "too many recipients", with their replies, for a next one."""
        proto = self._proto_()
        timeout = self.config.protocol_timeout
        log = self._log
        mail = f"MAIL FROM:<{mail_from}>{params}\r\n".encode(encoding)
        rcpts = [f"RCPT TO:<{r}>\r\n".encode(encoding) for r in recipients]
        data_reply: Reply | None
        if self._pipelining:
            if log:
                for line in (mail, *rcpts, b"DATA\r\n"):
                    log("C: " + line[:-2].decode(encoding))
            proto.write(b"".join((mail, *rcpts, b"DATA\r\n")))
            try:
                replies = await proto.read(len(rcpts) + 2, timeout)
            except SMTPError:  # e.g. Postfix past its overshoot limit: what it took before still teaches
                self._learn_limit(recipients, proto.salvage())
                raise
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self._exchange(mail[:-2], mail[:-2].decode(encoding))
            rcpt_replies, data_reply = [], None
            if mail_reply.code == 250:
                for line in rcpts:
                    rcpt_replies.append(await self._exchange(line[:-2], line[:-2].decode(encoding)))
                    if rcpt_replies[-1].too_many_recipients:  # the rest would be refused too (and counted)
                        rcpt_replies += [rcpt_replies[-1]] * (len(rcpts) - len(rcpt_replies))
                        break
                if any(r.code in (250, 251) for r in rcpt_replies):
                    data_reply = await self.command("DATA")

        accepted, retry = self._sort_replies(recipients, mail_reply, rcpt_replies, data_reply, results)
        if mail_reply.code != 250:
            await self._reset()
            return {}
        if data_reply is None or data_reply.code != 354:
            await self._reset()
            return retry
        if not accepted:
            # A server that says 354 with no valid recipient (RFC 2920 3.1 says it shouldn't):
            # send an empty body so the session stays in step, then reset.
            if log:
                log("C: .")
            proto.write(b".\r\n")
            await proto.read(1, timeout)
            await self._reset()
            return retry

        if log:
            log(f"C: [message content, {len(payload):,} bytes]")
            log("C: .")
        body_sent.extend(accepted)
        if len(payload) < _SMALL_BODY:
            proto.write(payload + b".\r\n")
        else:
            proto.write(payload)
            proto.write(b".\r\n")
            await proto.drain(timeout)
        final = (await proto.read(1, timeout))[0]
        for rcpt in accepted:
            results[rcpt] = _result(rcpt, final)
        body_sent.clear()
        return retry

    async def _reset(self) -> None:
        """RSET after a failed transaction, so the connection can carry the next one."""
        reply = await self.command("RSET")
        if reply.code != 250:
            raise SMTPResponseError.from_reply("RSET failed", reply)


def _result(rcpt: str, reply: Reply) -> RecipientResult:
    # A refused HELO name is not the recipient's fault: never refuse the recipient for good over it.
    outcome = Outcome.TRANSIENT if reply.refuses_helo else reply.outcome
    return RecipientResult(rcpt, outcome, reply.code, reply.enhanced, reply.message)


def _cut_off(rcpt: str, e: SMTPError | MessageError, *, uncertain: bool = False) -> RecipientResult:
    """A recipient whose answer the session's end took away: transient; `uncertain` when the
    message itself went out and only its final reply is missing (it may have been accepted)."""
    text = e.message if isinstance(e, SMTPError) else str(e)
    if uncertain:
        text += "; the message was sent and may have been accepted"
    code, enhanced = (e.code, e.enhanced) if isinstance(e, SMTPError) else (None, None)
    return RecipientResult(rcpt, Outcome.TRANSIENT, code, enhanced, text, uncertain=uncertain)


def _normalize(data: bytes) -> bytes:
    """The message as it goes out: CRLF line ends (Exchange refuses bare LF: 550 5.6.11) and a
    final CRLF, so that ".\\r\\n" can follow. Its length is what SIZE= declares (RFC 1870 3: "the
    number of octets, including CR-LF pairs, but not the SMTP DATA command's terminating dot or
    doubled quoting dots, to be transmitted by the SMTP client after receiving reply code 354")."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _BARE_LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _stuff(data: bytes) -> bytes:
    """Leading dots doubled (RFC 5321 4.5.2) in a normalized message."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def _tls_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or str(e)
    if not reason or isinstance(e, ConnectionError):  # the peer hung up mid-handshake, saying nothing
        return f"the server closed the connection during the handshake ({type(e).__name__})"
    return str(reason)


def _certificate_error(cfg: SMTPConfig, e: ssl.SSLCertVerificationError) -> SMTPTLSError:
    private = cfg.ca_file or cfg.ca_certificate
    hint = "" if private else "; if the server uses a private CA, give its certificate as ca_certificate"
    return SMTPTLSError(f"the certificate of {cfg.server} is not trusted: {e.verify_message}{hint}")
