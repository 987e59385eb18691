"""A fake Microsoft Graph mail API for tests: sendMail (JSON and MIME), drafts, attachments, upload sessions.

`FakeGraph` is a real HTTP/1.1 server on 127.0.0.1 (ephemeral port, keep-alive) serving the
`/v1.0` routes a mail sender uses:

- `POST /v1.0/users/{mailbox}/sendMail` (JSON `{"message", "saveToSentItems"}` or base64 MIME as
  `text/plain`) → 202;
- `POST /v1.0/users/{mailbox}/messages` (create a draft) → 201;
- `POST /v1.0/users/{mailbox}/messages/{id}/attachments` (one fileAttachment, < 3 MB) → 201;
- `POST /v1.0/users/{mailbox}/messages/{id}/attachments/createUploadSession` → 201 with an
  `uploadUrl` on this server, then `PUT /upload/{session}?authtoken=…` in ordered byte ranges;
- `POST /v1.0/users/{mailbox}/messages/{id}/send` → 202.

Bearer tokens are validated against a `FakeIdentityProvider` (audience
`https://graph.microsoft.com`, roles `Mail.Send` / `Mail.ReadWrite`, expiry). Every request is
checked as strictly as Graph does and refused with Graph's status and error JSON
(`{"error": {"code", "message", "innerError": {...}}}`); nothing wrong is silently accepted.
Throttling (`throttle_next`, and Outlook's limit of 4 concurrent requests per mailbox) answers
429 with `Retry-After`. Every request is recorded in `requests`, every accepted message in
`sent`, every upload PUT in `uploads`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote

from .identity import (
    FakeIdentityProvider,
    HTTPRequest,
    HTTPResponse,
    IssuedToken,
    RecordedRequest,
    ThreadedFake,
    json_response,
)

__all__ = ["Attachment", "Draft", "FakeGraph", "SentMail", "UploadPut", "UploadSession", "mime_message_of"]

GRAPH_AUDIENCE = "https://graph.microsoft.com"
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_ATTACHMENT_POST_BYTES = 3 * 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_SESSION_BYTES = 150 * 1024 * 1024
MAX_RECIPIENTS = 500
UPLOAD_SESSION_LIFETIME = 6 * 3600

_ODATA_JSON = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
_ERROR_JSON = "application/json"
_USER = r"(?:users/(?P<user>[^/]+)|me)"
_ROUTES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"^/v1\.0/{_USER}/sendMail$", re.IGNORECASE), "send_mail", "Mail.Send"),
    (re.compile(rf"^/v1\.0/{_USER}/messages$", re.IGNORECASE), "create_draft", "Mail.ReadWrite"),
    (
        re.compile(rf"^/v1\.0/{_USER}/messages/(?P<id>[^/]+)/attachments$", re.IGNORECASE),
        "add_attachment",
        "Mail.ReadWrite",
    ),
    (
        re.compile(rf"^/v1\.0/{_USER}/messages/(?P<id>[^/]+)/attachments/createUploadSession$", re.IGNORECASE),
        "create_upload_session",
        "Mail.ReadWrite",
    ),
    (re.compile(rf"^/v1\.0/{_USER}/messages/(?P<id>[^/]+)/send$", re.IGNORECASE), "send_draft", "Mail.Send"),
]
_UPLOAD = re.compile(r"^/upload/(?P<session>[A-Za-z0-9_-]+)$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

_MESSAGE_PROPERTIES = [
    "subject",
    "body",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "from",
    "sender",
    "importance",
    "internetMessageHeaders",
    "attachments",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
]
_ATTACHMENT_PROPERTIES = ["name", "contentType", "contentBytes", "isInline", "contentId", "size"]
_UPLOAD_ITEM_PROPERTIES = ["attachmentType", "name", "size", "contentType", "isInline", "contentId"]
_SEND_AS_DENIED = (
    "The user account which was used to submit this request does not have the right to send mail on behalf of the"
    " specified sending account., Cannot submit message."
)


class Attachment(NamedTuple):
    """One attachment of a sent message (a tuple: name, content_type, data, is_inline, content_id)."""

    name: str
    content_type: str
    data: bytes
    is_inline: bool
    content_id: str | None


@dataclass
class SentMail:
    """A message Graph accepted for delivery."""

    mailbox: str  # the mailbox in the request path (as registered)
    via: Literal["mime", "json", "draft"]
    from_: str | None
    sender: str | None
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    save_to_sent_items: bool
    attachments: list[Attachment]
    mime: bytes | None  # the decoded MIME message (MIME sendMail or MIME draft)
    json: dict[str, Any] | None  # the JSON message object as posted (JSON sendMail or JSON draft)
    internet_message_headers: list[tuple[str, str]]
    reply_to: list[str] = field(default_factory=list)
    body_type: str | None = None  # "text" | "html" (JSON only)
    body: str | None = None
    at: float = 0.0
    token: IssuedToken | None = None  # the bearer token it came with (whose: token.subject; how: token.grant)


@dataclass
class UploadPut:
    """One PUT to an upload URL, accepted or not."""

    session_id: str
    start: int | None
    end: int | None
    total: int | None
    length: int
    had_authorization: bool
    status: int
    at: float


@dataclass
class UploadSession:
    id: str
    authtoken: str
    mailbox: str
    draft_id: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    expires_at: float
    received: bytearray = field(default_factory=bytearray)
    attachment_id: str | None = None

    @property
    def complete(self) -> bool:
        return len(self.received) == self.size


@dataclass
class Draft:
    """A draft created with POST …/messages and not sent yet."""

    id: str
    mailbox: str
    message: dict[str, Any] | None
    mime: bytes | None
    parsed: _Parsed
    attachments: list[Attachment] = field(default_factory=list)
    upload_sessions: list[UploadSession] = field(default_factory=list)


@dataclass
class _Parsed:
    from_: str | None = None
    sender: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    subject: str = ""
    body_type: str | None = None
    body: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    invalid_recipient: str | None = None


@dataclass
class _Mailbox:
    address: str
    send_as: frozenset[str]
    send_on_behalf: frozenset[str]
    rest_enabled: bool


class _GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)


def _body_read(message: str) -> _GraphError:
    return _GraphError(400, "RequestBodyRead", message)


def _unknown_property(name: str, type_name: str) -> _GraphError:
    return _body_read(
        f"The property '{name}' does not exist on type '{type_name}'. Make sure to only use property names that are"
        " defined by the type or mark the type as open type."
    )


def _invalid_recipient(address: str) -> _GraphError:
    return _GraphError(
        400,
        "ErrorInvalidRecipients",
        f"At least one recipient isn't valid., Recipient '{address}' is not resolved. All recipients must be"
        " resolved before a message can be submitted.",
    )


def _no_recipients() -> _GraphError:
    return _GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")


def _valid_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and not any(c in address for c in ";,<>\r\n\t ")


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _canonical(obj: dict[str, Any], allowed: list[str], type_name: str) -> dict[str, Any]:
    """obj with property names matched case-insensitively (as Graph does) to `allowed`; others refused."""
    by_lower = {name.lower(): name for name in allowed}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key.startswith("@odata."):
            continue
        name = by_lower.get(key.lower())
        if name is None:
            raise _unknown_property(key, type_name)
        if name in out:
            raise _body_read(f"Duplicate property '{key}' on type '{type_name}'.")
        out[name] = value
    return out


def _expect(value: Any, kind: type | tuple[type, ...], what: str, *, nullable: bool = True) -> Any:
    if value is None and nullable:
        return None
    if isinstance(value, bool) and kind is int:
        raise _body_read(f"Cannot convert the literal '{value}' to the expected type of {what}.")
    if not isinstance(value, kind):
        raise _body_read(f"Cannot convert the literal '{json.dumps(value)}' to the expected type of {what}.")
    return value


def _decode_base64(text: str, what: str) -> bytes:
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text.encode("ascii"))
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise _body_read(
            f"Cannot convert the literal '{text[:40]}…' to the expected type 'Edm.Binary' ({what})."
        ) from exc


def _iso(moment: float) -> str:
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}0Z"


class FakeGraph(ThreadedFake):
    """Microsoft Graph mail sending on 127.0.0.1 (see the module docstring)."""

    def __init__(self, identity: FakeIdentityProvider) -> None:
        super().__init__()
        self.identity = identity
        self.delay: float = 0.0
        self.max_concurrency_per_mailbox: int = 4
        self.min_upload_session_size: int = 3 * 1024 * 1024
        self.requests: list[RecordedRequest] = []
        self.sent: list[SentMail] = []
        self.drafts: dict[str, Draft] = {}
        self.uploads: list[UploadPut] = []
        self.upload_violations: list[str] = []  # e.g. an Authorization header sent to a pre-authenticated URL
        self.max_in_flight: dict[str, int] = {}
        self.concurrency_violations: int = 0
        self._mailboxes: dict[str, _Mailbox] = {}
        self._throttles: list[tuple[int, int | None]] = []
        self._refusals: list[tuple[int, str, str]] = []
        self._in_flight: dict[str, int] = {}
        self._sessions: dict[str, UploadSession] = {}
        self._tls = threading.local()

    # ---- configuration -------------------------------------------------------------------

    def add_mailbox(
        self,
        address: str,
        *,
        send_as: Iterable[str] = (),
        send_on_behalf: Iterable[str] = (),
        rest_enabled: bool = True,
    ) -> None:
        """A mailbox the app may send from; `send_as`/`send_on_behalf` are other addresses it may put in `from`."""
        with self._lock:
            self._mailboxes[address.lower()] = _Mailbox(
                address,
                frozenset(a.lower() for a in send_as),
                frozenset(a.lower() for a in send_on_behalf),
                rest_enabled,
            )

    def throttle_next(self, count: int, status: int = 429, retry_after: int | None = 1) -> None:
        """The next `count` API requests (not upload PUTs) get 429 ApplicationThrottled or 503 ServiceUnavailable."""
        with self._lock:
            self._throttles.extend((status, retry_after) for _ in range(count))

    def refuse_next(self, status: int, code: str, message: str, count: int = 1) -> None:
        """The next `count` API requests, once authenticated, get this documented Graph error
        (e.g. 403 ErrorQuotaExceeded) instead of being processed. "{token}" in the message
        becomes the request's access token (a server that echoes what it was sent)."""
        with self._lock:
            self._refusals.extend((status, code, message) for _ in range(count))

    # ---- HTTP ----------------------------------------------------------------------------

    def _body_too_large(self) -> HTTPResponse:
        return self._error(_GraphError(413, "RequestEntityTooLarge", "The request entity is too large."), {})

    def _error(self, error: _GraphError, headers: dict[str, str]) -> HTTPResponse:
        request_id = str(uuid.uuid4())
        client_request_id = headers.get("client-request-id") or request_id
        payload = {
            "error": {
                "code": error.code,
                "message": error.message,
                "innerError": {
                    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": request_id,
                    "client-request-id": client_request_id,
                },
            }
        }
        response = json_response(error.status, payload, content_type=_ERROR_JSON)
        response.headers += [("request-id", request_id), ("client-request-id", client_request_id), *error.headers]
        return response

    def _handle(self, request: HTTPRequest) -> HTTPResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=request.body,
            at=request.at,
        )
        with self._lock:
            self.requests.append(record)
        try:
            response = self._upload(request) if _UPLOAD.match(request.path) else self._api(request)
        except _GraphError as error:
            response = self._error(error, request.headers)
        if not any(name == "request-id" for name, _ in response.headers):
            request_id = str(uuid.uuid4())
            client_request_id = request.headers.get("client-request-id") or request_id
            response.headers += [("request-id", request_id), ("client-request-id", client_request_id)]
        record.status = response.status
        return response

    def _api(self, request: HTTPRequest) -> HTTPResponse:
        with self._lock:
            throttle = self._throttles.pop(0) if self._throttles else None
        if throttle is not None:
            status, retry_after = throttle
            headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
            if status == 429:
                raise _GraphError(
                    429, "ApplicationThrottled", "Application is over its resource limit.", headers=headers
                )
            raise _GraphError(status, "ServiceUnavailable", "The service is temporarily unavailable.", headers=headers)
        if len(request.body) > MAX_REQUEST_BYTES:
            raise _GraphError(413, "RequestEntityTooLarge", "The request entity is too large (limit: 4 MB).")
        token = self._authenticate(request.headers)
        self._tls.token = token  # this request's (one thread per connection), for the SentMail
        with self._lock:
            refusal = self._refusals.pop(0) if self._refusals else None
        if refusal is not None:
            status, code, message = refusal
            bearer = request.headers.get("authorization", "").partition(" ")[2].strip()
            raise _GraphError(status, code, message.replace("{token}", bearer))
        route = next(((m, h, p) for pattern, h, p in _ROUTES if (m := pattern.match(request.path))), None)
        if route is None:
            raise _GraphError(404, "ResourceNotFound", f"Resource not found for the segment '{request.path}'.")
        match, handler, permission = route
        if request.method != "POST":
            raise _GraphError(
                405, "MethodNotAllowed", f"The method '{request.method}' is not allowed on this resource."
            )
        mailbox = self._mailbox(match.group("user"), token)
        self._authorize(token, mailbox, permission)
        key = mailbox.address.lower()
        with self._lock:
            in_flight = self._in_flight.get(key, 0) + 1
            self._in_flight[key] = in_flight
            self.max_in_flight[key] = max(self.max_in_flight.get(key, 0), in_flight)
            over = in_flight > self.max_concurrency_per_mailbox
            if over:
                self.concurrency_violations += 1
        try:
            if over:
                raise _GraphError(
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                    headers=[("Retry-After", "1")],
                )
            if self.delay:
                time.sleep(self.delay)
            method = getattr(self, f"_{handler}")
            response: HTTPResponse = method(request, mailbox, match.groupdict().get("id"))
            return response
        finally:
            with self._lock:
                self._in_flight[key] -= 1

    # ---- auth ----------------------------------------------------------------------------

    def _authenticate(self, headers: dict[str, str]) -> IssuedToken:
        www = [
            (
                "WWW-Authenticate",
                'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize",'
                ' client_id="00000003-0000-0000-c000-000000000000"',
            )
        ]
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _GraphError(401, "InvalidAuthenticationToken", "Access token is empty.", headers=www)
        parts = token.split(".")
        if len(parts) != 3 or not all(parts[:2]):
            raise _GraphError(
                401,
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed, there are no dots (.).\nThe token needs to be in JWS or JWE Compact"
                " Serialization Format. (JWS): 'EncodedHeader.EncodedPayload.EncodedSignature'. (JWE):"
                " 'EncodedProtectedHeader.EncodedEncryptedKey.EncodedInitializationVector.EncodedCiphertext"
                ".EncodedAuthenticationTag'.",
                headers=www,
            )
        info = self.identity.lookup(token)
        if info is None:
            raise _GraphError(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid signature.", headers=www
            )
        if info.expired:
            raise _GraphError(
                401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.", headers=www
            )
        if info.audience != GRAPH_AUDIENCE:
            raise _GraphError(401, "InvalidAuthenticationToken", "Invalid audience.", headers=www)
        return info

    def _mailbox(self, raw: str | None, token: IssuedToken) -> _Mailbox:
        if raw is None:  # /me
            if token.subject is None:
                raise _GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
            address = token.subject
        else:
            address = unquote(raw)
        with self._lock:
            mailbox = self._mailboxes.get(address.lower())
        if mailbox is None:
            raise _GraphError(404, "ErrorInvalidUser", f"The requested user '{address}' is invalid.")
        if not mailbox.rest_enabled:
            raise _GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        return mailbox

    @staticmethod
    def _authorize(token: IssuedToken, mailbox: _Mailbox, permission: str) -> None:
        if token.subject is None:
            granted = permission in token.roles
        elif token.subject.lower() == mailbox.address.lower():
            granted = permission in token.scopes or f"{permission}.Shared" in token.scopes
        else:
            granted = f"{permission}.Shared" in token.scopes
        if not granted:
            raise _GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    # ---- message parsing -----------------------------------------------------------------

    @staticmethod
    def _json_body(request: HTTPRequest) -> Any:
        if _media_type(request.headers) != "application/json":
            raise _GraphError(
                415,
                "UnsupportedMediaType",
                f"The content type '{request.headers.get('content-type', '')}' is not supported; use application/json.",
            )
        try:
            return json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _body_read(f"Invalid JSON. {exc}") from exc

    @staticmethod
    def _email_address(value: Any, prop: str) -> tuple[str, str | None] | None:
        """A recipient object `{"emailAddress": {"address", "name"?}}` as (address, name)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _body_read(
                f"An unexpected '{type(value).__name__}' value was found for '{prop}'; expected a recipient."
            )
        recipient = _canonical(value, ["emailAddress"], "microsoft.graph.recipient")
        email = recipient.get("emailAddress")
        if not isinstance(email, dict):
            raise _body_read(f"'{prop}' needs an 'emailAddress' object.")
        fields = _canonical(email, ["address", "name"], "microsoft.graph.emailAddress")
        address = _expect(fields.get("address"), str, f"'{prop}' emailAddress.address")
        name = _expect(fields.get("name"), str, f"'{prop}' emailAddress.name")
        if address is None:
            raise _invalid_recipient("")
        return address, name

    def _recipients(self, value: Any, prop: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _body_read(f"'{prop}' must be a collection of recipients.")
        out: list[str] = []
        for item in value:
            pair = self._email_address(item, prop)
            if pair is None:
                raise _body_read(f"A null recipient was found in '{prop}'.")
            out.append(pair[0])
        return out

    def _file_attachment(self, value: Any) -> Attachment:
        if not isinstance(value, dict):
            raise _body_read("An attachment must be a JSON object.")
        odata_type = next((v for k, v in value.items() if k.lower() == "@odata.type"), None)
        if odata_type is None:
            extra = next((k for k in value if k.lower() in ("contentbytes", "contentid")), "contentBytes")
            raise _unknown_property(extra, "microsoft.graph.attachment")
        if str(odata_type).lower().lstrip("#") != "microsoft.graph.fileattachment":
            raise _body_read(f"Attachment type '{odata_type}' is not supported by this fake (fileAttachment only).")
        fields = _canonical(value, _ATTACHMENT_PROPERTIES, "microsoft.graph.fileAttachment")
        content = _expect(fields.get("contentBytes"), str, "'contentBytes' (Edm.Binary)")
        if content is None:
            raise _GraphError(400, "ErrorInvalidRequest", "The fileAttachment has no contentBytes.")
        data = _decode_base64(content, "contentBytes")
        return Attachment(
            name=_expect(fields.get("name"), str, "'name' (Edm.String)") or "",
            content_type=_expect(fields.get("contentType"), str, "'contentType' (Edm.String)")
            or "application/octet-stream",
            data=data,
            is_inline=bool(_expect(fields.get("isInline"), bool, "'isInline' (Edm.Boolean)")),
            content_id=_expect(fields.get("contentId"), str, "'contentId' (Edm.String)"),
        )

    def _message(self, value: Any) -> _Parsed:
        """Validate a microsoft.graph.message object as sendMail / create message do."""
        if not isinstance(value, dict):
            raise _body_read("The 'message' must be a JSON object (microsoft.graph.message).")
        fields = _canonical(value, _MESSAGE_PROPERTIES, "microsoft.graph.message")
        parsed = _Parsed()
        parsed.subject = _expect(fields.get("subject"), str, "'subject' (Edm.String)") or ""
        body = fields.get("body")
        if body is not None:
            if not isinstance(body, dict):
                raise _body_read("'body' must be an itemBody object.")
            item = _canonical(body, ["contentType", "content"], "microsoft.graph.itemBody")
            content_type = _expect(item.get("contentType"), str, "'body.contentType' (microsoft.graph.bodyType)")
            if content_type is not None and content_type.lower() not in ("text", "html"):
                raise _body_read(
                    f"Cannot convert the literal '{content_type}' to the expected type 'microsoft.graph.bodyType'."
                )
            parsed.body_type = (content_type or "text").lower()
            parsed.body = _expect(item.get("content"), str, "'body.content' (Edm.String)") or ""
        parsed.to = self._recipients(fields.get("toRecipients"), "toRecipients")
        parsed.cc = self._recipients(fields.get("ccRecipients"), "ccRecipients")
        parsed.bcc = self._recipients(fields.get("bccRecipients"), "bccRecipients")
        parsed.reply_to = self._recipients(fields.get("replyTo"), "replyTo")
        for prop in ("from", "sender"):
            pair = self._email_address(fields.get(prop), prop)
            if pair is not None:
                if not _valid_address(pair[0]):
                    raise _invalid_recipient(pair[0])
                setattr(parsed, "from_" if prop == "from" else "sender", pair[0])
        importance = _expect(fields.get("importance"), str, "'importance' (microsoft.graph.importance)")
        if importance is not None and importance.lower() not in ("low", "normal", "high"):
            raise _body_read(
                f"Cannot convert the literal '{importance}' to the expected type 'microsoft.graph.importance'."
            )
        for prop in ("isDeliveryReceiptRequested", "isReadReceiptRequested"):
            _expect(fields.get(prop), bool, f"'{prop}' (Edm.Boolean)")
        headers = fields.get("internetMessageHeaders")
        if headers is not None:
            if not isinstance(headers, list):
                raise _body_read("'internetMessageHeaders' must be a collection.")
            for header in headers:
                if not isinstance(header, dict):
                    raise _body_read("An internetMessageHeader must be a JSON object.")
                entry = _canonical(header, ["name", "value"], "microsoft.graph.internetMessageHeader")
                name = _expect(entry.get("name"), str, "'name' (Edm.String)") or ""
                header_value = _expect(entry.get("value"), str, "'value' (Edm.String)") or ""
                if not name.lower().startswith("x-"):
                    raise _GraphError(
                        400,
                        "InvalidInternetMessageHeader",
                        f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
                    )
                parsed.headers.append((name, header_value))
        attachments = fields.get("attachments")
        if attachments is not None:
            if not isinstance(attachments, list):
                raise _body_read("'attachments' must be a collection.")
            parsed.attachments = [self._file_attachment(item) for item in attachments]
        for address in [*parsed.to, *parsed.cc, *parsed.bcc, *parsed.reply_to]:
            if not _valid_address(address):
                raise _invalid_recipient(address)
        return parsed

    @staticmethod
    def _mime(body: bytes) -> tuple[bytes, _Parsed]:
        """Decode a base64 MIME body (sendMail / create message with text/plain) and read it like Exchange."""
        invalid = _GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        try:
            compact = "".join(body.decode("ascii").split())
            raw = base64.b64decode(compact, validate=True)
        except (UnicodeDecodeError, binascii.Error, ValueError):
            raise invalid from None
        if not raw:
            raise invalid
        message = BytesParser(policy=default_policy).parsebytes(raw)
        known = {"from", "sender", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "content-type"}
        if not known.intersection(name.lower() for name in message):
            raise invalid  # not an RFC 5322 message (e.g. base64 of JSON): nothing Exchange could submit
        parsed = _Parsed()

        def addresses(name: str) -> list[str]:
            out: list[str] = []
            for header in message.get_all(name, []):
                try:
                    found = [a.addr_spec for a in header.addresses]
                except (AttributeError, ValueError):
                    found = [str(header)]
                if getattr(header, "defects", ()) and parsed.invalid_recipient is None:
                    parsed.invalid_recipient = str(header)  # e.g. "a@x; b@y": the parser dropped part of it
                for address in found:
                    if not _valid_address(address) and parsed.invalid_recipient is None:
                        parsed.invalid_recipient = address
                    out.append(address)
            return out

        parsed.to, parsed.cc, parsed.bcc = addresses("To"), addresses("Cc"), addresses("Bcc")
        parsed.reply_to = addresses("Reply-To")
        from_ = addresses("From")
        sender = addresses("Sender")
        parsed.from_ = from_[0] if from_ else None
        parsed.sender = sender[0] if sender else None
        parsed.subject = str(message.get("Subject", ""))
        parsed.headers = [(name, str(value)) for name, value in message.items()]
        parsed.attachments = _mime_attachments(message)
        return raw, parsed

    @staticmethod
    def _check_from(mailbox: _Mailbox, parsed: _Parsed) -> None:
        """Send As / Send on Behalf rules for `from` and `sender`."""
        own = mailbox.address.lower()
        from_ = parsed.from_.lower() if parsed.from_ else None
        sender = parsed.sender.lower() if parsed.sender else None
        if from_ is None or from_ == own:
            allowed = sender in (None, own)
        elif from_ in mailbox.send_as:
            allowed = sender in (None, from_)
        elif from_ in mailbox.send_on_behalf:
            allowed = sender in (None, own)
        else:
            allowed = False
        if not allowed:
            raise _GraphError(403, "ErrorSendAsDenied", _SEND_AS_DENIED)

    @staticmethod
    def _check_recipients(parsed: _Parsed) -> None:
        if parsed.invalid_recipient is not None:
            raise _invalid_recipient(parsed.invalid_recipient)
        count = len(parsed.to) + len(parsed.cc) + len(parsed.bcc)
        if count == 0:
            raise _no_recipients()
        if count > MAX_RECIPIENTS:
            raise _GraphError(
                400,
                "ErrorTooManyRecipients",
                f"The message has {count} recipients; the maximum is {MAX_RECIPIENTS}.",
            )

    # ---- routes --------------------------------------------------------------------------

    def _send_mail(self, request: HTTPRequest, mailbox: _Mailbox, _: str | None) -> HTTPResponse:
        media = _media_type(request.headers)
        if media == "text/plain":
            raw, parsed = self._mime(request.body)
            self._check_recipients(parsed)
            self._check_from(mailbox, parsed)
            self._record_sent(mailbox, "mime", parsed, save=True, mime=raw, message=None)
            return HTTPResponse(202)
        payload = self._json_body(request)
        if not isinstance(payload, dict):
            raise _body_read("The request body must be a JSON object with a 'message'.")
        params: dict[str, Any] = {}
        for key, value in payload.items():
            name = {"message": "message", "savetosentitems": "saveToSentItems"}.get(key.lower())
            if name is None:
                raise _body_read(
                    f"The parameter '{key}' in the request payload is not a valid parameter for the operation"
                    " 'sendMail'."
                )
            params[name] = value
        if params.get("message") is None:
            raise _GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.")
        save = params.get("saveToSentItems", True)
        if isinstance(save, str) and save.lower() in ("true", "false"):
            save = save.lower() == "true"
        if not isinstance(save, bool):
            raise _body_read(f"Cannot convert the literal '{save}' to the expected type 'Edm.Boolean'.")
        parsed = self._message(params["message"])
        self._check_recipients(parsed)
        self._check_from(mailbox, parsed)
        self._record_sent(mailbox, "json", parsed, save=save, mime=None, message=params["message"])
        return HTTPResponse(202)

    def _create_draft(self, request: HTTPRequest, mailbox: _Mailbox, _: str | None) -> HTTPResponse:
        if _media_type(request.headers) == "text/plain":
            raw: bytes | None
            raw, parsed = self._mime(request.body)
            message = None
        else:
            message = self._json_body(request)
            parsed = self._message(message)
            raw = None
        draft_id = "AAMkAG" + secrets.token_urlsafe(60) + "="
        draft = Draft(draft_id, mailbox.address, message, raw, parsed, attachments=list(parsed.attachments))
        with self._lock:
            self.drafts[draft_id] = draft
        now = _iso(time.time())
        reply = {
            "@odata.context": f"https://graph.microsoft.com/v1.0/$metadata#users('{mailbox.address}')/messages/$entity",
            "@odata.etag": 'W/"' + secrets.token_urlsafe(24) + '"',
            "id": draft_id,
            "createdDateTime": now,
            "lastModifiedDateTime": now,
            "isDraft": True,
            "hasAttachments": bool(draft.attachments),
            "subject": parsed.subject,
            "body": {"contentType": parsed.body_type or "text", "content": parsed.body or ""},
            "toRecipients": [{"emailAddress": {"address": a}} for a in parsed.to],
            "ccRecipients": [{"emailAddress": {"address": a}} for a in parsed.cc],
            "bccRecipients": [{"emailAddress": {"address": a}} for a in parsed.bcc],
        }
        return json_response(201, reply, content_type=_ODATA_JSON)

    def _draft(self, mailbox: _Mailbox, draft_id: str | None) -> Draft:
        key = unquote(draft_id or "")
        with self._lock:
            draft = self.drafts.get(key)
        if draft is None or draft.mailbox != mailbox.address:
            raise _GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return draft

    def _add_attachment(self, request: HTTPRequest, mailbox: _Mailbox, draft_id: str | None) -> HTTPResponse:
        draft = self._draft(mailbox, draft_id)
        attachment = self._file_attachment(self._json_body(request))
        if len(attachment.data) > MAX_ATTACHMENT_POST_BYTES:
            raise _GraphError(
                413,
                "RequestEntityTooLarge",
                "Attachments of 3 MB or more must be uploaded with createUploadSession.",
            )
        attachment_id = draft.id + secrets.token_urlsafe(12)
        with self._lock:
            draft.attachments.append(attachment)
        reply = {
            "@odata.context": f"https://graph.microsoft.com/v1.0/$metadata#users('{mailbox.address}')"
            f"/messages('{draft.id}')/attachments/$entity",
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": attachment_id,
            "lastModifiedDateTime": _iso(time.time()),
            "name": attachment.name,
            "contentType": attachment.content_type,
            "size": len(attachment.data),
            "isInline": attachment.is_inline,
            "contentId": attachment.content_id,
        }
        return json_response(201, reply, content_type=_ODATA_JSON)

    def _create_upload_session(self, request: HTTPRequest, mailbox: _Mailbox, draft_id: str | None) -> HTTPResponse:
        draft = self._draft(mailbox, draft_id)
        payload = self._json_body(request)
        if not isinstance(payload, dict):
            raise _body_read("The request body must be a JSON object with an 'AttachmentItem'.")
        for key in payload:
            if key != "AttachmentItem":
                raise _body_read(
                    f"The parameter '{key}' in the request payload is not a valid parameter for the operation"
                    " 'createUploadSession'."
                )
        item = payload.get("AttachmentItem")
        if not isinstance(item, dict):
            raise _GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'AttachmentItem' is empty.")
        fields = _canonical(item, _UPLOAD_ITEM_PROPERTIES, "microsoft.graph.attachmentItem")
        kind = _expect(fields.get("attachmentType"), str, "'attachmentType' (microsoft.graph.attachmentType)")
        if kind != "file":
            raise _body_read(f"'attachmentType' must be 'file' for a file attachment, got {kind!r}.")
        name = _expect(fields.get("name"), str, "'name' (Edm.String)")
        if not name:
            raise _GraphError(400, "ErrorInvalidParameter", "The attachment 'name' is required.")
        size = _expect(fields.get("size"), int, "'size' (Edm.Int64)")
        if size is None:
            raise _GraphError(400, "ErrorInvalidParameter", "The attachment 'size' is required.")
        if size < self.min_upload_session_size:
            raise _GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size must be greater than the minimum size.",
            )
        if size > MAX_UPLOAD_SESSION_BYTES:
            raise _GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
        session = UploadSession(
            id=secrets.token_urlsafe(24),
            authtoken=secrets.token_urlsafe(48),
            mailbox=mailbox.address,
            draft_id=draft.id,
            name=name,
            size=size,
            content_type=_expect(fields.get("contentType"), str, "'contentType' (Edm.String)")
            or "application/octet-stream",
            is_inline=bool(_expect(fields.get("isInline"), bool, "'isInline' (Edm.Boolean)")),
            content_id=_expect(fields.get("contentId"), str, "'contentId' (Edm.String)"),
            expires_at=time.time() + UPLOAD_SESSION_LIFETIME,
        )
        with self._lock:
            self._sessions[session.id] = session
            draft.upload_sessions.append(session)
        reply = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": f"{self.url}/upload/{session.id}?authtoken={session.authtoken}",
            "expirationDateTime": _iso(session.expires_at),
            "nextExpectedRanges": ["0-"],
        }
        return json_response(201, reply, content_type=_ODATA_JSON)

    def _send_draft(self, request: HTTPRequest, mailbox: _Mailbox, draft_id: str | None) -> HTTPResponse:
        if request.body:
            raise _body_read("The send action takes no request body.")
        draft = self._draft(mailbox, draft_id)
        incomplete = [s for s in draft.upload_sessions if not s.complete]
        if incomplete:
            detail = ", ".join(f"'{s.name}' ({len(s.received)} of {s.size} bytes)" for s in incomplete)
            raise _GraphError(
                400,
                "ErrorInvalidRequest",
                f"attachment upload incomplete: {detail}. (The real service would send without it.)",
            )
        parsed = draft.parsed
        self._check_recipients(parsed)
        self._check_from(mailbox, parsed)
        with self._lock:
            if self.drafts.pop(draft.id, None) is None:
                raise _GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        uploaded = [
            Attachment(s.name, s.content_type, bytes(s.received), s.is_inline, s.content_id)
            for s in draft.upload_sessions
        ]
        parsed_all = dataclasses.replace(parsed, attachments=[*draft.attachments, *uploaded])
        self._record_sent(mailbox, "draft", parsed_all, save=True, mime=draft.mime, message=draft.message)
        return HTTPResponse(202)

    def _record_sent(
        self,
        mailbox: _Mailbox,
        via: Literal["mime", "json", "draft"],
        parsed: _Parsed,
        *,
        save: bool,
        mime: bytes | None,
        message: dict[str, Any] | None,
    ) -> None:
        mail = SentMail(
            mailbox=mailbox.address,
            via=via,
            from_=parsed.from_,
            sender=parsed.sender,
            to=list(parsed.to),
            cc=list(parsed.cc),
            bcc=list(parsed.bcc),
            subject=parsed.subject,
            save_to_sent_items=save,
            attachments=list(parsed.attachments),
            mime=mime,
            json=message,
            internet_message_headers=list(parsed.headers),
            reply_to=list(parsed.reply_to),
            body_type=parsed.body_type,
            body=parsed.body,
            at=time.time(),
            token=getattr(self._tls, "token", None),
        )
        with self._lock:
            self.sent.append(mail)

    # ---- upload sessions -----------------------------------------------------------------

    def _upload(self, request: HTTPRequest) -> HTTPResponse:
        match = _UPLOAD.match(request.path)
        assert match is not None
        session_id = match.group("session")
        had_authorization = "authorization" in request.headers
        put = UploadPut(session_id, None, None, None, len(request.body), had_authorization, 0, request.at)
        with self._lock:
            self.uploads.append(put)
        try:
            response = self._upload_chunk(request, session_id, put)
        except _GraphError as error:
            response = self._error(error, request.headers)
        put.status = response.status
        return response

    def _upload_chunk(self, request: HTTPRequest, session_id: str, put: UploadPut) -> HTTPResponse:
        if put.had_authorization:
            with self._lock:
                self.upload_violations.append(
                    f"PUT {request.path}: Authorization header sent to a pre-authenticated upload URL"
                )
            raise _GraphError(
                401,
                "InvalidAuthenticationToken",
                "Do not send an Authorization header to the pre-authenticated upload URL.",
            )
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise _GraphError(404, "ErrorItemNotFound", "The upload session was not found (finished or expired).")
        if not secrets.compare_digest(request.query.get("authtoken", ""), session.authtoken):
            raise _GraphError(
                401, "InvalidAuthenticationToken", "The authtoken of the upload URL is missing or invalid."
            )
        if request.method != "PUT":
            raise _GraphError(
                405, "MethodNotAllowed", f"The method '{request.method}' is not allowed on an upload URL."
            )
        if time.time() >= session.expires_at:
            raise _GraphError(404, "ErrorItemNotFound", "The upload session has expired.")
        if _media_type(request.headers) != "application/octet-stream":
            raise _GraphError(
                400, "InvalidRequest", "Content-Type must be application/octet-stream for an upload session PUT."
            )
        content_range = _CONTENT_RANGE.match(request.headers.get("content-range", "").strip())
        if content_range is None:
            raise _GraphError(
                400,
                "InvalidRange",
                "Content-Range must be 'bytes {start}-{end}/{total}', got"
                f" {request.headers.get('content-range')!r}.",
            )
        start, end, total = (int(g) for g in content_range.groups())
        put.start, put.end, put.total = start, end, total
        if "content-length" not in request.headers:
            raise _GraphError(411, "InvalidRange", "Content-Length is required.")
        if end < start or end >= total:
            raise _GraphError(400, "InvalidRange", f"The range {start}-{end}/{total} is not valid.")
        if total != session.size:
            raise _GraphError(
                400,
                "InvalidRange",
                f"The total size {total} does not match the declared attachment size {session.size}.",
            )
        if end - start + 1 != len(request.body):
            raise _GraphError(
                400,
                "InvalidRange",
                f"Content-Range covers {end - start + 1} bytes but the body has {len(request.body)} bytes.",
            )
        if len(request.body) > MAX_CHUNK_BYTES:
            raise _GraphError(413, "RequestEntityTooLarge", "Each upload PUT must be at most 4 MB.")
        with self._lock:
            expected = len(session.received)
            if start != expected:
                raise _GraphError(
                    416,
                    "InvalidRange",
                    f"The uploaded fragment starts at {start} but the next expected byte is {expected}"
                    " (ranges must be uploaded in order, without gaps or overlaps).",
                )
            session.received += request.body
            done = session.complete
            if done:
                session.attachment_id = session.draft_id + secrets.token_urlsafe(12)
                del self._sessions[session.id]
        if not done:
            reply = {
                "@odata.context": f"{self.url}/api/v2.0/$metadata#Users('{session.mailbox}')"
                f"/Messages('{session.draft_id}')/AttachmentSessions/$entity",
                "ExpirationDateTime": _iso(session.expires_at),
                "nextExpectedRanges": [str(len(session.received))],
            }
            return json_response(200, reply, content_type="application/json")
        location = (
            f"{self.url}/api/v2.0/Users('{session.mailbox}')/Messages('{session.draft_id}')"
            f"/Attachments('{session.attachment_id}')"
        )
        return HTTPResponse(201, headers=[("Location", location)])


def _mime_attachments(message: Message) -> list[Attachment]:
    """The attachments Exchange would list for a MIME message (attachment or named/Content-ID leaf parts)."""
    out: list[Attachment] = []

    def visit(part: Message, root: bool) -> None:
        content_type = part.get_content_type()
        if content_type == "message/rfc822" and not root:
            inner = part.get_payload(0)
            data = inner.as_bytes() if isinstance(inner, Message) else b""
            out.append(Attachment(part.get_filename() or "", content_type, data, False, None))
            return
        if part.is_multipart():
            for sub in part.get_payload():
                if isinstance(sub, Message):
                    visit(sub, root=False)
            return
        if root:
            return
        disposition = part.get_content_disposition()
        filename = part.get_filename()
        content_id = part.get("Content-ID")
        if disposition == "attachment" or filename or (content_id and part.get_content_maintype() != "text"):
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            is_inline = disposition == "inline" or (disposition is None and content_id is not None)
            cid = str(content_id).strip().strip("<>") if content_id else None
            out.append(Attachment(filename or "", content_type, data, is_inline, cid))

    visit(message, root=True)
    return out


def mime_message_of(mail: SentMail) -> EmailMessage | None:
    """The parsed MIME of a SentMail (MIME sends and MIME drafts), for assertions on headers and parts."""
    if mail.mime is None:
        return None
    parsed = BytesParser(policy=default_policy).parsebytes(mail.mime)
    assert isinstance(parsed, EmailMessage)
    return parsed
