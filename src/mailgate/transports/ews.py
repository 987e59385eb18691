"""The Exchange Web Services transport: CreateItem on an on-premises Exchange Server (2013-2019).

SOAP over mailgate's own httpx2 client, not exchangelib: exchangelib talks through `requests` in
threads, so its connections would bypass the destination policy (the guarded client that never
connects to the operator's network) and a send could not be bounded or cancelled. Each send is one
CreateItem of a Message whose MimeContent is the composed MIME (the same composer as SMTP and
Graph), with MessageDisposition SendAndSaveCopy (a copy in the mailbox's Sent Items) or SendOnly.

Recipients: Exchange reads To/Cc from the MIME headers; mailgate also names every recipient of the
envelope in ToRecipients / CcRecipients / BccRecipients (what is not in the To or Cc header goes
as Bcc), so Bcc recipients — never in the composed headers — and a retry to some of the
recipients reach exactly the envelope's recipients.

Credentials come from the document's `auth`: a password (NTLM, computed client-side by pyspnego
on one kept-alive connection per handshake, with channel binding over TLS for Extended
Protection; or Basic), or an OAuth2 token source (app-only: the ExchangeImpersonation header
names the mailbox). Answers are mapped by the diagnostics catalogue: ErrorServerBusy waits its
BackOffMilliseconds; settings and permission refusals (401, ErrorAccessDenied,
ErrorNonExistentMailbox, ErrorImpersonateUserDenied) mark the server broken; refusals of the
message (ErrorInvalidRecipients, ErrorMessageSizeExceeded) fail it; 5xx and timeouts are transient.
With `autodiscover` and no `url`, the URL comes from POX Autodiscover of the mailbox's domain (two
well-known URLs, no redirect followed). Exchange Online retires EWS (reference §9.2): use kind
graph there.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET
from xml.parsers import expat
from xml.sax.saxutils import escape

from .._http import MAX_REPLY, TooLarge, read_capped
from .._http import retry_after as http_retry_after
from ..delivery import Delivery
from ..destinations import DestinationRefused
from ..diagnostics.catalogue import Explanation, explain_ews_error
from ..errors import foreign_text
from ..message import Address, Envelope, Message
from ..settings.document import MailServer, OAuth2AuthSettings, PasswordAuthSettings
from ..smtp.protocol import ProtocolLog
from .graph import Refused, ServiceError, delivery_of

if TYPE_CHECKING:
    import httpx2

    from .graph import Tokens

NS_SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
NS_TYPES = "http://schemas.microsoft.com/exchange/services/2006/types"
NS_MESSAGES = "http://schemas.microsoft.com/exchange/services/2006/messages"
NS_ERRORS = "http://schemas.microsoft.com/exchange/services/2006/errors"
NS_AUTODISCOVER_REQUEST = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
NS_AUTODISCOVER = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
NS_AUTODISCOVER_OUTLOOK = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
# "auto": every Exchange from 2013 on takes requests of the 2013 schema, and CreateItem with
# MimeContent needs nothing newer. The server's own version is learnt from ServerVersionInfo.
DEFAULT_VERSION = "Exchange2013"
EWS_CONCURRENCY = 10  # requests in flight per mailbox; Exchange's EWSMaxConcurrency default is 27
MAX_MESSAGE = 64 * 1024 * 1024  # raw bytes; base64 makes ~86 MB, within Exchange's default 150 MB request limit
MAX_BACKOFF = 3600  # seconds: a BackOffMilliseconds beyond is capped (the outbox's own backoff caps too)
# A reply is parsed only within these (a SOAP answer of EWS nests ~10 deep and has a few dozen
# elements); any DTD or entity declaration is refused, in whatever encoding the reply comes.
MAX_XML_DEPTH = 40
MAX_XML_ELEMENTS = 10_000
MAX_URL = 2000  # characters of an EWS URL that Autodiscover names (ews.url's own limit)
# Each request has an overall deadline: connect_timeout + protocol_timeout + the body's upload
# at this rate. httpx's timeouts are per read: a server trickling a byte at a time would hold the
# sender (and its mailbox's slot) for ever.
UPLOAD_RATE = 128 * 1024  # bytes per second
_CODE = re.compile(r"[A-Za-z0-9_]{1,100}")  # ErrorServerBusy, NoError, …


class EWSError(ServiceError):
    """Exchange refused, or could not be reached; `ews_code` is the EWS ResponseCode (ErrorAccessDenied, …)."""

    def __init__(self, message: str, *, ews_code: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.ews_code = ews_code


@dataclass
class _Answer:
    status: int
    body: bytes
    retry_after: str | None
    challenge: str | None  # the NTLM token of a 401's WWW-Authenticate, if any
    tls: Any = None  # the connection's ssl object (channel binding), if any


class _Unauthorized(Exception):
    """HTTP 401 before the request was processed: the credentials did not work."""

    def __init__(self, answer: _Answer) -> None:
        self.answer = answer


class EWSTransport:
    """Sends through one mailbox of one Exchange server. Concurrent sends are fine: at most
    EWS_CONCURRENCY requests are in flight; NTLM keeps one authenticated connection per request
    in flight (NTLM authenticates a connection, not a request)."""

    def __init__(
        self,
        server: MailServer,
        http: httpx2.AsyncClient,
        *,
        tokens: Tokens | None = None,
        new_http: Callable[[], httpx2.AsyncClient] | None = None,
        protocol_log: ProtocolLog | None = None,
        autodiscover_urls: Callable[[str], list[str]] | None = None,
    ) -> None:
        assert server.ews is not None
        self.settings = server.ews
        self.connection = server.connection
        self.http = http
        self.tokens = tokens
        self.mailbox = Address(server.ews.mailbox)
        self.version = DEFAULT_VERSION if server.ews.exchange_version == "auto" else server.ews.exchange_version
        self.server_version: str | None = None  # what the server said it runs (ServerVersionInfo)
        auth = server.auth
        self._password: str | None = None
        self._username = ""
        self._impersonate = False
        self.scheme: str
        if isinstance(auth, PasswordAuthSettings):
            self._username = auth.username
            self._password = auth.password.get_secret_value() if auth.password else None
            self.scheme = server.ews.password_scheme
        elif isinstance(auth, OAuth2AuthSettings):
            self.scheme = "bearer"
            self._impersonate = auth.token.grant == "client_credentials"  # app-only: act as the mailbox
        else:
            raise ValueError("an ews server needs auth password or oauth2")
        # What Exchange may echo in an error text that must not reach the attempt log: the
        # password, the Basic credentials, the user name (_redacted: also its user part), the
        # access tokens of the latest requests (_bearers: a renewed one while the old is in flight).
        self._basic = base64.b64encode(f"{self._username}:{self._password or ''}".encode()).decode("ascii")
        self._secrets: tuple[str | None, ...] = (self._password, self._basic) if self._username else (self._password,)
        self._bearers: collections.deque[str] = collections.deque(maxlen=4)
        self._new_http = new_http
        self._lanes: list[httpx2.AsyncClient] = []  # NTLM: idle clients, each one authenticated connection
        self._all_lanes: set[httpx2.AsyncClient] = set()
        self._authenticated: set[httpx2.AsyncClient] = set()
        self._slots = asyncio.Semaphore(EWS_CONCURRENCY)
        self._log = protocol_log
        self._autodiscover_urls = autodiscover_urls or default_autodiscover_urls
        self._discovered: str | None = None
        self._discovering = asyncio.Lock()

    @property
    def server(self) -> str:
        return f"ews:{self.mailbox.address}"

    @property
    def url(self) -> str | None:
        """The EWS URL: ews.url, or what Autodiscover found (None before it ran)."""
        return self.settings.url or self._discovered

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery:
        return await delivery_of(self.server, envelope, self._send(envelope, message), 200)

    async def create_item(self, envelope: Envelope, message: bytes | Message) -> str:
        """Send as `send` does, but raise EWSError for a refusal of the message too (the test
        e-mail shows every refusal as a failed step with its cause and fix)."""
        try:
            return await self._send(envelope, message)
        except Refused as r:
            raise EWSError(r.text, code=r.status, explanation=r.explanation, transient=False) from None

    async def aclose(self) -> None:
        lanes, self._lanes = list(self._all_lanes), []
        self._all_lanes.clear()
        for client in lanes:
            with contextlib.suppress(Exception):
                await client.aclose()

    # ---- the request ---------------------------------------------------------------------------

    async def _send(self, envelope: Envelope, message: bytes | Message) -> str:
        if isinstance(message, bytes):
            data = message
            to, cc = _header_recipients(message)
            sender: Address | None = None
        else:
            sender = message.sender()
            if sender.address.lower() != self.mailbox.address.lower() and not self.settings.allow_delegate:
                raise Refused(None, f"the message is from {sender.address}, not the sending mailbox "
                                     f"{self.mailbox.address}; set ews.allow_delegate (and grant the mailbox's account "
                                     "Send As or Send on Behalf) to send from another address")  # fmt: skip
            data = message.compose(utf8=False)
            to = {_rcpt(a).lower() for a in message.to}
            cc = {_rcpt(a).lower() for a in message.cc}
        if len(data) > MAX_MESSAGE:
            raise Refused(None, f"the message is {len(data) / 1e6:.1f} MB, more than mailgate sends through EWS "
                                 f"({MAX_MESSAGE / 1e6:.0f} MB)")  # fmt: skip
        recipients: dict[str, list[str]] = {"ToRecipients": [], "CcRecipients": [], "BccRecipients": []}
        for rcpt in envelope.rcpt_to:
            key = "ToRecipients" if rcpt.lower() in to else "CcRecipients" if rcpt.lower() in cc else "BccRecipients"
            recipients[key].append(rcpt)
        delegated = sender is not None and sender.address.lower() != self.mailbox.address.lower()
        body = self._create_item(data, recipients, sender if delegated else None)
        await self._call(body, final=True)
        how = "SendAndSaveCopy" if self.settings.save_to_sent_items else "SendOnly"
        return f"accepted by Exchange (EWS CreateItem, {how}): NoError"

    async def check_mailbox(self) -> str:
        """GetFolder of the mailbox's Sent Items: checks the URL, the credentials and the rights
        on the mailbox without sending anything (the test e-mail's dry step). Returns the folder id's
        first characters."""
        body = self._soap(f"<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>"
                          f"<m:FolderIds>{self._sent_items}</m:FolderIds></m:GetFolder>")  # fmt: skip
        try:
            message = await self._call(body, final=False)
        except Refused as r:
            raise EWSError(r.text, code=r.status, explanation=r.explanation, transient=False) from None
        folder = message.find(f"{{{NS_MESSAGES}}}Folders/*/{{{NS_TYPES}}}FolderId")
        return foreign_text(folder.get("Id") or "", 24) if folder is not None else ""

    @property
    def _sent_items(self) -> str:
        return (f'<t:DistinguishedFolderId Id="sentitems"><t:Mailbox><t:EmailAddress>{_x(self.mailbox)}'
                "</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId>")  # fmt: skip

    def _soap(self, body: str) -> bytes:
        header = f'<t:RequestServerVersion Version="{self.version}"/>'
        if self._impersonate:
            header += (f"<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{_x(self.mailbox)}"
                       "</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>")  # fmt: skip
        return (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<soap:Envelope xmlns:soap="{NS_SOAP}" xmlns:t="{NS_TYPES}" xmlns:m="{NS_MESSAGES}">'
            f"<soap:Header>{header}</soap:Header><soap:Body>{body}</soap:Body></soap:Envelope>"
        ).encode()

    def _create_item(self, mime: bytes, recipients: dict[str, list[str]], from_: Address | None) -> bytes:
        if self.settings.save_to_sent_items:
            disposition = "SendAndSaveCopy"
            saved = f"<m:SavedItemFolderId>{self._sent_items}</m:SavedItemFolderId>"
        else:
            disposition, saved = "SendOnly", ""
        # Schema order of t:Message: MimeContent (ItemType), then ToRecipients, CcRecipients,
        # BccRecipients, …, From (MessageType).
        parts = [f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(mime).decode("ascii")}</t:MimeContent>']
        for key, addresses in recipients.items():
            if addresses:
                mailboxes = "".join(f"<t:Mailbox><t:EmailAddress>{escape(a)}</t:EmailAddress></t:Mailbox>"
                                    for a in addresses)  # fmt: skip
                parts.append(f"<t:{key}>{mailboxes}</t:{key}>")
        if from_ is not None:
            name = f"<t:Name>{escape(from_.name)}</t:Name>" if from_.name else ""
            parts.append(f"<t:From><t:Mailbox>{name}<t:EmailAddress>{_x(from_)}</t:EmailAddress></t:Mailbox></t:From>")
        return self._soap(
            f'<m:CreateItem MessageDisposition="{disposition}">{saved}<m:Items>'
            f"<t:Message>{''.join(parts)}</t:Message></m:Items></m:CreateItem>"
        )

    async def _call(self, body: bytes, *, final: bool) -> ET.Element:
        """One EWS request with our credentials; the parsed response message."""
        async with self._slots:
            url = await self._endpoint()
            return self._result(await self._exchange(body, url, final=final))

    async def _exchange(self, body: bytes, url: str, *, final: bool, lane: bool = True) -> _Answer:
        """One request with our credentials: its answer (a 401 raises). A refused bearer token is
        renewed once; an NTLM connection whose authentication lapsed authenticates again. `lane`:
        NTLM on a kept lane (EWS), else on a connection of its own, closed after (Autodiscover)."""
        if self.scheme == "ntlm":
            return await self._ntlm_exchange(body, url, final, lane)
        for attempt in (1, 2):
            token = await self.tokens() if self.tokens is not None else None
            if token is not None:
                authorization = f"Bearer {token.value}"
                if token.value not in self._bearers:
                    self._bearers.append(token.value)
            else:
                authorization = "Basic " + self._basic
            try:
                return await self._post(self.http, url, body, authorization, final=final)
            except _Unauthorized as u:
                if token is not None and attempt == 1 and self.tokens is not None:
                    self.tokens.invalidate(token)  # expired or revoked: one new token
                    continue
                raise self._unauthorized(u.answer) from None
        raise AssertionError("unreachable")

    async def _ntlm_exchange(self, body: bytes, url: str, final: bool, lane: bool) -> _Answer:
        if lane:
            client = self._lanes.pop() if self._lanes else self._new_lane()
        else:
            assert self._new_http is not None, "NTLM needs a client per connection (new_http)"
            client = self._new_http()
        keep = False
        try:
            answer = None
            if client in self._authenticated:  # its connection may still be: no handshake then
                with contextlib.suppress(_Unauthorized):
                    answer = await self._post(client, url, body, None, final=final)
            if answer is None:
                self._authenticated.discard(client)
                answer, authenticated = await self._ntlm_handshake(client, url, body, final)
                if authenticated:
                    self._authenticated.add(client)
            keep = lane
            return answer
        finally:
            if keep:
                self._lanes.append(client)
            else:  # a lost or refused connection is not used again
                self._all_lanes.discard(client)
                self._authenticated.discard(client)
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _new_lane(self) -> httpx2.AsyncClient:
        assert self._new_http is not None, "NTLM needs a client per connection (new_http)"
        client = self._new_http()
        self._all_lanes.add(client)
        return client

    async def _ntlm_handshake(
        self, client: httpx2.AsyncClient, url: str, body: bytes, final: bool
    ) -> tuple[_Answer, bool]:
        """The three legs on one connection, the request riding on the third: its answer, and
        whether the connection is now authenticated."""
        import spnego

        _quiet_spnego()
        host = urlsplit(url).hostname or ""
        context = spnego.client(self._username, self._password, hostname=host, service="HTTP", protocol="ntlm",
                                options=spnego.NegotiateOptions.use_ntlm)  # fmt: skip
        negotiate = base64.b64encode(context.step() or b"").decode("ascii")
        if self._log:
            self._log("C: NTLM negotiate (type 1, without the request)")
        try:  # the first leg carries no body: Exchange answers 401 with its challenge either way
            other = await self._post(client, url, b"", f"NTLM {negotiate}", final=False, leg=True)
        except _Unauthorized as u:
            challenge_answer = u.answer
        else:  # not a challenge: what the URL answered instead (404, a fault, not EWS) says why
            return other, False
        if not challenge_answer.challenge:
            raise self._unauthorized(challenge_answer)
        bindings = _channel_bindings(challenge_answer.tls)
        if bindings is not None:
            context = spnego.client(self._username, self._password, hostname=host, service="HTTP", protocol="ntlm",
                                    options=spnego.NegotiateOptions.use_ntlm,
                                    channel_bindings=bindings)  # fmt: skip
            context.step()
        try:
            authenticate = context.step(base64.b64decode(challenge_answer.challenge, validate=True))
        except Exception:  # a challenge we can't use: not our secret's fault, never its text
            raise EWSError("Exchange's NTLM challenge could not be read", transient=True) from None
        if self._log:
            self._log("C: NTLM authenticate (type 3, with the request)")
        try:
            answer = await self._post(client, url, body, f"NTLM {base64.b64encode(authenticate or b'').decode()}",
                                      final=final)  # fmt: skip
        except _Unauthorized as u:
            raise self._unauthorized(u.answer) from None
        return answer, True

    async def _post(
        self, client: httpx2.AsyncClient, url: str, body: bytes, authorization: str | None, *, final: bool,
        leg: bool = False,
    ) -> _Answer:  # fmt: skip
        import httpx2

        c = self.connection
        if self._log:
            self._log(f"C: POST {url} ({len(body)} bytes)" + ("" if leg else f" as {self.mailbox.address}"))
        headers = {"Content-Type": "text/xml; charset=utf-8"}
        if authorization is not None:
            headers["Authorization"] = authorization
        problem = _url_problem(url, https_only=False)
        if problem is not None:
            raise _bad_url(problem)
        timeout = httpx2.Timeout(c.protocol_timeout, connect=c.connect_timeout)
        deadline = c.connect_timeout + c.protocol_timeout + len(body) / UPLOAD_RATE
        tls = None
        try:
            async with asyncio.timeout(deadline):
                async with client.stream("POST", url, headers=headers, content=body, timeout=timeout,
                                         follow_redirects=False) as r:  # fmt: skip
                    content = await read_capped(r, MAX_REPLY)
                    stream = r.extensions.get("network_stream")
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            tls = stream.get_extra_info("ssl_object")
        except TimeoutError:  # the whole request's deadline, not one read's
            raise self._lost(f"Exchange did not answer within {deadline:g} s (the request's deadline)", final) \
                from None  # fmt: skip
        except httpx2.TimeoutException:
            raise self._lost(f"Exchange did not answer within {c.protocol_timeout:g} s", final) from None
        except httpx2.InvalidURL:  # nothing was sent: the URL is not one httpx can request
            raise _bad_url("is not a URL mailgate can request") from None
        except (httpx2.ProtocolError, httpx2.DecodingError, TooLarge) as e:
            # Never the peer's bytes: the URL is a setting, it may point anywhere.
            raise self._lost(f"{url} did not answer as EWS would ({type(e).__name__})", final) from None
        except httpx2.HTTPError as e:
            raise self._lost(f"cannot reach Exchange at {url}: {e or type(e).__name__}", final) from None
        if self._log:
            self._log(f"S: {r.status_code}")
        challenge = None
        for value in r.headers.get_list("WWW-Authenticate"):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "ntlm" and token:
                challenge = token.strip()
        answer = _Answer(r.status_code, content, r.headers.get("Retry-After"), challenge, tls)
        if r.status_code == 401:
            raise _Unauthorized(answer)
        return answer

    # ---- Autodiscover ------------------------------------------------------------------------

    async def _endpoint(self) -> str:
        """ews.url; with autodiscover on and no url, the EWS URL the mailbox's domain publishes
        (found once per transport)."""
        if self.settings.url is not None:
            return self.settings.url
        if not self.settings.autodiscover:  # the document requires one or the other
            raise EWSError("no ews.url", transient=False)
        async with self._discovering:
            if self._discovered is None:
                self._discovered = await self._discover()
        return self._discovered

    async def _discover(self) -> str:
        """POX Autodiscover, bounded: at most two URLs of the mailbox's domain (no SRV lookup, no
        redirect followed: a redirect could lead our credentials anywhere), each through the same
        guarded client and with the same credentials; one the destination policy refuses is
        skipped (never connected to). The answer's EWS URL is used only if _url_problem finds
        nothing (https, printable, at most MAX_URL characters, no user:password@); connections to
        it are checked by the policy like any other."""
        domain = self.mailbox.ascii_domain
        request = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<Autodiscover xmlns="{NS_AUTODISCOVER_REQUEST}"><Request><EMailAddress>{_x(self.mailbox)}'
            f"</EMailAddress><AcceptableResponseSchema>{NS_AUTODISCOVER_OUTLOOK}</AcceptableResponseSchema>"
            "</Request></Autodiscover>"
        ).encode()
        tried: list[str] = []
        transient = True
        candidates = self._autodiscover_urls(domain)[:2]
        refused: list[DestinationRefused] = []
        for candidate in candidates:
            try:
                answer = await self._exchange(request, candidate, final=False, lane=False)
            except DestinationRefused as e:  # where the policy does not let us connect: the next one
                refused.append(e)
                tried.append(f"{candidate}: {e.message}")
                continue
            except EWSError as e:
                if e.code == 401:
                    raise
                tried.append(f"{candidate}: {e.message}")
                continue
            found, why = _ews_url_of(answer, self._said)
            if found is not None:
                if self._log:
                    self._log(f"Autodiscover: EWS at {found}")
                return found
            transient = False
            tried.append(f"{candidate}: {why}")
        if refused and len(refused) == len(candidates):
            raise refused[0]  # the policy's own cause and fix: only the operator (or ews.url) changes it
        explanation = explain_ews_error(0, "autodiscover")
        raise EWSError(f"Autodiscover found no EWS URL for {domain} ({'; '.join(tried)}). {explanation}",
                       explanation=explanation, transient=transient)  # fmt: skip

    def _lost(self, what: str, final: bool) -> EWSError:
        if final:  # the request went out: Exchange may have sent the message
            return EWSError(f"{what}; Exchange may have sent the message, so a retry may send it twice",
                            transient=True, uncertain=True)  # fmt: skip
        return EWSError(what, transient=True)

    def _unauthorized(self, answer: _Answer) -> EWSError:
        explanation = explain_ews_error(401, None, scheme=self.scheme)
        return EWSError(f"Exchange refused the credentials (HTTP 401). {explanation}", code=401,
                        explanation=explanation, transient=False)  # fmt: skip

    # ---- the answer ------------------------------------------------------------------------------

    def _result(self, answer: _Answer) -> ET.Element:
        """The response message of a NoError answer; otherwise raises what the answer means."""
        root = _parse(answer.body)
        if root is not None:
            self._learn_version(root)
        fault = root.find(f"{{{NS_SOAP}}}Body/{{{NS_SOAP}}}Fault") if root is not None else None
        if fault is not None:
            code = fault.findtext(f"detail/{{{NS_ERRORS}}}ResponseCode") or (fault.findtext("faultcode") or "")
            text = fault.findtext(f"detail/{{{NS_ERRORS}}}Message") or fault.findtext("faultstring")
            self._refusal(answer, code.strip().rpartition(":")[2], text, _back_off(fault))
        message = None
        if root is not None and answer.status == 200:
            message = root.find(f".//{{{NS_MESSAGES}}}ResponseMessages/*")
        if message is None:
            self._refusal(answer, None, None, None)
        assert message is not None
        code = (message.findtext(f"{{{NS_MESSAGES}}}ResponseCode") or "").strip()
        if message.get("ResponseClass") == "Success" and code in ("NoError", ""):
            return message
        self._refusal(answer, code, message.findtext(f"{{{NS_MESSAGES}}}MessageText"), _back_off(message))
        raise AssertionError("unreachable")

    def _said(self, text: str, limit: int = 300) -> str:
        """Exchange's text, fit to show (foreign_text), without our credentials in it."""
        return foreign_text(self._redacted(text), limit, secrets=(*self._secrets, *self._bearers))

    def _redacted(self, text: str) -> str:
        """`text` without the user name it echoes: DOMAIN\\user, or user@domain, in any case, and
        the user part of DOMAIN\\user as a word of its own (not inside a longer name or address)."""
        if len(self._username) < 4:
            return text
        text = re.sub(re.escape(self._username), "[redacted]", text, flags=re.IGNORECASE)
        user = self._username.rpartition("\\")[2]
        if user != self._username and len(user) >= 4:
            text = re.sub(rf"(?<![\w.@\\-]){re.escape(user)}(?![\w.@-])", "[redacted]", text, flags=re.IGNORECASE)
        return text

    def _learn_version(self, root: ET.Element) -> None:
        info = root.find(f"{{{NS_SOAP}}}Header/{{{NS_TYPES}}}ServerVersionInfo")
        if info is not None:
            numbers = [info.get(n) or "?" for n in ("MajorVersion", "MinorVersion", "MajorBuildNumber",
                                                     "MinorBuildNumber")]  # fmt: skip
            schema = info.get("Version")
            seen = ".".join(n[:10] for n in numbers) + (f" ({foreign_text(schema, 40)})" if schema else "")
            self.server_version = foreign_text(seen, 80)

    def _refusal(self, answer: _Answer, code: str | None, text: str | None, back_off: float | None) -> None:
        status = answer.status
        ews_code = code if code and _CODE.fullmatch(code) else None
        said_text = self._said(text) if text else None
        explanation = explain_ews_error(status, ews_code, scheme=self.scheme)
        said = f"HTTP {status}" + (f" {ews_code}" if ews_code else "") + (f": {said_text}" if said_text else "")
        message = f"Exchange refused ({said}). {explanation}"
        retry_after: float | None = back_off
        if retry_after is None:
            retry_after = http_retry_after(answer.retry_after)
            if retry_after is not None:
                retry_after = min(retry_after, MAX_BACKOFF)
        if explanation.transient:
            raise EWSError(message, code=status, ews_code=ews_code, explanation=explanation, transient=True,
                           retry_after=retry_after)  # fmt: skip
        if explanation.broken:
            raise EWSError(message, code=status, ews_code=ews_code, explanation=explanation, transient=False)
        raise Refused(status, message, explanation)


