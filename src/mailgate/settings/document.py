"""The mail server document: one complete way of sending, as DESIGN.md defines it.

The same document is what `mailgate send --server FILE` reads, what the API will accept and what
the settings store keeps. Field names are a contract: add fields, never rename them. Parsing is
strict (no silent "587" → 587, no unknown fields) and every problem names its field.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import SettingsError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..message import Address, Message

Security = Literal["none", "starttls", "starttls-required", "tls"]
IMPLICIT_TLS_PORT = 465
MAX_CA_PEM = 256 * 1024  # characters of PEM: a bundle of a few hundred certificates
MAX_SECRET = 16 * 1024  # characters: Entra ID's refresh tokens run to a few KB
# A host name (letters of any script, digits, '-', '_', dots) or an IP address.
_HOST = re.compile(r"[^\W_](?:[\w-]{0,62})(?:\.[\w-]{1,63})*\.?|[0-9A-Fa-f:.]+")
Secret = Annotated[SecretStr, Field(max_length=MAX_SECRET)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _one_clean_line(cls, value: Any, info: ValidationInfo) -> Any:
        """No setting holds a control character (NUL, line breaks, escapes) or half a UTF-16
        surrogate pair: either would break the protocol line, the log or the database it reaches.
        PEM text (ca_certificate) is checked as PEM instead."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and info.field_name != "ca_certificate":
            from ..message import forbidden_character

            if "\r" in text or "\n" in text:
                raise ValueError("line breaks are not allowed")
            problem = forbidden_character(text)
            if problem is not None:
                raise ValueError(problem.replace("no mail may carry", "no setting may hold"))
        return value


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    from ..message import Address

    try:
        return Address(value).address
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid address: {e}") from None


