"""A fake Exchange Web Services endpoint (on-premises Exchange 2013-2019) for tests.

`FakeEWS` is a real HTTP/1.1 server on 127.0.0.1 (keep-alive) serving `POST /EWS/Exchange.asmx`
with the two operations a mail sender uses: `CreateItem` of one `t:Message` (MimeContent, with
MessageDisposition SendOnly or SendAndSaveCopy) and `GetFolder` (a mailbox's Sent Items).

Authentication as IIS does it, per connection: NTLM (a real three-leg handshake, verified by
pyspnego as the acceptor against the fake's accounts; the connection stays authenticated),
Basic, or Bearer tokens a `FakeIdentityProvider` issued for https://outlook.office365.com
(app-only tokens need the ExchangeImpersonation header and the full_access_as_app role). A
request without acceptable credentials gets 401 with the offered schemes.

Every request is checked as Exchange does: the SOAP envelope and the EWS namespaces,
RequestServerVersion, the operation's shape (the schema order of a Message's elements, one item,
SavedItemFolderId only with SendAndSaveCopy), the MimeContent (base64 of an RFC 5322 message),
the recipients (the request's ToRecipients/CcRecipients/BccRecipients replace the MIME's; without
them the MIME's To, Cc and Bcc), the account's rights on the mailbox and Send As. Refusals are
EWS's own: a response message with ResponseClass="Error" and its ResponseCode, or a SOAP fault
(HTTP 500) for what fails before the operation (ErrorServerBusy with BackOffMilliseconds,
ErrorImpersonateUserDenied, ErrorInvalidServerVersion, ErrorSchemaValidation). `fail_next` scripts
any of them. Every request is in `requests`, every sent message in `sent`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import shutil
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import getaddresses
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from .identity import FakeIdentityProvider, HTTPRequest, HTTPResponse, RecordedRequest, ThreadedFake, _Server

__all__ = ["FakeEWS", "SentItem"]

NS_SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
NS_T = "http://schemas.microsoft.com/exchange/services/2006/types"
NS_M = "http://schemas.microsoft.com/exchange/services/2006/messages"
NS_E = "http://schemas.microsoft.com/exchange/services/2006/errors"
EWS_PATH = "/EWS/Exchange.asmx"
AUTODISCOVER_PATH = "/autodiscover/autodiscover.xml"
NS_AD_REQUEST = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
NS_AD = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
NS_AD_OUTLOOK = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
AUDIENCE = "https://outlook.office365.com"
VERSIONS = frozenset({"Exchange2007", "Exchange2007_SP1", "Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2",
                      "Exchange2013", "Exchange2013_SP1", "Exchange2016", "Exchange2019", "V2017_07_11"})  # fmt: skip
# t:Message's elements in the schema's order (types.xsd: ItemType's sequence, then MessageType's), up
# to what a message being sent may carry.
MESSAGE_ORDER = ("MimeContent", "ItemId", "ParentFolderId", "ItemClass", "Subject", "Sensitivity", "Body",
                 "Attachments", "DateTimeReceived", "Size", "Categories", "Importance", "InReplyTo", "IsSubmitted",
                 "IsDraft", "IsFromMe", "IsResend", "IsUnmodified", "InternetMessageHeaders", "DateTimeSent",
                 "DateTimeCreated", "ResponseObjects", "ReminderDueBy", "ReminderIsSet", "ReminderNextTime",
                 "ReminderMinutesBeforeStart", "DisplayCc", "DisplayTo", "HasAttachments", "ExtendedProperty",
                 "Culture", "Sender", "ToRecipients", "CcRecipients", "BccRecipients", "IsReadReceiptRequested",
                 "IsDeliveryReceiptRequested", "ConversationIndex", "ConversationTopic", "From", "InternetMessageId",
                 "IsRead", "IsResponseRequested", "References", "ReplyTo")  # fmt: skip
TEXT = {
    "ErrorAccessDenied": "Access is denied. Check credentials and try again.",
    "ErrorNonExistentMailbox": "The SMTP address has no mailbox associated with it.",
    "ErrorImpersonateUserDenied": "The account does not have permission to impersonate the requested user.",
    "ErrorInvalidExchangeImpersonationHeaderData": "ExchangeImpersonation SOAP header must be present for this type "
                                                   "of OAuth token.",
    "ErrorInvalidRecipients": "At least one recipient isn't valid.",
    "ErrorMessageSizeExceeded": "The message exceeds the maximum supported size.",
    "ErrorSendAsDenied": "The user account which was used to submit this request does not have the right to send "
                         "mail on behalf of the specified sending account.",
    "ErrorInvalidServerVersion": "The specified server version is invalid.",
    "ErrorServerBusy": "The server cannot service this request right now. Try again later.",
    "ErrorSchemaValidation": "The request failed schema validation.",
    "ErrorMimeContentConversionFailed": "Unable to convert MIME content.",
    "ErrorInvalidRequest": "The request is invalid.",
}  # fmt: skip


@dataclass
class SentItem:
    """A message Exchange accepted: who sent it through which mailbox, to whom, and its MIME."""

    account: str  # who authenticated: DOMAIN\\user, or the token's subject/app
    mailbox: str  # the mailbox it was sent from
    from_: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    mime: bytes
    disposition: str
    saved: bool  # a copy in the mailbox's Sent Items
    version: str | None

    @property
    def recipients(self) -> list[str]:
        return [*self.to, *self.cc, *self.bcc]

    def parsed(self) -> EmailMessage:
        message = BytesParser(policy=default_policy).parsebytes(self.mime)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class _Mailbox:
    address: str
    owner: str | None  # the account whose mailbox it is
    full_access: set[str] = field(default_factory=set)
    send_as: set[str] = field(default_factory=set)  # accounts that may send as this address


@dataclass
class _Failure:
    code: str
    fault: bool
    back_off_ms: int | str | None
    status: int | None  # an HTTP error instead of an EWS answer
    operation: str | None  # only for this operation (CreateItem, GetFolder); None: the next request
    text: str | None = None  # the error's text instead of Exchange's usual one


class _EWSError(Exception):
    def __init__(self, code: str, *, fault: bool = False, back_off_ms: int | str | None = None,
                 text: str | None = None) -> None:  # fmt: skip
        self.code, self.fault, self.back_off_ms, self.text = code, fault, back_off_ms, text


class FakeEWS(ThreadedFake):
    """Configure with `add_account`, `add_mailbox`; choose `schemes` ("NTLM", "Basic", "Bearer");
    break things with `fail_next`; inspect `requests`, `sent`, `ntlm_handshakes`."""

    def __init__(
        self,
        *,
        schemes: Iterable[str] = ("NTLM",),
        idp: FakeIdentityProvider | None = None,
        max_message_size: int = 10 * 1024 * 1024,
        server_version: tuple[int, int, int, int, str] = (15, 2, 1544, 4, "V2017_07_11"),
        tls: tuple[ssl.SSLContext, bytes] | None = None,
        extended_protection: bool = False,
    ) -> None:
        """`tls`: the server's context and its certificate (DER), to serve https."""
        super().__init__()
        self.tls = tls
        # Exchange's Extended Protection: NTLM over TLS must carry the channel binding of this
        # server's certificate (RFC 5929 tls-server-end-point), or the handshake fails.
        self.extended_protection = extended_protection
        self.schemes = tuple(schemes)
        self.idp = idp
        self.max_message_size = max_message_size
        self.server_version = server_version
        self.requests: list[RecordedRequest] = []
        self.sent: list[SentItem] = []
        self.operations: list[tuple[str, str | None]] = []  # (operation, RequestServerVersion)
        self.ntlm_handshakes = 0
        self.impersonators: set[str] = set()  # app ids granted ApplicationImpersonation
        self.autodiscover_redirect: str | None = None  # answer Autodiscover with redirectAddr to this address
        self.autodiscover_ews_url: str | None = None  # the external EwsUrl Autodiscover names (else ews_url)
        # Every answer at the EWS URL to an authenticated request passes through this (a hostile
        # or broken server: another encoding, a DTD, a trickle…).
        self.rewrite: Callable[[HTTPResponse], HTTPResponse] | None = None
        self._accounts: dict[str, str] = {}  # DOMAIN\\user (lower) → password
        self._mailboxes: dict[str, _Mailbox] = {}
        self._failures: list[_Failure] = []
        self._connection = threading.local()  # NTLM: per connection (one thread per connection)
        self._dir = tempfile.mkdtemp(prefix="fake-ews-")
        self._user_file = os.path.join(self._dir, "ntlm_users")
        self._saved_env: str | None = None

    # ---- configuration -------------------------------------------------------------------

    @property
    def ews_url(self) -> str:
        return self.url + EWS_PATH

    @property
    def url(self) -> str:
        url = super().url
        return url.replace("http://", "https://", 1) if self.tls is not None else url

    def add_account(self, name: str, password: str) -> None:
        """An Active Directory account DOMAIN\\user with its password (NTLM and Basic)."""
        domain, _, user = name.partition("\\")
        with self._lock:
            self._accounts[name.lower()] = password
            with open(self._user_file, "a", encoding="utf-8") as f:
                f.write(f"{domain}:{user}:{password}\n")

    def add_mailbox(self, address: str, *, owner: str | None = None, full_access: Iterable[str] = (),
                    send_as: Iterable[str] = ()) -> None:  # fmt: skip
        """A mailbox; `owner` its account (DOMAIN\\user, or a token subject); `full_access` and
        `send_as` other accounts' rights on it."""
        with self._lock:
            self._mailboxes[address.lower()] = _Mailbox(
                address, owner.lower() if owner else None, {a.lower() for a in full_access},
                {a.lower() for a in send_as},
            )  # fmt: skip

    def fail_next(self, code: str, *, fault: bool = False, back_off_ms: int | str | None = None,
                  status: int | None = None, operation: str | None = None,
                  text: str | None = None) -> None:  # fmt: skip
        """The next request (authenticated; of `operation`, if given) gets this EWS error (or
        plain HTTP `status`), with `text` instead of Exchange's usual text if given."""
        with self._lock:
            self._failures.append(_Failure(code, fault, back_off_ms, status, operation, text))

    def start(self) -> Any:
        self._saved_env = os.environ.get("NTLM_USER_FILE")
        open(self._user_file, "a").close()
        os.environ["NTLM_USER_FILE"] = self._user_file  # pyspnego's acceptor reads its accounts there
        if self.tls is None:
            return super().start()
        server = _TLSServer(self, self.tls[0])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeEWS",
                                  daemon=True)  # fmt: skip
        self._server, self._thread = server, thread
        thread.start()
        return self

    def close(self) -> None:
        super().close()
        if self._saved_env is None:
            os.environ.pop("NTLM_USER_FILE", None)
        else:
            os.environ["NTLM_USER_FILE"] = self._saved_env
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- HTTP ----------------------------------------------------------------------------

    def _handle(self, request: HTTPRequest) -> HTTPResponse:
        recorded = RecordedRequest(request.method, request.path, request.query, request.headers, request.body,
                                   request.at)  # fmt: skip
        with self._lock:
            self.requests.append(recorded)
        response = self._route(request)
        if self.rewrite is not None and response.status != 401 and request.path.lower() == EWS_PATH.lower():
            response = self.rewrite(response)
        recorded.status = response.status
        return response

    def _route(self, request: HTTPRequest) -> HTTPResponse:
        if request.path.lower() == AUTODISCOVER_PATH and request.method == "POST":
            who = self._authenticate(request)
            return who if isinstance(who, HTTPResponse) else self._autodiscover(request)
        if request.path.lower() != EWS_PATH.lower():
            return HTTPResponse(404, b"<html><body>404 - File or directory not found.</body></html>",
                                [("Content-Type", "text/html")])  # fmt: skip
        if request.method != "POST":
            return HTTPResponse(405, b"", [("Allow", "POST")])
        who = self._authenticate(request)
        if isinstance(who, HTTPResponse):
            return who
        if not request.headers.get("content-type", "").lower().startswith("text/xml"):
            return HTTPResponse(415, b"Cannot process the message because the content type is not text/xml.")
        with self._lock:
            failure = self._failures[0] if self._failures and self._failures[0].status is not None else None
            if failure is not None:
                self._failures.pop(0)
        if failure is not None and failure.status is not None:
            return HTTPResponse(failure.status, b"", [("Retry-After", "1")] if failure.status in (429, 503) else [])
        try:
            root = ET.fromstring(request.body)
        except ET.ParseError:
            return _fault("ErrorSchemaValidation", "The request is not well-formed XML.", self._version_xml())
        try:
            return self._soap(root, who)
        except _EWSError as e:
            if e.fault:
                return _fault(e.code, e.text or TEXT.get(e.code, e.code), self._version_xml(), e.back_off_ms)
            raise

    # ---- Autodiscover (POX) ----------------------------------------------------------------

    def _autodiscover(self, request: HTTPRequest) -> HTTPResponse:
        try:
            root = ET.fromstring(request.body)
        except ET.ParseError:
            return self._autodiscover_error("600", "Invalid Request")
        address = root.findtext(f"{{{NS_AD_REQUEST}}}Request/{{{NS_AD_REQUEST}}}EMailAddress")
        schema = root.findtext(f"{{{NS_AD_REQUEST}}}Request/{{{NS_AD_REQUEST}}}AcceptableResponseSchema")
        if root.tag != f"{{{NS_AD_REQUEST}}}Autodiscover" or address is None or schema != NS_AD_OUTLOOK:
            return self._autodiscover_error("600", "Invalid Request")
        mailbox = self._mailboxes.get(address.strip().lower())
        if mailbox is None:
            return self._autodiscover_error("500", "The e-mail address cannot be found.")
        if self.autodiscover_redirect is not None:
            account = (f"<AccountType>email</AccountType><Action>redirectAddr</Action>"
                       f"<RedirectAddr>{escape(self.autodiscover_redirect)}</RedirectAddr>")  # fmt: skip
        else:
            account = ("<AccountType>email</AccountType><Action>settings</Action>"
                       f"<Protocol><Type>EXCH</Type><Server>mbx01.contoso.example</Server>"
                       f"<EwsUrl>https://mbx01.contoso.example/EWS/Exchange.asmx</EwsUrl></Protocol>"
                       f"<Protocol><Type>EXPR</Type><Server>mail.contoso.example</Server>"
                       f"<EwsUrl>{escape(self.autodiscover_ews_url or self.ews_url)}</EwsUrl></Protocol>")  # fmt: skip
        user = (f"<User><DisplayName>{escape(mailbox.address)}</DisplayName><AutoDiscoverSMTPAddress>"
                f"{escape(mailbox.address)}</AutoDiscoverSMTPAddress></User>")  # fmt: skip
        body = (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{NS_AD}">'
                f'<Response xmlns="{NS_AD_OUTLOOK}">{user}<Account>{account}</Account></Response>'
                "</Autodiscover>")  # fmt: skip
        return HTTPResponse(200, body.encode(), [("Content-Type", "text/xml; charset=utf-8")])

    def _autodiscover_error(self, code: str, message: str) -> HTTPResponse:
        body = (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{NS_AD}"><Response>'
                f'<Error Time="12:00:00.0000000" Id="2746789155"><ErrorCode>{code}</ErrorCode>'
                f"<Message>{escape(message)}</Message><DebugData /></Error></Response></Autodiscover>")  # fmt: skip
        return HTTPResponse(200, body.encode(), [("Content-Type", "text/xml; charset=utf-8")])

    # ---- authentication (per connection, as IIS) -------------------------------------------

    def _challenge(self, ntlm_token: str | None = None) -> HTTPResponse:
        headers = []
        for scheme in self.schemes:
            if scheme == "NTLM":
                headers.append(("WWW-Authenticate", f"NTLM {ntlm_token}" if ntlm_token else "NTLM"))
                if not ntlm_token:
                    headers.append(("WWW-Authenticate", "Negotiate"))
            elif scheme == "Basic" and not ntlm_token:
                headers.append(("WWW-Authenticate", 'Basic realm="mail.contoso.example"'))
            elif scheme == "Bearer" and not ntlm_token:
                headers.append(
                    (
                        "WWW-Authenticate",
                        'Bearer client_id="00000002-0000-0ff1-ce00-000000000000", '
                        'token_types="app_asserted_user_v1 service_asserted_app_v1"',
                    )
                )
        return HTTPResponse(401, b"", [*headers, ("Content-Type", "text/html")])

    def _authenticate(self, request: HTTPRequest) -> str | tuple[str, Any] | HTTPResponse:
        """The account ("DOMAIN\\user"), a token (("token", IssuedToken)), or the 401 to send."""
        header = request.headers.get("authorization")
        if header is None:
            user = getattr(self._connection, "user", None)
            return user if user is not None else self._challenge()
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "ntlm" and "NTLM" in self.schemes:
            return self._ntlm(value.strip())
        if scheme == "basic" and "Basic" in self.schemes:
            try:
                name, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._challenge()
            with self._lock:
                known = self._accounts.get(name.lower())
            return name.lower() if known is not None and secrets.compare_digest(known, password) else self._challenge()
        if scheme == "bearer" and "Bearer" in self.schemes and self.idp is not None:
            info = self.idp.check(value.strip())
            if info is None or info.audience != AUDIENCE:
                return self._challenge()
            return ("token", info)
        return self._challenge()

    def _ntlm(self, value: str) -> str | HTTPResponse:
        import spnego

        try:
            token = base64.b64decode(value, validate=True)
            kind = struct.unpack("<I", token[8:12])[0] if token[:8] == b"NTLMSSP\0" else 0
        except (binascii.Error, struct.error):
            kind = 0
        c = self._connection
        c.user = None
        if kind == 1:  # negotiate: a new handshake on this connection
            c.context = spnego.server(protocol="ntlm", channel_bindings=self._bindings())
            challenge = c.context.step(token)
            return self._challenge(base64.b64encode(challenge or b"").decode())
        context = getattr(c, "context", None)
        c.context = None
        if kind != 3 or context is None:
            return self._challenge()
        try:
            context.step(token)
        except Exception:  # a wrong password, or a message that is not NTLM
            return self._challenge()
        if not context.complete:
            return self._challenge()
        with self._lock:
            self.ntlm_handshakes += 1
        c.user = str(context.client_principal).lower()
        return c.user

    def _bindings(self) -> Any:
        if not self.extended_protection or self.tls is None:
            return None
        from spnego.channel_bindings import GssChannelBindings

        digest = hashlib.sha256(self.tls[1]).digest()  # the test certificates sign with SHA-256
        return GssChannelBindings(application_data=b"tls-server-end-point:" + digest)

    # ---- SOAP ----------------------------------------------------------------------------

    def _version_xml(self) -> str:
        major, minor, build, revision, schema = self.server_version
        return (f'<h:ServerVersionInfo MajorVersion="{major}" MinorVersion="{minor}" MajorBuildNumber="{build}" '
                f'MinorBuildNumber="{revision}" Version="{schema}" xmlns:h="{NS_T}" xmlns="{NS_T}"/>')  # fmt: skip

    def _soap(self, root: ET.Element, who: str | tuple[str, Any]) -> HTTPResponse:
        if root.tag != f"{{{NS_SOAP}}}Envelope":
            raise _EWSError("ErrorSchemaValidation", fault=True)
        header, body = root.find(f"{{{NS_SOAP}}}Header"), root.find(f"{{{NS_SOAP}}}Body")
        if body is None or len(body) != 1:
            raise _EWSError("ErrorSchemaValidation", fault=True)
        version_element = header.find(f"{{{NS_T}}}RequestServerVersion") if header is not None else None
        version = version_element.get("Version") if version_element is not None else None
        if version is not None and version not in VERSIONS:
            raise _EWSError("ErrorInvalidServerVersion", fault=True)
        operation = body[0]
        name = operation.tag.rpartition("}")[2]
        with self._lock:
            self.operations.append((name, version))
            failure = next((f for f in self._failures if f.operation in (None, name)), None)
            if failure is not None:
                self._failures.remove(failure)
        account, mailbox_of_account = self._acting(who, header)
        if failure is not None:
            if failure.fault:
                raise _EWSError(failure.code, fault=True, back_off_ms=failure.back_off_ms, text=failure.text)
            return self._response(name, failure.code, failure.back_off_ms, text=failure.text)
        if operation.tag == f"{{{NS_M}}}CreateItem":
            return self._create_item(operation, account, mailbox_of_account, version)
        if operation.tag == f"{{{NS_M}}}GetFolder":
            return self._get_folder(operation, account, mailbox_of_account)
        raise _EWSError("ErrorSchemaValidation", fault=True)

    def _acting(self, who: str | tuple[str, Any], header: ET.Element | None) -> tuple[str, str | None]:
        """(account, the mailbox it acts as by default) — impersonation for app-only tokens."""
        impersonated = None
        if header is not None:
            sid = header.find(f"{{{NS_T}}}ExchangeImpersonation/{{{NS_T}}}ConnectingSID")
            if sid is not None:
                impersonated = (sid.findtext(f"{{{NS_T}}}PrimarySmtpAddress") or "").strip().lower()
        if isinstance(who, tuple):
            info = who[1]
            if info.subject is None:  # app-only
                if impersonated is None:
                    raise _EWSError("ErrorInvalidExchangeImpersonationHeaderData", fault=True)
                if "full_access_as_app" not in info.roles and info.client_id not in self.impersonators:
                    raise _EWSError("ErrorImpersonateUserDenied", fault=True)
                if impersonated not in self._mailboxes:
                    raise _EWSError("ErrorNonExistentMailbox", fault=True)
                return f"app:{info.client_id}", impersonated
            if "EWS.AccessAsUser.All" not in info.scopes:
                raise _EWSError("ErrorAccessDenied", fault=True)
            who = str(info.subject).lower()
        if impersonated is not None:
            raise _EWSError("ErrorImpersonateUserDenied", fault=True)
        own = next((m.address.lower() for m in self._mailboxes.values() if m.owner == who), None)
        return str(who), own

    def _may_use(self, account: str, mailbox: _Mailbox, impersonating: str | None) -> bool:
        return (account.startswith("app:") and impersonating == mailbox.address.lower()) or mailbox.owner == account \
            or account in mailbox.full_access  # fmt: skip

    def _folder_mailbox(self, folder: ET.Element | None, account: str, own: str | None) -> _Mailbox:
        """The mailbox a DistinguishedFolderId names (its Mailbox, else the account's own)."""
        address = own
        if folder is not None:
            named = folder.findtext(f"{{{NS_T}}}Mailbox/{{{NS_T}}}EmailAddress")
            if named is not None:
                address = named.strip().lower()
        mailbox = self._mailboxes.get(address or "")
        if mailbox is None:
            raise _Answered("ErrorNonExistentMailbox")
        if not self._may_use(account, mailbox, own if account.startswith("app:") else None):
            raise _Answered("ErrorAccessDenied")
        return mailbox

    def _get_folder(self, op: ET.Element, account: str, own: str | None) -> HTTPResponse:
        name = "GetFolder"
        try:
            ids = op.find(f"{{{NS_M}}}FolderIds")
            if op.find(f"{{{NS_M}}}FolderShape/{{{NS_T}}}BaseShape") is None or ids is None or len(ids) != 1:
                raise _EWSError("ErrorSchemaValidation", fault=True)
            folder = ids[0]
            if folder.tag != f"{{{NS_T}}}DistinguishedFolderId" or folder.get("Id") != "sentitems":
                raise _Answered("ErrorInvalidRequest")
            mailbox = self._folder_mailbox(folder, account, own)
        except _Answered as a:
            return self._response(name, a.code, a.back_off_ms)
        folder_id = base64.b64encode(f"sentitems:{mailbox.address}".encode()).decode()
        return self._response(name, None, None, f'<m:Folders><t:Folder><t:FolderId Id="{folder_id}" '
                                                 f'ChangeKey="AQAAAA=="/></t:Folder></m:Folders>')  # fmt: skip

    def _create_item(self, op: ET.Element, account: str, own: str | None, version: str | None) -> HTTPResponse:
        name = "CreateItem"
        try:
            disposition = op.get("MessageDisposition")
            if disposition not in ("SaveOnly", "SendOnly", "SendAndSaveCopy"):
                raise _Answered("ErrorInvalidRequest")
            children = list(op)
            saved = op.find(f"{{{NS_M}}}SavedItemFolderId")
            items = op.find(f"{{{NS_M}}}Items")
            if [c.tag for c in children] != [t for t in (f"{{{NS_M}}}SavedItemFolderId", f"{{{NS_M}}}Items")
                                             if op.find(t) is not None] or items is None:  # fmt: skip
                raise _EWSError("ErrorSchemaValidation", fault=True)
            if saved is not None and disposition != "SendAndSaveCopy":
                raise _Answered("ErrorInvalidRequest")  # Exchange: a folder to save in only when saving
            if len(items) != 1 or items[0].tag != f"{{{NS_T}}}Message":
                raise _EWSError("ErrorSchemaValidation", fault=True)
            message = items[0]
            names = [c.tag.rpartition("}")[2] for c in message if c.tag.startswith(f"{{{NS_T}}}")]
            if len(names) != len(message) or any(n not in MESSAGE_ORDER for n in names) or \
                    [MESSAGE_ORDER.index(n) for n in names] != sorted(MESSAGE_ORDER.index(n) for n in names) or \
                    len(set(names)) != len(names):  # fmt: skip
                raise _EWSError("ErrorSchemaValidation", fault=True)
            folder = saved.find(f"{{{NS_T}}}DistinguishedFolderId") if saved is not None else None
            if saved is not None and (folder is None or folder.get("Id") != "sentitems"):
                raise _Answered("ErrorInvalidRequest")
            mailbox = self._folder_mailbox(folder, account, own)
            mime_text = message.findtext(f"{{{NS_T}}}MimeContent")
            if mime_text is None:
                raise _Answered("ErrorInvalidRequest")  # this fake takes messages as MIME only
            try:
                mime = base64.b64decode(mime_text.strip(), validate=True)
            except binascii.Error:
                raise _Answered("ErrorMimeContentConversionFailed") from None
            if len(mime) > self.max_message_size:
                raise _Answered("ErrorMessageSizeExceeded")
            parsed = BytesParser(policy=default_policy).parsebytes(mime)
            if parsed.defects or b"\r\n" not in mime or parsed["Date"] is None or parsed["Message-ID"] is None:
                raise _Answered("ErrorMimeContentConversionFailed")
            lists = {}
            for key, header in (("ToRecipients", "To"), ("CcRecipients", "Cc"), ("BccRecipients", "Bcc")):
                given = message.find(f"{{{NS_T}}}{key}")
                if given is not None:  # the request's recipients replace the MIME's
                    lists[key] = [(m.findtext(f"{{{NS_T}}}EmailAddress") or "").strip() for m in given]
                else:
                    lists[key] = [a for _, a in getaddresses([str(v) for v in parsed.get_all(header) or []]) if a]
            everyone = [a for v in lists.values() for a in v]
            if not everyone or any(not _valid(a) for a in everyone):
                raise _Answered("ErrorInvalidRecipients")
            from_element = message.findtext(f"{{{NS_T}}}From/{{{NS_T}}}Mailbox/{{{NS_T}}}EmailAddress")
            from_mime = [a for _, a in getaddresses([str(parsed["From"] or "")]) if a]
            sender = (from_element or (from_mime[0] if from_mime else mailbox.address)).strip().lower()
            if sender != mailbox.address.lower():
                other = self._mailboxes.get(sender)
                if account not in mailbox.send_as and (other is None or account not in other.send_as):
                    raise _Answered("ErrorSendAsDenied")
        except _Answered as a:
            return self._response(name, a.code, a.back_off_ms)
        item = SentItem(account, mailbox.address, sender, lists["ToRecipients"], lists["CcRecipients"],
                        lists["BccRecipients"], mime, disposition, disposition == "SendAndSaveCopy",
                        version)  # fmt: skip
        with self._lock:
            self.sent.append(item)
        return self._response(name, None, None, "<m:Items/>")

    def _response(self, name: str, code: str | None, back_off_ms: int | str | None, content: str = "", *,
                  text: str | None = None) -> HTTPResponse:  # fmt: skip
        if code is None:
            message = (f'<m:{name}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
                       f"{content}</m:{name}ResponseMessage>")  # fmt: skip
        else:
            extra = (f'<m:MessageXml><t:Value Name="BackOffMilliseconds">{back_off_ms}</t:Value></m:MessageXml>'
                     if back_off_ms is not None else "")  # fmt: skip
            message = (f'<m:{name}ResponseMessage ResponseClass="Error"><m:MessageText>'
                       f"{escape(text or TEXT.get(code, code))}</m:MessageText><m:ResponseCode>{code}</m:ResponseCode>"
                       f"<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>{extra}"
                       f"{'<m:Items/>' if name == 'CreateItem' else ''}</m:{name}ResponseMessage>")  # fmt: skip
        body = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}"><s:Header>'
                f'{self._version_xml()}</s:Header><s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                f'xmlns:xsd="http://www.w3.org/2001/XMLSchema"><m:{name}Response xmlns:m="{NS_M}" xmlns:t="{NS_T}">'
                f"<m:ResponseMessages>{message}</m:ResponseMessages></m:{name}Response></s:Body>"
                "</s:Envelope>")  # fmt: skip
        return HTTPResponse(200, body.encode(), [("Content-Type", "text/xml; charset=utf-8")])