def _x(a: Address) -> str:
    return escape(a.ascii_address or a.address)


def _rcpt(a: Address) -> str:
    return a.envelope_form(a.requires_smtputf8)


def _header_recipients(data: bytes) -> tuple[set[str], set[str]]:
    """The To and Cc addresses of finished RFC 5322 bytes (lower-cased)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(data)

    def of(name: str) -> set[str]:
        values = [str(v) for v in headers.get_all(name) or []]
        return {address.lower() for _, address in getaddresses(values) if address}

    return of("To"), of("Cc")


def _parse(body: bytes) -> ET.Element | None:
    """The SOAP envelope, or None when the body is not one (or not safe to read: _safe_xml)."""
    root = _safe_xml(body)
    return root if root is not None and root.tag == f"{{{NS_SOAP}}}Envelope" else None


class _Unsafe(Exception):
    """A reply mailgate does not read further: a DTD, an entity, too deep or too many elements."""


def _safe_xml(body: bytes) -> ET.Element | None:
    """The reply's XML tree, or None when it is not XML or not safe to read. EWS and Autodiscover
    never send a DTD: one is refused as expat meets it — in whatever encoding the reply declares
    (UTF-16 too: a byte search for "<!DOCTYPE" cannot see it there) — before any entity could be
    declared or expanded. At most MAX_XML_DEPTH levels, MAX_XML_ELEMENTS elements, MAX_REPLY bytes."""
    if not body or len(body) > MAX_REPLY:
        return None
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    depth = elements = 0

    def name(n: str) -> str:  # expat's "uri}local" as ElementTree's "{uri}local"
        return "{" + n if "}" in n else n

    def start(tag: str, attributes: dict[str, str]) -> None:
        nonlocal depth, elements
        depth += 1
        elements += 1
        if depth > MAX_XML_DEPTH or elements > MAX_XML_ELEMENTS:
            raise _Unsafe
        builder.start(name(tag), {name(k): v for k, v in attributes.items()})

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(name(tag))

    def refuse(*_: Any) -> None:
        raise _Unsafe

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.NotationDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(body, True)
        return builder.close()
    except (_Unsafe, expat.ExpatError, ValueError, LookupError, AssertionError):
        return None


def default_autodiscover_urls(domain: str) -> list[str]:
    """Where Outlook first looks for a domain's Autodiscover (POX), in its order."""
    return [
        f"https://{domain}/autodiscover/autodiscover.xml",
        f"https://autodiscover.{domain}/autodiscover/autodiscover.xml",
    ]