class SMTPSettings(_Section):
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # 465 for tls, else 587
    security: Security = "starttls-required"
    verify_certificate: bool = True
    # A private CA to trust instead of the public ones: its certificates as PEM text (what a
    # tenant gives), or a file on mailgate's machine (the global server only: a path is the
    # operator's to choose, not a tenant's).
    ca_certificate: Annotated[str, Field(min_length=1, max_length=MAX_CA_PEM)] | None = None
    ca_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    helo_name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")] | None = None
    # Raw UTF-8 headers (RFC 6532) when the server offers SMTPUTF8. Off by default: the next hop
    # after the submission server may not take SMTPUTF8 and bounce; encoded words always work.
    utf8_headers: bool = False

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return IMPLICIT_TLS_PORT if self.security == "tls" else 587

    @field_validator("host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not _HOST.fullmatch(value) or not _dns_name_or_ip(value):  # "a..b" fits _HOST's address part
            raise ValueError(f"{value!r} is not a host name or an IP address")
        return value

    @field_validator("ca_certificate")
    @classmethod
    def _pem_certificates(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from cryptography.x509 import load_pem_x509_certificates

        try:
            load_pem_x509_certificates(value.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError(
                "is not PEM certificates: give the CA's certificate as text, from -----BEGIN CERTIFICATE----- "
                "to -----END CERTIFICATE-----"
            ) from None
        return value

    @model_validator(mode="after")
    def _port_matches_security(self) -> SMTPSettings:
        if self.port == IMPLICIT_TLS_PORT and self.security in ("starttls", "starttls-required"):
            raise ValueError(
                "port 465 speaks implicit TLS, not STARTTLS: set security to tls "
                f"(or use port 587 with {self.security})"
            )
        return self


class NoAuth(_Section):
    method: Literal["none"]


class PasswordAuthSettings(_Section):
    method: Literal["password"]
    username: Annotated[str, Field(min_length=1, max_length=512)]
    password: Secret | None = None  # may come from --password-stdin or the environment
    mechanism: Literal["auto", "PLAIN", "LOGIN", "CRAM-MD5"] = "auto"


def _dns_name_or_ip(host: str) -> bool:
    """Whether `host` (a URL's host) can be looked up: an IP address, or a name whose IDNA form
    has labels of 1 to 63 characters (the resolver raises UnicodeError, not OSError, for others:
    "a..b", "．．", a 64-character label, a label of only a soft hyphen)."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        return len(host.encode("idna")) <= 253
    except UnicodeError:
        return False


def _web_url(value: str | None) -> str | None:
    """An https URL; plain http only to a loopback address (a local test or proxy): a client
    secret or a token never crosses a network unencrypted. No user name or password in it
    (user:password@, user@): httpx would send them as Basic credentials of their own, in place
    of the Authorization mailgate sets, to wherever the URL points. A port is 0 to 65535."""
    if value is None:
        return None
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        host = url.hostname or ""
    except ValueError:
        raise ValueError(f"{_without_userinfo(value)!r} is not a URL") from None
    if "@" in url.netloc:  # not echoed: it may be a password
        raise ValueError(
            "give the URL without a user name or password (user:password@ or user@): mailgate sends the "
            "credentials of the document's own secret fields, never ones written into a URL"
        )
    try:
        url.port  # noqa: B018 -- raises ValueError when the port is not a number from 0 to 65535
    except ValueError:
        raise ValueError(f"{value!r}: its port is not a number from 0 to 65535") from None
    if url.scheme not in ("https", "http") or not host or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    if not _dns_name_or_ip(host):
        raise ValueError(f"{value!r}: its host is not a valid domain name or IP address")
    if url.scheme == "http" and host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"{value!r}: use https (plain http only to 127.0.0.1, ::1 or localhost)")
    if url.query or url.fragment:
        raise ValueError(f"{value!r}: give the URL without a query or fragment")
    return value.rstrip("/") if url.path in ("", "/") else value


def _without_userinfo(value: str) -> str:
    """`value` with what may be a user name and password (between "//" and the last "@" before
    the path) left out, to quote it in a problem."""
    return re.sub(r"(//)[^/?#]*@", r"\1…@", value, count=1)


WebURL = Annotated[str, Field(min_length=1, max_length=2000)]
_ID = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\s/?#]+$")]


class TokenSourceSettings(_Section):
    """Where XOAUTH2 access tokens come from (see `mailgate.oauth`).

    `provider` only fills defaults: microsoft builds the URLs from `authority` and `directory_id`,
    google knows its endpoints; an explicit `token_url`, `authorize_url` or `scope` always wins."""

    grant: Literal["client_credentials", "refresh_token", "delegated"]
    provider: Literal["microsoft", "google", "generic"] = "generic"
    authority: WebURL | None = None  # microsoft: https://login.microsoftonline.com (sovereign clouds differ)
    directory_id: _ID | None = None
    client_id: _ID | None = None
    client_secret: Secret | None = None
    token_url: WebURL | None = None
    scope: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    refresh_token: Secret | None = None
    client_auth: Literal["form", "basic"] = "form"
    authorize_url: WebURL | None = None  # delegated: where the admin grants consent

    _urls = field_validator("authority", "token_url", "authorize_url")(classmethod(lambda cls, v: _web_url(v)))

    @model_validator(mode="after")
    def _complete(self) -> TokenSourceSettings:
        problems = []
        if self.client_id is None:
            problems.append("client_id is required")
        if (
            self.provider == "microsoft"
            and self.directory_id is None
            and (self.token_url is None or (self.grant == "delegated" and self.authorize_url is None))
        ):
            problems.append("directory_id (the Entra tenant id) is required for the microsoft provider")
        if self.provider == "generic":
            if self.token_url is None:
                problems.append("token_url is required for the generic provider")
            if self.grant == "delegated" and self.authorize_url is None:
                problems.append("authorize_url is required for a delegated grant with the generic provider")
        if self.provider != "microsoft" and (self.authority is not None or self.directory_id is not None):
            problems.append("authority and directory_id belong to the microsoft provider")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OAuth2AuthSettings(_Section):
    method: Literal["oauth2"]
    username: Annotated[str, Field(min_length=1, max_length=512)]
    token: TokenSourceSettings


AuthSettings = Annotated[NoAuth | PasswordAuthSettings | OAuth2AuthSettings, Field(discriminator="method")]


class GraphSettings(_Section):
    authority: WebURL = "https://login.microsoftonline.com"
    endpoint: WebURL = "https://graph.microsoft.com"
    directory_id: _ID
    client_id: _ID
    client_secret: Secret | None = None
    mailbox: Annotated[str, Field(min_length=1, max_length=320)] | None = None  # delegated: from the consent
    allow_delegate: bool = False
    # With allow_delegate, how a message from another address goes out: as that address
    # ("send as": `from` only) or on its behalf (`from`, and `sender` = the mailbox).
    delegate_as: Literal["send_as", "on_behalf"] = "send_as"
    save_to_sent_items: bool = True
    large_attachments: bool = False
    # How mailgate gets its Graph tokens: as the application (client credentials, Mail.Send
    # application permission), or delegated by a mailbox's user who signs in once (consent:
    # authorization code + PKCE; the refresh token is stored in `refresh_token`). With delegated,
    # the consenting mailbox becomes `mailbox` and the sender address.
    auth: Literal["client_credentials", "delegated"] = "client_credentials"
    refresh_token: Secret | None = None

    _urls = field_validator("authority", "endpoint")(classmethod(lambda cls, v: _web_url(v)))

    @field_validator("mailbox")
    @classmethod
    def _valid_mailbox(cls, value: str | None) -> str | None:
        return _address(value)

    @model_validator(mode="after")
    def _mailbox_known(self) -> GraphSettings:
        if self.mailbox is None and self.auth != "delegated":
            raise ValueError("mailbox is required (only a delegated graph server learns it from the consent)")
        return self


EWSVersion = Literal["auto", "Exchange2013", "Exchange2013_SP1", "Exchange2016", "Exchange2019"]


class EWSSettings(_Section):
    """Exchange Web Services on an on-premises Exchange Server (Exchange Online retires EWS on
    1 April 2027: use kind graph there). Credentials are the document's `auth` section: password
    (NTLM or Basic, `password_scheme`) or oauth2 (a token source)."""

    url: WebURL | None = None  # https://mail.example.com/EWS/Exchange.asmx
    autodiscover: bool = False  # find the URL from the mailbox's domain instead
    exchange_version: EWSVersion = "auto"
    password_scheme: Literal["ntlm", "basic"] = "ntlm"
    mailbox: Annotated[str, Field(min_length=1, max_length=320)]
    # Send as another address than the mailbox (the mailbox needs Send As / Send on Behalf).
    allow_delegate: bool = False
    save_to_sent_items: bool = True  # CreateItem with SendAndSaveCopy, else SendOnly

    _urls = field_validator("url")(classmethod(lambda cls, v: _web_url(v)))

    @field_validator("mailbox")
    @classmethod
    def _valid_mailbox(cls, value: str) -> str | None:
        return _address(value)

    @model_validator(mode="after")
    def _url_or_autodiscover(self) -> EWSSettings:
        if self.url is None and not self.autodiscover:
            raise ValueError("give the EWS url (https://…/EWS/Exchange.asmx) or turn autodiscover on")
        return self


# Bounds that keep one tenant's settings from holding a worker's senders, memory or the
# database: a wait is at most RFC 5321's longest (10 minutes, for the final dot's reply).


class ConnectionSettings(_Section):
    pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    # 0: check every connection before it is reused (Genesys' setting); a NOOP costs a round trip.
    check_idle_after: Annotated[float, Field(ge=0, le=3600)] = 30.0
    max_idle: Annotated[float, Field(gt=0, le=3600)] = 300.0
    connect_timeout: Annotated[float, Field(gt=0, le=120)] = 30.0
    protocol_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    token_expiry_margin: Annotated[float, Field(gt=0, le=3000)] = 300.0
    max_messages_per_connection: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class QuotaSettings(_Section):
    messages_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    recipients_per_day: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None
    # One row per slot in the database (outbox/quota.py): Exchange Online allows 3 per mailbox.
    max_concurrent_connections: Annotated[int, Field(ge=1, le=1000)] | None = None


class DebugSettings(_Section):
    protocol_log: bool = False


FromPolicy = Literal["fixed", "domains", "any"]
MAX_FROM_DOMAINS = 100
_Domain = Annotated[str, Field(min_length=1, max_length=253)]


class MailServer(_Section):
    kind: Literal["smtp", "graph", "ews"] = "smtp"
    enabled: bool = True
    # Required, except for a delegated graph server, whose consenting mailbox becomes the sender.
    from_address: str | None = None
    from_name: Annotated[str, Field(max_length=256)] = ""
    reply_to: str | None = None
    envelope_from: str | None = None
    # Which From a message may carry through this server: `fixed` (always from_address; the
    # message's own From becomes its Reply-To), `domains` (From in one of `from_domains`), `any`.
    # None: the scope's default, fixed for the global server and any for a tenant's own.
    from_policy: FromPolicy | None = None
    from_domains: Annotated[list[_Domain], Field(max_length=MAX_FROM_DOMAINS)] = []
    smtp: SMTPSettings | None = None
    auth: AuthSettings = NoAuth(method="none")
    graph: GraphSettings | None = None
    ews: EWSSettings | None = None
    connection: ConnectionSettings = ConnectionSettings()
    quota: QuotaSettings = QuotaSettings()
    debug: DebugSettings = DebugSettings()

    @field_validator("from_address", "reply_to", "envelope_from")
    @classmethod
    def _valid_address(cls, value: str | None) -> str | None:
        return _address(value)

    @field_validator("from_name")
    @classmethod
    def _no_line_breaks(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("line breaks are not allowed in the sender name")
        return value

    @field_validator("from_domains")
    @classmethod
    def _valid_domains(cls, value: list[str]) -> list[str]:
        domains = []
        for domain in value:
            name = domain.strip().rstrip(".").lower()
            if not _HOST.fullmatch(name) or "." not in name:
                raise ValueError(f"{domain!r} is not a domain name")
            domains.append(name)
        return domains

    @property
    def known_sender(self) -> str | None:
        """The server's own sender address: from_address, or the mailbox a delegated graph
        server was connected to; None while a delegated graph server has none yet."""
        return self.from_address or (self.graph.mailbox if self.graph is not None else None)

    @property
    def sender_address(self) -> str:
        """`known_sender`, or SettingsError when there is none yet."""
        address = self.known_sender
        if address is None:
            raise SettingsError([("from_address", "no sender address yet: connect the mailbox (consent) first")])
        return address

    def effective_from_policy(self, *, is_global: bool) -> FromPolicy:
        """`from_policy`, or when it is None the scope's default: fixed for the global server (every
        tenant sends through it: none may send as an address that is not the operator's), any for
        a tenant's own server (the tenant's own mailbox and its own business)."""
        if self.from_policy is not None:
            return self.from_policy
        return "fixed" if is_global else "any"

    def from_refusal(self, message: Message, *, policy: FromPolicy) -> str | None:
        """Why `message` may not go with its own From through this server under `policy`, or None.
        Only `domains` refuses: a From outside `from_domains` that is not the server's own sender
        address. `fixed` never refuses (`fill_in` rewrites the From); `any` allows every From."""
        own = message.from_
        if policy != "domains" or own is None or self._is_sender(own.address):
            return None
        domain = own.address.rpartition("@")[2]
        if domain in self.from_domains or own.ascii_domain.lower() in self.from_domains:
            return None
        return (
            f"{own.address} is not in the domains this mail server sends from ({', '.join(self.from_domains)}): "
            "use an address in one of them, or leave from out to send from the server's sender address"
        )

    def fill_in(self, message: Message, *, policy: FromPolicy | None = None) -> Message:
        """`message` as it goes through this server under `policy` (None: this document's
        from_policy, else fixed, the stricter, when the scope is not known).

        What the message leaves out (From, Reply-To) comes from the server. Under `fixed`, and
        under `domains` for a From it does not allow (the settings changed after the submit), the
        From becomes the server's sender address and name, and the message's own From its Reply-To
        — unless the message has a Reply-To of its own, which wins: its sender said where replies
        go. A From that is the sender address already stays as it is, display name included.
        A rewritten From takes the Message-ID mailgate made along into its domain (`in_domain`:
        DMARC and spam filters compare the two); a Message-ID the sender gave stays."""
        from_, reply_to = _sender_defaults(self.sender_address, self.from_name, self.reply_to)
        own = message.from_
        if own is not None and self.rewrites_from(message, policy=policy):
            message = copy.copy(message.in_domain(from_.ascii_domain))  # a Message never changes: a new one
            message.from_, message.reply_to = from_, list(message.reply_to) or [own]
        return message.with_defaults(from_=from_, reply_to=reply_to)

    def rewrites_from(self, message: Message, *, policy: FromPolicy | None = None) -> bool:
        """Whether `fill_in` sends `message` From this server's sender address instead of its own."""
        own = message.from_
        policy = policy or self.from_policy or "fixed"
        rewrite = policy == "fixed" or self.from_refusal(message, policy=policy) is not None
        return own is not None and rewrite and not self._is_sender(own.address)

    def _is_sender(self, address: str) -> bool:
        """Whether `address` is this server's sender address (case aside; False while a delegated
        graph server has none yet)."""
        sender = self.known_sender
        return sender is not None and address.lower() == sender.lower()

    @model_validator(mode="after")
    def _sections_match_kind(self) -> MailServer:
        sections = {"smtp": self.smtp, "graph": self.graph, "ews": self.ews}
        if sections[self.kind] is None:
            need = "an smtp section with at least a host" if self.kind == "smtp" else f"a {self.kind} section"
            raise ValueError(f"a mail server of kind {self.kind} needs {need}")
        for kind, section in sections.items():
            if kind != self.kind and section is not None:
                raise ValueError(f"{kind} settings belong to kind {kind}; this server is kind {self.kind}")
        if self.kind == "graph" and not isinstance(self.auth, NoAuth):
            raise ValueError("auth settings belong to kind smtp (and ews); this server is kind graph")
        if self.kind == "ews" and isinstance(self.auth, NoAuth):
            raise ValueError("a mail server of kind ews needs an auth section: password (NTLM or Basic) or oauth2")
        if self.from_address is None and not (self.graph is not None and self.graph.auth == "delegated"):
            raise ValueError("from_address is required")
        mailbox = self.graph or self.ews
        if (
            mailbox is not None
            and mailbox.mailbox is not None
            and self.from_address is not None
            and self.from_address.lower() != mailbox.mailbox.lower()
            and not mailbox.allow_delegate
        ):
            raise ValueError(
                f"from_address {self.from_address} is not the {self.kind} mailbox {mailbox.mailbox}: set "
                f"{self.kind}.allow_delegate (and grant the mailbox Send As or Send on Behalf), "
                "or send from the mailbox"
            )
        if self.from_policy == "domains" and not self.from_domains:
            raise ValueError("from_policy domains needs from_domains: the domains a message's From may use")
        return self


@functools.lru_cache(maxsize=1024)
def _sender_defaults(from_address: str, from_name: str, reply_to: str | None) -> tuple[Address, tuple[Address, ...]]:
    """A server's From and Reply-To mailboxes, made once (the worker fills in every message)."""
    from ..message import Address

    return Address(from_address, from_name), (Address(reply_to),) if reply_to else ()


def parse_server(doc: object) -> MailServer:
    """A `MailServer` from a parsed JSON document, or SettingsError naming every bad field.

    {"set": …} markers in secret fields (see `without_secret_markers`) are understood."""
    try:
        return MailServer.model_validate(without_secret_markers(doc))
    except ValidationError as e:
        raise SettingsError([_problem(err) for err in e.errors()]) from None


def load_server(path: str | Path) -> MailServer:
    """Read and parse a mail server document from a JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError([("", f"cannot read {path}: {e.strerror}")]) from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SettingsError([("", f"{path} is not valid JSON: {e}")]) from None
    return parse_server(doc)


def _problem(err: Any) -> tuple[str, str]:
    # pydantic puts the auth method (the union's tag) into the path: ("auth", "password",
    # "password") means auth.password. Drop the tag, and only the tag.
    loc = [str(p) for p in err["loc"]]
    if len(loc) > 1 and loc[0] == "auth" and loc[1] in ("none", "password", "oauth2"):
        del loc[1]
    field = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return field, "unknown field"
    if kind == "missing":
        return field, "is required"
    if kind == "union_tag_invalid":
        return field, "method must be one of none, password, oauth2"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return field, msg


# ---- secrets in the document ------------------------------------------------------------------

# Every field that holds a secret, by its path. Reading a server shows each as {"set": true|false};
# a write may send that marker back to mean "keep" (true) or "remove" (false).
SECRET_FIELDS = (
    "auth.password", "auth.token.client_secret", "auth.token.refresh_token", "graph.client_secret",
    "graph.refresh_token",
)  # fmt: skip

# Where a stored secret would be sent. When any of these changes, a stored secret is not carried
# over: it must be given again, so it can never reach a destination it was not saved for.
DESTINATION_FIELDS = (
    "kind", "smtp.host", "smtp.port", "smtp.security", "smtp.verify_certificate", "smtp.ca_certificate",
    "smtp.ca_file", "auth.method",
    "auth.token.grant", "auth.token.provider", "auth.token.token_url", "auth.token.authority",
    "auth.token.directory_id", "auth.token.client_id", "auth.token.authorize_url",
    "graph.authority", "graph.directory_id", "graph.client_id", "graph.endpoint", "graph.auth",
    "ews.url", "ews.autodiscover", "ews.password_scheme",
)  # fmt: skip


def secret_fields(server: MailServer) -> tuple[str, ...]:
    """The secret fields this document's kind and auth method have."""
    if server.graph is not None:
        if server.graph.auth == "delegated":
            return ("graph.client_secret", "graph.refresh_token")
        return ("graph.client_secret",)
    if isinstance(server.auth, PasswordAuthSettings):
        return ("auth.password",)
    if isinstance(server.auth, OAuth2AuthSettings):
        return ("auth.token.client_secret", "auth.token.refresh_token")
    return ()


def required_secrets(server: MailServer) -> tuple[str, ...]:
    """The secrets a saved server can't send without. A delegated grant gets its refresh token
    from the consent flow, after the save."""
    if server.graph is not None:
        return ("graph.client_secret",)
    auth = server.auth
    if isinstance(auth, PasswordAuthSettings):
        return ("auth.password",)
    if isinstance(auth, OAuth2AuthSettings):
        if auth.token.grant == "client_credentials":
            return ("auth.token.client_secret",)
        if auth.token.grant == "refresh_token":
            return ("auth.token.refresh_token",)
    return ()


def lookup(server: MailServer, path: str) -> tuple[BaseModel | None, str]:
    """(the model holding the field at `path`, the field's name); the model is None when the
    document has no such section."""
    *parents, name = path.split(".")
    node: BaseModel = server
    for part in parents:
        child = getattr(node, part, None)
        if not isinstance(child, BaseModel):
            return None, name
        node = child
    return node, name


def secret_value(server: MailServer, path: str) -> str | None:
    model, name = lookup(server, path)
    value = getattr(model, name, None) if model is not None else None
    return value.get_secret_value() if isinstance(value, SecretStr) else None


def secret_cleared(server: MailServer, path: str) -> bool:
    """True when the document says null (or {"set": false}) for this secret: remove it."""
    model, name = lookup(server, path)
    return model is not None and name in model.model_fields_set and getattr(model, name) is None


def destination(server: MailServer) -> dict[str, object]:
    values: dict[str, object] = {}
    for path in DESTINATION_FIELDS:
        model, name = lookup(server, path)
        values[path] = getattr(model, name, None) if model is not None else None
    if server.smtp is not None:
        values["smtp.port"] = server.smtp.effective_port
    return values


def without_secret_markers(doc: object) -> object:
    """The document with {"set": …} markers taken out of secret fields: {"set": true} becomes an
    absent field (keep what is stored), {"set": false} becomes null (remove it). A marker on any
    other field is an error naming that field."""
    if not isinstance(doc, dict):
        return doc
    problems: list[tuple[str, str]] = []

    def walk(node: dict[str, object], prefix: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if _is_marker(value):
                if path not in SECRET_FIELDS:
                    problems.append((path, '{"set": …} is only for secret fields: ' + ", ".join(SECRET_FIELDS)))
                elif value == {"set": False}:
                    out[key] = None
                continue  # {"set": true}: keep what is stored
            out[key] = walk(value, path + ".") if isinstance(value, dict) else value
        return out

    cleaned = walk(doc, "")
    if problems:
        raise SettingsError(problems)
    return cleaned


def _is_marker(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {"set"} and isinstance(value["set"], bool)


def public_document(
    stored: dict[str, Any], secrets_set: set[str], server: MailServer | Iterable[str]
) -> dict[str, Any]:
    """A stored document as it may be shown: each of its secret fields (those of `server`'s kind
    and auth method, or the paths given) as {"set": bool}."""
    doc = copy.deepcopy(stored)
    for path in secret_fields(server) if isinstance(server, MailServer) else server:
        *parents, name = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = {"set": path in secrets_set}
    return doc


def storable_document(server: MailServer) -> dict[str, Any]:
    """The document as stored: every field, secrets and the enabled switch taken out (those live
    in their own columns and rows)."""
    doc = server.model_dump(mode="json")
    doc.pop("enabled", None)
    for path in SECRET_FIELDS:
        *parents, name = path.split(".")
        node: Any = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return doc
