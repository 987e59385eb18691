"""The mail server document: one complete way of sending, as DESIGN.md defines it.

The same document is what `mailgate send --server FILE` reads, what the API will accept and what
the settings store keeps. Field names are a contract: add fields, never rename them. Parsing is
strict (no silent "587" → 587, no unknown fields) and every problem names its field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ..errors import SettingsError

Security = Literal["none", "starttls", "starttls-required", "tls"]
IMPLICIT_TLS_PORT = 465


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    from ..message import Address

    try:
        return Address(value).address
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid address: {e}") from None


class SMTPSettings(_Section):
    host: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s/]+$")]
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # 465 for tls, else 587
    security: Security = "starttls-required"
    verify_certificate: bool = True
    ca_file: str | None = None
    helo_name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")] | None = None
    # Raw UTF-8 headers (RFC 6532) when the server offers SMTPUTF8. Off by default: the next hop
    # after the submission server may not take SMTPUTF8 and bounce; encoded words always work.
    utf8_headers: bool = False

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return IMPLICIT_TLS_PORT if self.security == "tls" else 587

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
    username: Annotated[str, Field(min_length=1)]
    password: SecretStr | None = None  # may come from --password-stdin or the environment
    mechanism: Literal["auto", "PLAIN", "LOGIN", "CRAM-MD5"] = "auto"


class TokenSourceSettings(_Section):
    grant: Literal["client_credentials", "refresh_token", "delegated"]
    provider: Literal["microsoft", "google", "generic"] = "generic"
    authority: str | None = None
    directory_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    token_url: str | None = None
    scope: str | None = None
    refresh_token: SecretStr | None = None
    client_auth: Literal["form", "basic"] = "form"


class OAuth2AuthSettings(_Section):
    method: Literal["oauth2"]
    username: Annotated[str, Field(min_length=1)]
    token: TokenSourceSettings


AuthSettings = Annotated[NoAuth | PasswordAuthSettings | OAuth2AuthSettings, Field(discriminator="method")]


class GraphSettings(_Section):
    authority: str = "https://login.microsoftonline.com"
    endpoint: str = "https://graph.microsoft.com"
    directory_id: Annotated[str, Field(min_length=1)]
    client_id: Annotated[str, Field(min_length=1)]
    client_secret: SecretStr | None = None
    mailbox: Annotated[str, Field(min_length=1)]
    allow_delegate: bool = False
    save_to_sent_items: bool = True
    large_attachments: bool = False


PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class ConnectionSettings(_Section):
    pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    check_idle_after: PositiveSeconds = 30.0
    max_idle: PositiveSeconds = 300.0
    connect_timeout: PositiveSeconds = 30.0
    protocol_timeout: PositiveSeconds = 60.0
    token_expiry_margin: PositiveSeconds = 300.0
    max_messages_per_connection: Annotated[int, Field(ge=1)] | None = None


class QuotaSettings(_Section):
    messages_per_minute: Annotated[int, Field(ge=1)] | None = None
    recipients_per_day: Annotated[int, Field(ge=1)] | None = None
    max_concurrent_connections: Annotated[int, Field(ge=1)] | None = None


class DebugSettings(_Section):
    protocol_log: bool = False


class MailServer(_Section):
    kind: Literal["smtp", "graph"] = "smtp"
    enabled: bool = True
    from_address: str
    from_name: Annotated[str, Field(max_length=256)] = ""
    reply_to: str | None = None
    envelope_from: str | None = None
    smtp: SMTPSettings | None = None
    auth: AuthSettings = NoAuth(method="none")
    graph: GraphSettings | None = None
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

    @model_validator(mode="after")
    def _sections_match_kind(self) -> MailServer:
        if self.kind == "smtp":
            if self.smtp is None:
                raise ValueError("a mail server of kind smtp needs an smtp section with at least a host")
            if self.graph is not None:
                raise ValueError("a graph section belongs to kind graph; this server is kind smtp")
        else:
            if self.graph is None:
                raise ValueError("a mail server of kind graph needs a graph section")
            if self.smtp is not None or not isinstance(self.auth, NoAuth):
                raise ValueError("smtp and auth sections belong to kind smtp; this server is kind graph")
        return self


def parse_server(doc: object) -> MailServer:
    """A `MailServer` from a parsed JSON document, or SettingsError naming every bad field."""
    try:
        return MailServer.model_validate(doc)
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
    # The discriminator of `auth` appears as a path element ("password"); drop it from the path.
    loc = [str(p) for p in err["loc"] if p not in ("none", "password", "oauth2")]
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