class _TLSServer(_Server):
    """The fake's HTTP server over TLS: each accepted connection is wrapped before it is served."""

    def __init__(self, fake: ThreadedFake, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(fake)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        return self._context.wrap_socket(sock, server_side=True), address


class _Answered(Exception):
    """An error the operation answers in its response message (HTTP 200, ResponseClass Error)."""

    def __init__(self, code: str, back_off_ms: int | str | None = None) -> None:
        self.code, self.back_off_ms = code, back_off_ms


def _valid(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and "." in domain and not any(c.isspace() for c in address))


def _fault(code: str, text: str, version_xml: str, back_off_ms: int | str | None = None) -> HTTPResponse:
    extra = (f'<t:MessageXml xmlns:t="{NS_T}"><t:Value Name="BackOffMilliseconds">{back_off_ms}</t:Value>'
             "</t:MessageXml>" if back_off_ms is not None else "")  # fmt: skip
    body = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}"><s:Header>{version_xml}'
            f'</s:Header><s:Body><s:Fault><faultcode xmlns:a="{NS_T}">a:{code}</faultcode>'
            f'<faultstring xml:lang="en-US">{escape(text)}</faultstring><detail>'
            f'<e:ResponseCode xmlns:e="{NS_E}">{code}</e:ResponseCode><e:Message xmlns:e="{NS_E}">{escape(text)}'
            f"</e:Message>{extra}</detail></s:Fault></s:Body></s:Envelope>")  # fmt: skip
    return HTTPResponse(500, body.encode(), [("Content-Type", "text/xml; charset=utf-8")])
