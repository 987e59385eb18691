"""The Microsoft Graph transport: `sendMail` on the sending mailbox, with the app's own token
(`/users/{mailbox}`) or, for `graph.auth` delegated, the consenting mailbox's (`/me`).

The message goes as MIME (base64, `text/plain`) — the same composer as SMTP, so headers,
attachments and non-ASCII survive identically. Where MIME can't serve, it goes as JSON: Bcc
recipients (MIME sendMail takes recipients from the headers), `save_to_sent_items` off (MIME
sendMail always saves), or a retry to only some of the recipients. A message over ~3 MB takes the
large-attachment path when `large_attachments` is on: a draft, an upload session per big
attachment (byte ranges in order, to the pre-authenticated URL, without our token), then send.

At most 4 requests per mailbox are in flight (Outlook's concurrency limit); 429 and 503 honour
Retry-After; a refused token is renewed once. Refusals are explained by the diagnostics catalogue:
about the message → every recipient refused; about the server's settings → GraphError (broken).
Reference: shared/reference/mail-providers.md §5.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from .._http import MAX_REPLY, TooLarge, read_capped
from .._http import retry_after as http_retry_after
from ..delivery import Delivery, Outcome, RecipientResult
from ..diagnostics.catalogue import Explanation, explain_graph_error
from ..errors import DeliveryError, foreign_text
from ..message import Address, Attachment, Envelope, Message
from ..settings.document import MailServer
from ..smtp.protocol import ProtocolLog

if TYPE_CHECKING:
    import httpx2

    from ..oauth.tokens import AccessToken

LARGE_MESSAGE = 3 * 1024 * 1024  # raw bytes; base64 makes ~4 MB, Graph's request limit (reference §5.4)
SMALL_ATTACHMENT = 3 * 1024 * 1024  # below: POST …/attachments; above: an upload session
UPLOAD_CHUNK = 10 * 320 * 1024  # 3,276,800 B: under 4 MB, and a multiple of 320 KiB (reference §5.4)
MAILBOX_CONCURRENCY = 4
_GRAPH_CODE = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # ErrorAccessDenied, MailboxNotEnabledForRESTAPI, …


class Tokens(Protocol):
    async def __call__(self) -> AccessToken: ...

    def invalidate(self, token: AccessToken | None = None) -> None: ...


class ServiceError(DeliveryError):
    """A mail service's HTTP API (Graph, EWS) refused, or could not be reached. `code` is the HTTP
    status, `explanation` the catalogue's cause and fix."""

    def __init__(self, message: str, *, explanation: Explanation | None = None, uncertain: bool = False,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, **kw)
        self.explanation = explanation
        self.uncertain = uncertain  # the request went out and its answer was lost