def _ews_url_of(answer: _Answer, said: Callable[[str, int], str] = foreign_text) -> tuple[str | None, str]:
    """The EWS URL of a POX Autodiscover answer (external first), or None and why not."""
    if answer.status != 200:
        return None, f"HTTP {answer.status}"
    root = _safe_xml(answer.body)
    if root is None:
        return None, "not an Autodiscover answer"
    account = root.find(f"{{{NS_AUTODISCOVER_OUTLOOK}}}Response/{{{NS_AUTODISCOVER_OUTLOOK}}}Account")
    if root.tag != f"{{{NS_AUTODISCOVER}}}Autodiscover" or account is None:
        error = root.findtext(f".//{{{NS_AUTODISCOVER}}}ErrorCode")
        return None, f"Autodiscover error {said(error, 20)}" if error else \
            "not an Autodiscover answer"  # fmt: skip
    action = (account.findtext(f"{{{NS_AUTODISCOVER_OUTLOOK}}}Action") or "").strip()
    if action != "settings":
        return None, (f"Autodiscover answered {said(action, 30)!r}, which mailgate does not "
                      "follow")  # fmt: skip
    protocols = {(p.findtext(f"{{{NS_AUTODISCOVER_OUTLOOK}}}Type") or "").strip():
                 (p.findtext(f"{{{NS_AUTODISCOVER_OUTLOOK}}}EwsUrl") or "").strip()
                 for p in account.findall(f"{{{NS_AUTODISCOVER_OUTLOOK}}}Protocol")}  # fmt: skip
    for kind in ("EXPR", "EXCH"):  # outside the organization's network first
        url = protocols.get(kind)
        if url:
            problem = _url_problem(url, https_only=True)
            if problem is not None:  # never quoted: it is the answer's, not the tenant's
                return None, f"its EWS URL {problem}, which mailgate does not use"
            return url, ""
    return None, "no EwsUrl in the answer"


def _url_problem(url: str, *, https_only: bool) -> str | None:
    """Why mailgate does not send credentials to `url`, or None: longer than MAX_URL characters,
    not printable, not http(s) (`https_only`: not https), without a host or a valid port, or with
    a user name or password in it (user:password@host)."""
    if len(url) > MAX_URL:
        return f"is longer than {MAX_URL} characters"
    if not all(c.isprintable() and not c.isspace() for c in url):
        return "has characters that are not printable"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError when the port is not 0-65535
    except ValueError:
        return "is not a URL"
    if https_only and parts.scheme != "https":
        return "is not https"
    if parts.scheme not in ("https", "http") or not host:
        return "is not an http(s) URL"
    if "@" in parts.netloc:
        return "names a user name or password (user:password@)"
    return None


def _bad_url(problem: str) -> EWSError:
    """A URL no request can go to: a settings problem (ews.url, or what Autodiscover found)."""
    explanation = Explanation(
        f"The EWS URL {problem}.",
        "Give the server's EWS URL in ews.url, e.g. https://mail.example.com/EWS/Exchange.asmx.",
    )
    return EWSError(f"The EWS URL {problem}. Fix: {explanation.fix}", explanation=explanation, transient=False)


_NUMBER = re.compile(r"\s*([+-]?)(\d+)(?:\.(\d*))?\s*")