class GraphError(ServiceError):
    """Graph refused, or could not be reached; `graph_code` is Graph's error code (ErrorAccessDenied, …)."""

    def __init__(self, message: str, *, graph_code: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.graph_code = graph_code


class Refused(Exception):
    """The message itself was refused: every recipient gets this answer."""

    def __init__(self, status: int | None, text: str, explanation: Explanation | None = None) -> None:
        self.status, self.text, self.explanation = status, text, explanation


def every_recipient(
    server: str, envelope: Envelope, outcome: Outcome, code: int | None, text: str, *, uncertain: bool = False
) -> Delivery:
    return Delivery(server, [RecipientResult(r, outcome, code, None, text, uncertain) for r in envelope.rcpt_to])


async def delivery_of(server: str, envelope: Envelope, sending: Awaitable[str], accepted: int) -> Delivery:
    """What one send to a mail service's HTTP API comes to for every recipient: `accepted` (the
    HTTP status) with the service's text, refused for good (Refused), or tried again later when the
    answer was lost (a ServiceError that is `uncertain`); any other ServiceError is raised."""
    try:
        text = await sending
    except Refused as r:
        return every_recipient(server, envelope, Outcome.PERMANENT, r.status, r.text)
    except ServiceError as e:
        if not e.uncertain:
            raise
        return every_recipient(server, envelope, Outcome.TRANSIENT, None, e.message, uncertain=True)
    return every_recipient(server, envelope, Outcome.ACCEPTED, accepted, text)


class MailboxSlots:
    """The per-mailbox limit on requests in flight, shared by every transport of a process."""

    def __init__(self, size: int = MAILBOX_CONCURRENCY) -> None:
        self._size = size
        self._slots: dict[tuple[str, str], asyncio.Semaphore] = {}

    def __call__(self, endpoint: str, mailbox: str) -> asyncio.Semaphore:
        return self._slots.setdefault((endpoint, mailbox.lower()), asyncio.Semaphore(self._size))


class GraphTransport:
    def __init__(
        self,
        server: MailServer,
        tokens: Tokens,
        http: httpx2.AsyncClient,
        *,
        slots: MailboxSlots | None = None,
        protocol_log: ProtocolLog | None = None,
    ) -> None:
        assert server.graph is not None
        self.settings = server.graph
        self.connection = server.connection
        self.tokens = tokens
        self.http = http
        self.mailbox = Address(server.graph.mailbox or server.sender_address)
        self.delegated = server.graph.auth == "delegated"
        # A delegated token is the consenting user's: /me is its mailbox, however Graph names it
        # (reference §5.1); an app-only token names the mailbox (it may send as any).
        user = "me" if self.delegated else f"users/{quote(self.mailbox.address, safe='@')}"
        self._base = f"{server.graph.endpoint.rstrip('/')}/v1.0/{user}"
        self._slots = (slots or MailboxSlots())(server.graph.endpoint, self.mailbox.address)
        self._log = protocol_log

    @property
    def server(self) -> str:
        return f"graph:{self.mailbox.address}"

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery:
        return await delivery_of(self.server, envelope, self._send(envelope, message), 202)

    async def aclose(self) -> None:
        pass  # the HTTP client belongs to the worker, shared by every transport

    # ---- the three ways -----------------------------------------------------------------------

    async def _send(self, envelope: Envelope, message: bytes | Message) -> str:
        g = self.settings
        if isinstance(message, bytes):
            return await self._send_mime(message, on_behalf=False)
        sender = message.sender()
        delegated = sender.address.lower() != self.mailbox.address.lower()
        if delegated and not g.allow_delegate:
            raise Refused(None, f"the message is from {sender.address}, not the sending mailbox "
                                 f"{self.mailbox.address}; set graph.allow_delegate to send as (or on behalf of) "
                                 "another address")  # fmt: skip
        on_behalf = delegated and g.delegate_as == "on_behalf"
        pending = set(envelope.rcpt_to)
        visible = [a for a in (*message.to, *message.cc)]
        whole = {_rcpt(a) for a in visible} == pending and not message.bcc
        large = message.estimated_size() > LARGE_MESSAGE
        if large and not g.large_attachments:
            raise Refused(None, f"the message is about {message.estimated_size() / 1e6:.1f} MB, more than one "
                                 "Graph request takes (~4 MB with base64); turn on graph.large_attachments, which "
                                 "needs the Mail.ReadWrite application permission")  # fmt: skip
        if large:
            return await self._send_draft(message, pending, on_behalf)
        if whole and g.save_to_sent_items:
            data = message.compose(utf8=False)
            if len(data) <= LARGE_MESSAGE:
                return await self._send_mime(data, on_behalf=on_behalf)
        return await self._send_json(message, pending, on_behalf)

    async def _send_mime(self, data: bytes, *, on_behalf: bool) -> str:
        if len(data) > LARGE_MESSAGE:
            raise Refused(None, f"the message is {len(data) / 1e6:.1f} MB, more than one Graph request takes")
        if on_behalf:
            data = f"Sender: <{self.mailbox.ascii_address or self.mailbox.address}>\r\n".encode() + data
        await self._call("POST", "/sendMail", content=base64.b64encode(data), content_type="text/plain",
                         final=True)  # fmt: skip
        return "accepted by Graph (sendMail, MIME): 202"

    async def _send_json(self, message: Message, pending: set[str], on_behalf: bool) -> str:
        body = {"message": self._json_message(message, pending, on_behalf, attachments=True)}
        if not self.settings.save_to_sent_items:
            body["saveToSentItems"] = False
        await self._call("POST", "/sendMail", json_body=body, final=True)
        return "accepted by Graph (sendMail, JSON): 202" + _left_out(message)

    async def _send_draft(self, message: Message, pending: set[str], on_behalf: bool) -> str:
        fields = self._json_message(message, pending, on_behalf, attachments=False)
        draft = await self._call("POST", "/messages", json_body=fields)
        draft_id = draft.get("id") if isinstance(draft, dict) else None
        if not isinstance(draft_id, str) or not draft_id:
            raise GraphError("Graph created a draft but returned no id", transient=True)
        path = f"/messages/{quote(draft_id, safe='')}"
        for att in message.attachments:
            if len(att.data) < SMALL_ATTACHMENT:
                await self._call("POST", f"{path}/attachments", json_body=_file_attachment(att))
            else:
                await self._upload(path, att)
        await self._call("POST", f"{path}/send", content=b"", content_type=None, final=True)
        return "accepted by Graph (draft with upload sessions, sent): 202" + _left_out(message)

    async def _upload(self, path: str, att: Attachment) -> None:
        item: dict[str, Any] = {"attachmentType": "file", "name": att.filename, "size": len(att.data),
                                "contentType": att.content_type}  # fmt: skip
        if att.content_id:
            item |= {"isInline": True, "contentId": att.content_id.strip("<>")}
        session = await self._call(
            "POST", f"{path}/attachments/createUploadSession", json_body={"AttachmentItem": item}
        )
        url = session.get("uploadUrl") if isinstance(session, dict) else None
        if not isinstance(url, str) or not _safe_url(url):
            raise GraphError("Graph's upload session has no usable uploadUrl (https expected)", transient=True)
        total = len(att.data)
        for start in range(0, total, UPLOAD_CHUNK):
            chunk = att.data[start : start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            # The upload URL is pre-authenticated: our token must not go there.
            headers = {"Content-Range": f"bytes {start}-{end}/{total}", "Content-Type": "application/octet-stream"}
            await self._request("PUT", url, headers, chunk, upload=True)

    # ---- requests ----------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
        content_type: str | None = "application/json", final: bool = False,
    ) -> Any:  # fmt: skip
        """A Graph API request with our bearer token; one new token if Graph refuses the first."""
        if json_body is not None:
            content = json.dumps(json_body, ensure_ascii=False).encode()
        for attempt in (1, 2):
            token = await self.tokens()
            headers = {"Authorization": f"Bearer {token.value}"}
            if content_type:
                headers["Content-Type"] = content_type
            try:
                return await self._request(method, self._base + path, headers, content or b"", final=final)
            except GraphError as e:
                if e.code != 401:
                    raise
                if attempt == 1:  # expired or revoked: one new token
                    self.tokens.invalidate(token)
                    continue
                raise GraphError(e.message, code=401, graph_code=e.graph_code, explanation=e.explanation,
                                 transient=False) from None  # fmt: skip
        raise AssertionError("unreachable")

    async def _request(
        self, method: str, url: str, headers: dict[str, str], content: bytes, *, final: bool = False,
        upload: bool = False,
    ) -> Any:  # fmt: skip
        import httpx2

        c = self.connection
        where = url.split("?")[0]
        if self._log:
            self._log(f"C: {method} {where} ({len(content)} bytes)")
        async with self._slots:
            timeout = httpx2.Timeout(c.protocol_timeout, connect=c.connect_timeout)
            try:
                async with self.http.stream(method, url, headers=headers, content=content, timeout=timeout) as r:
                    body = await read_capped(r, MAX_REPLY)
            except httpx2.TimeoutException:
                raise self._lost(f"Graph did not answer within {c.protocol_timeout:g} s", final) from None
            except (httpx2.ProtocolError, httpx2.DecodingError, TooLarge) as e:
                # Never the peer's bytes (h11 quotes them): the endpoint is a setting, it may be anything.
                raise self._lost(f"{where} did not answer as Graph would ({type(e).__name__})", final) from None
            except httpx2.HTTPError as e:
                raise self._lost(f"cannot reach Graph at {where}: {e or type(e).__name__}", final) from None
        if self._log:
            self._log(f"S: {r.status_code}")
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        if r.status_code < 300:
            return parsed
        # Our access token (not on an upload: that URL is pre-authenticated) is never repeated.
        bearer = headers.get("Authorization", "").removeprefix("Bearer ")
        return self._refusal(r.status_code, parsed, r.headers.get("Retry-After"), upload, secrets=(bearer,))

    def _lost(self, what: str, final: bool) -> GraphError:
        if final:  # the request went out: Graph may have accepted it (reference §10.6)
            return GraphError(f"{what}; Graph may have accepted the message, so a retry may send it twice",
                              transient=True, uncertain=True)  # fmt: skip
        return GraphError(what, transient=True)

    def _refusal(
        self, status: int, body: Any, retry_after_header: str | None, upload: bool, *, secrets: tuple[str, ...] = ()
    ) -> Any:
        # Only Graph's error shape ({"error": {"code", "message"}}), bounded: the endpoint is a
        # setting, and what it says is shown to the tenant's admin and stored.
        graph_code = message = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            graph_code = code if isinstance(code, str) and _GRAPH_CODE.fullmatch(code) else None
            text = error.get("message")
            message = foreign_text(text, secrets=secrets) if isinstance(text, str) else None
        explanation = explain_graph_error(status, graph_code, delegated=self.delegated)
        said = f"HTTP {status}" + (f" {graph_code}" if graph_code else "") + (f": {message}" if message else "")
        text = f"Graph refused{' the upload' if upload else ''} ({said}). {explanation}"
        retry_after = http_retry_after(retry_after_header)
        if explanation.transient or status == 401:
            raise GraphError(text, code=status, graph_code=graph_code, explanation=explanation, transient=True,
                             retry_after=retry_after)  # fmt: skip
        if explanation.broken:
            raise GraphError(text, code=status, graph_code=graph_code, explanation=explanation, transient=False)
        raise Refused(status, text)

    # ---- JSON form -----------------------------------------------------------------------------

    def _json_message(self, message: Message, pending: set[str], on_behalf: bool, *, attachments: bool) -> Any:
        m: dict[str, Any] = {"subject": message.subject}
        if message.html is not None:
            m["body"] = {"contentType": "HTML", "content": message.html}
        else:
            m["body"] = {"contentType": "Text", "content": message.text or ""}
        for key, addresses in (("toRecipients", message.to), ("ccRecipients", message.cc),
                               ("bccRecipients", message.bcc)):  # fmt: skip
            chosen = [_recipient(a) for a in addresses if _rcpt(a) in pending]
            if chosen:
                m[key] = chosen
        if message.reply_to:
            m["replyTo"] = [_recipient(a) for a in message.reply_to]
        sender = message.sender()
        if sender.address.lower() != self.mailbox.address.lower():
            m["from"] = _recipient(sender)
            if on_behalf:
                m["sender"] = _recipient(self.mailbox)
        headers = [{"name": n, "value": v} for n, v in message.headers if n.lower().startswith("x-")]
        if headers:
            m["internetMessageHeaders"] = headers
        if attachments and message.attachments:
            m["attachments"] = [_file_attachment(a) for a in message.attachments]
        return m


def _left_out(message: Message) -> str:
    dropped = [n for n, _ in message.headers if not n.lower().startswith("x-")]
    if not dropped:
        return ""
    return f"; left out {', '.join(dropped)} (Graph's JSON form takes only x- headers)"


def _rcpt(a: Address) -> str:
    return a.envelope_form(a.requires_smtputf8)


def _recipient(a: Address) -> dict[str, Any]:
    email: dict[str, str] = {"address": a.ascii_address or a.address}
    if a.name:
        email["name"] = a.name
    return {"emailAddress": email}


def _file_attachment(a: Attachment) -> dict[str, Any]:
    att: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": a.filename,
        "contentType": a.content_type,
        "contentBytes": base64.b64encode(a.data).decode("ascii"),
    }
    if a.content_id:
        att |= {"isInline": True, "contentId": a.content_id.strip("<>")}
    return att


def _safe_url(url: str) -> bool:
    """An upload URL carries its own credential (in its query): https, or http to loopback only."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and host in ("127.0.0.1", "::1", "localhost"))