def _back_off(element: ET.Element) -> int | None:
    """Whole seconds of a MessageXml's BackOffMilliseconds (ErrorServerBusy), if given: rounded
    up, within 0 and MAX_BACKOFF (a huge, negative or fractional value is clamped, not trusted);
    None when it is not a number."""
    for value in element.iter(f"{{{NS_TYPES}}}Value"):
        if value.get("Name") == "BackOffMilliseconds":
            number = _NUMBER.fullmatch(value.text or "")
            if number is None:
                return None
            sign, whole, fraction = number.groups()
            if sign == "-":
                return 0
            # More than 15 digits is beyond MAX_BACKOFF anyway (and int() refuses 4,300 digits).
            milliseconds = int(whole) + (1 if (fraction or "").strip("0") else 0) if len(whole) <= 15 else 10**15
            return min(MAX_BACKOFF, -(-milliseconds // 1000))
    return None


def _quiet_spnego() -> None:
    """pyspnego logs every NTLM token at DEBUG (the type 3 token holds the password's
    NTLMv2 response, which can be cracked offline): its logger stays at INFO or above, whatever
    level the root logger has."""
    logger = logging.getLogger("spnego")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)


def _channel_bindings(tls: Any) -> Any:
    """RFC 5929 tls-server-end-point bindings of the connection's certificate, for Exchange's
    Extended Protection (on by default from Exchange 2019 CU14); None over plain HTTP."""
    if tls is None:
        return None
    import spnego.channel_bindings

    try:
        der = tls.getpeercert(binary_form=True)
    except (AttributeError, ValueError):
        return None
    if not der:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    # MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 §4.1).
    name = algorithm.name if algorithm is not None and not isinstance(algorithm, hashes.MD5 | hashes.SHA1) \
        else "sha256"  # fmt: skip
    digest = hashlib.new(name.replace("-", ""), der).digest()
    return spnego.channel_bindings.GssChannelBindings(application_data=b"tls-server-end-point:" + digest)


__all__ = ["EWSError", "EWSTransport"]
