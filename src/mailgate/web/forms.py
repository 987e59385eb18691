"""The mail server form: DESIGN.md's settings document laid out as groups of fields, read back into
a document. Field names are the document's dotted paths ("smtp.host"), so the settings store's
problems land next to the field they name. Only presentation lives here; every rule is the
document's (settings/document.py) and the store's.

A group or field may be shown only for some values of others (`when`): the page hides it (and its
inputs are not sent), and the document is built from the fields shown, so the fields of another
kind or auth method never reach it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..settings.document import DESTINATION_FIELDS, SECRET_FIELDS

# "list": a text input of items separated by commas or spaces (the document's list of strings).
Kind = Literal["text", "email", "url", "int", "float", "select", "checkbox", "secret", "pem", "list"]
When = tuple[tuple[str, tuple[str, ...]], ...]  # ((path, allowed values), …): all must hold


@dataclass(frozen=True)
class Field:
    path: str
    label: str
    kind: Kind = "text"
    help: str = ""
    choices: tuple[tuple[str, str], ...] = ()  # (value, label)
    when: When = ()
    placeholder: str = ""
    required: bool = False
    global_only: bool = False  # the operator's to set: shown for the global server only

    @property
    def id(self) -> str:
        return "f-" + self.path.replace(".", "-").replace("_", "-")

    @property
    def destination(self) -> bool:
        """Changing it means a stored secret must be given again (the store's rule)."""
        return self.path in DESTINATION_FIELDS


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    fields: tuple[Field, ...]
    when: When = ()
    advanced: bool = False  # folded away until opened
    help: str = ""


SMTP: When = (("kind", ("smtp",)),)
OAUTH: When = (("kind", ("smtp", "ews")), ("auth.method", ("oauth2",)))
SIGN_IN: When = (("kind", ("smtp", "ews")),)  # EWS takes its credentials from the auth section too

GROUPS: tuple[Group, ...] = (
    Group("switch", "Use mail server", (
        Field("enabled", "Use this mail server", "checkbox",
              "Off: nothing is sent through it (a tenant falls back to the global server; the global server off "
              "stops all mail)."),
    )),
    Group("sender", "Sender", (
        Field("from_address", "Sender address", "email", "The From address of every message.", required=True,
              placeholder="no-reply@example.com"),
        Field("from_name", "Sender name", placeholder="Example Notifications"),
        Field("reply_to", "Reply-To address", "email", "Where replies go (optional)."),
        Field("envelope_from", "Envelope sender", "email", "Where bounces go (MAIL FROM), if not the sender address."),
        Field("from_policy", "Messages' own From", "select",
              "Fixed: every message goes from the sender address (its own From becomes its Reply-To). Domains: a "
              "message may have its own From in the allowed domains. The default is fixed for the global server, "
              "any for a tenant's own.",
              choices=(("", "Default for this server"), ("fixed", "Fixed: always the sender address"),
                       ("domains", "Only from the allowed domains"), ("any", "Any address"))),
        Field("from_domains", "Allowed From domains", "list",
              "Separated by commas or spaces, e.g. example.com, mail.example.com (each exactly; at most 100).",
              when=(("from_policy", ("domains",)),), placeholder="example.com"),
    )),
    Group("kind", "Kind", (
        Field("kind", "How mail is sent", "select", choices=(
            ("smtp", "SMTP server (relay, Exchange Online, Gmail)"), ("graph", "Microsoft Graph API"),
            ("ews", "Exchange on premises (EWS)"))),
    )),
    Group("connection_security", "Connection security", (
        Field("smtp.host", "Host", help="e.g. smtp.office365.com, smtp.gmail.com", required=True,
              placeholder="smtp.example.com"),
        Field("smtp.port", "Port", "int", "Empty: 465 with implicit TLS, else 587.", placeholder="587"),
        Field("smtp.security", "Security", "select", choices=(
            ("starttls-required", "STARTTLS, required"), ("starttls", "STARTTLS if offered"),
            ("tls", "Implicit TLS (port 465)"), ("none", "None (plain text)"))),
        Field("smtp.verify_certificate", "Verify the server's certificate", "checkbox"),
        Field("smtp.ca_certificate", "CA certificate", "pem",
              "For a server whose certificate a private CA signed: that CA's certificate, as PEM text "
              "(-----BEGIN CERTIFICATE----- …). Only this CA is trusted then."),
        Field("smtp.ca_file", "CA bundle file", help="Or a PEM file on the mailgate host, for a private CA.",
              global_only=True),
        Field("smtp.helo_name", "HELO name", help="The name mailgate gives in EHLO (default: this host's name)."),
        Field("smtp.utf8_headers", "Raw UTF-8 headers (SMTPUTF8) when offered", "checkbox"),
    ), when=SMTP),
    Group("authentication", "Authentication", (
        Field("auth.method", "Method", "select", choices=(
            ("none", "None"), ("password", "User name and password"), ("oauth2", "OAuth2 (XOAUTH2)"))),
        Field("auth.username", "User name", help="For OAuth2: the mailbox that sends.", required=True,
              when=(("auth.method", ("password", "oauth2")),)),
        Field("auth.password", "Password", "secret", when=(("auth.method", ("password",)),)),
        Field("auth.mechanism", "Mechanism", "select", choices=(
            ("auto", "Automatic"), ("PLAIN", "PLAIN"), ("LOGIN", "LOGIN"), ("CRAM-MD5", "CRAM-MD5")),
            when=(("kind", ("smtp",)), ("auth.method", ("password",)))),
    ), when=SIGN_IN),
    Group("token_source", "Token source", (
        Field("auth.token.grant", "Grant", "select", choices=(
            ("client_credentials", "Client credentials (app-only)"), ("refresh_token", "Refresh token"),
            ("delegated", "Delegated: an admin connects the mailbox"))),
        Field("auth.token.provider", "Provider", "select", choices=(
            ("microsoft", "Microsoft 365 / Exchange Online"), ("google", "Google Workspace / Gmail"),
            ("generic", "Other (give the URLs)"))),
        Field("auth.token.authority", "Authority", "url", "Empty: https://login.microsoftonline.com.",
              when=(("auth.token.provider", ("microsoft",)),), placeholder="https://login.microsoftonline.com"),
        Field("auth.token.directory_id", "Directory (tenant) id", when=(("auth.token.provider", ("microsoft",)),)),
        Field("auth.token.client_id", "Client id", required=True),
        Field("auth.token.client_secret", "Client secret", "secret"),
        Field("auth.token.refresh_token", "Refresh token", "secret",
              when=(("auth.token.grant", ("refresh_token",)),)),
        Field("auth.token.token_url", "Token URL", "url", "Empty: the provider's."),
        Field("auth.token.authorize_url", "Authorize URL", "url", "Empty: the provider's.",
              when=(("auth.token.grant", ("delegated",)),)),
        Field("auth.token.scope", "Scope", help="Empty: the provider's SMTP scope."),
        Field("auth.token.client_auth", "Client authentication", "select", choices=(
            ("form", "In the form"), ("basic", "HTTP Basic"))),
    ), when=OAUTH),
    Group("graph", "Microsoft Graph", (
        Field("graph.auth", "Sends as", "select", choices=(
            ("client_credentials", "The app (application permission Mail.Send; give the mailbox)"),
            ("delegated", "A mailbox that connects (delegated Mail.Send; its user signs in and consents)"))),
        Field("graph.directory_id", "Directory (tenant) id", required=True),
        Field("graph.client_id", "Client id", required=True),
        Field("graph.client_secret", "Client secret", "secret"),
        Field("graph.mailbox", "Sending mailbox", "email", required=True,  # "": a form from before graph.auth
              when=(("graph.auth", ("client_credentials", "")),)),
        Field("graph.authority", "Authority", "url", placeholder="https://login.microsoftonline.com"),
        Field("graph.endpoint", "Graph endpoint", "url", "Sovereign clouds differ.",
              placeholder="https://graph.microsoft.com"),
        Field("graph.allow_delegate", "Allow a sender address other than the mailbox", "checkbox",
              "Needs Send As or Send on Behalf for the mailbox."),
        Field("graph.delegate_as", "Send other addresses", "select",
              choices=(("send_as", "as that address"), ("on_behalf", "on behalf of it"))),
        Field("graph.save_to_sent_items", "Save to Sent Items", "checkbox"),
        Field("graph.large_attachments", "Large attachments (upload session; needs Mail.ReadWrite)", "checkbox"),
    ), when=(("kind", ("graph",)),)),
    Group("ews", "Exchange Web Services", (
        Field("ews.url", "EWS URL", "url", "The server's EWS endpoint. Empty: found by Autodiscover (below).",
              placeholder="https://mail.example.com/EWS/Exchange.asmx"),
        Field("ews.autodiscover", "Find the EWS URL by Autodiscover", "checkbox",
              "Asks https://<domain>/autodiscover/… and https://autodiscover.<domain>/… of the mailbox's domain; "
              "follows no redirection."),
        Field("ews.mailbox", "Sending mailbox", "email", required=True),
        Field("ews.exchange_version", "Exchange version", "select", choices=(
            ("auto", "Automatic"), ("Exchange2013", "Exchange 2013"), ("Exchange2013_SP1", "Exchange 2013 SP1"),
            ("Exchange2016", "Exchange 2016"), ("Exchange2019", "Exchange 2019"))),
        Field("ews.password_scheme", "Password authentication", "select",
              choices=(("ntlm", "NTLM (Windows authentication)"), ("basic", "Basic")),
              when=(("auth.method", ("password",)),)),
        Field("ews.allow_delegate", "Allow a sender address other than the mailbox", "checkbox",
              "Needs Send As or Send on Behalf for the mailbox."),
        Field("ews.save_to_sent_items", "Save to Sent Items", "checkbox"),
    ), when=(("kind", ("ews",)),), help="Exchange Online retires EWS (blocked from 1 October 2026, off on "
       "1 April 2027): for Microsoft 365 use the Microsoft Graph API."),
    Group("connection", "Connection tuning", (
        Field("connection.pool_size", "Pool size", "int", placeholder="10"),
        Field("connection.check_idle_after", "Check a connection idle for (s)", "float",
              "A kept connection idle this long must answer a NOOP before it is used again; 0: before every reuse "
              "(a round trip more per message).", placeholder="30"),
        Field("connection.max_idle", "Close a connection idle for (s)", "float", placeholder="300"),
        Field("connection.connect_timeout", "Connect timeout (s)", "float", placeholder="30"),
        Field("connection.protocol_timeout", "Protocol timeout (s)", "float", placeholder="60"),
        Field("connection.token_expiry_margin", "Token expiry margin (s)", "float", placeholder="300"),
        Field("connection.max_messages_per_connection", "Messages per connection", "int", "Empty: no limit."),
    ), advanced=True),
    Group("quota", "Quotas", (
        Field("quota.messages_per_minute", "Messages per minute", "int", "Exchange Online: 30."),
        Field("quota.recipients_per_day", "Recipients per day", "int", "Exchange Online: 10,000."),
        Field("quota.max_concurrent_connections", "Concurrent connections", "int", "Exchange Online: 3 per mailbox."),
    ), advanced=True, help="Empty: no limit."),
    Group("debug", "Debugging", (
        Field("debug.protocol_log", "Log the protocol conversation (secrets redacted)", "checkbox"),
    ), advanced=True),
)  # fmt: skip

FIELDS = {f.path: f for g in GROUPS for f in g.fields}
# What a new server's form starts from.
NEW_SERVER: dict[str, Any] = {
    "enabled": True, "kind": "smtp", "smtp.security": "starttls-required", "smtp.verify_certificate": True,
    "auth.method": "none", "auth.mechanism": "auto", "auth.token.grant": "client_credentials",
    "auth.token.provider": "microsoft", "auth.token.client_auth": "form", "graph.delegate_as": "send_as",
    "graph.save_to_sent_items": True, "graph.auth": "client_credentials",
    "ews.exchange_version": "auto", "ews.password_scheme": "ntlm", "ews.save_to_sent_items": True,
}  # fmt: skip


@dataclass
class ServerForm:
    """What the page shows: each field's value, which secrets are stored, and the problems."""

    values: dict[str, Any]
    secrets_set: set[str] = field(default_factory=set)
    problems: dict[str, list[str]] = field(default_factory=dict)  # "" for the document as a whole
    scope: str = "global"

    def shown(self, when: When) -> bool:
        return all(str(self.values.get(path, "")) in allowed for path, allowed in when)

    def has(self, f: Field) -> bool:
        """Whether the page has the field at all (a global-only one is not on a tenant's)."""
        return self.scope == "global" or not f.global_only

    def value(self, path: str) -> Any:
        value = self.values.get(path)
        return "" if value is None else value


def from_document(document: Mapping[str, Any] | None, enabled: bool = True, *, scope: str = "global") -> ServerForm:
    """The form of a stored server (secrets as {"set": bool}), or of a new one (None)."""
    if document is None:
        return ServerForm(dict(NEW_SERVER), scope=scope)
    values: dict[str, Any] = dict(NEW_SERVER)
    secrets_set: set[str] = set()

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = prefix + key
            if path in SECRET_FIELDS:
                if isinstance(value, Mapping) and value.get("set"):
                    secrets_set.add(path)
            elif isinstance(value, Mapping):
                walk(value, path + ".")
            else:
                values[path] = ", ".join(value) if isinstance(value, list) else value

    walk(document, "")
    values["enabled"] = document.get("enabled", enabled)
    return ServerForm(values, secrets_set, scope=scope)


def to_document(
    form: Mapping[str, str], secrets_set: set[str] | None = None, *, scope: str = "global"
) -> tuple[dict[str, Any], ServerForm]:
    """The document the submitted form describes, and the form to show again (with the values as
    typed). Numbers that are not numbers are problems here; everything else the store checks."""
    values: dict[str, Any] = {path: form.get(path, "") for path in FIELDS}
    shown = ServerForm(values, set(secrets_set or ()), scope=scope)
    doc: dict[str, Any] = {}
    for group in GROUPS:
        if not shown.shown(group.when):
            continue
        for f in group.fields:
            if not shown.shown(f.when) or not shown.has(f):
                continue
            raw = form.get(f.path)
            value: Any
            if f.kind == "checkbox":
                value = raw is not None
                values[f.path] = value
            elif f.kind == "secret":
                if form.get(f.path + ".remove"):
                    value = None  # remove the stored secret
                elif not raw:
                    continue  # keep the stored one (the store asks again when the destination changed)
                else:
                    value = raw
            elif raw is None or not raw.strip():
                continue  # the document's default
            elif f.kind in ("int", "float"):
                try:
                    value = int(raw) if f.kind == "int" else float(raw)
                except ValueError:
                    shown.problems.setdefault(f.path, []).append(
                        "is a whole number" if f.kind == "int" else "is a number (seconds)"
                    )
                    continue
            elif f.kind == "list":
                value = [item for item in re.split(r"[\s,;]+", raw) if item]
            else:
                value = raw.strip()
            _put(doc, f.path, value)
    return doc, shown


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, name = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = value


def attach_problems(form: ServerForm, problems: list[tuple[str, str]]) -> None:
    """Put the store's problems (field path, text) next to their fields; a problem of a section or
    of the whole document goes to the field it starts with, or to the top."""
    for path, text in problems:
        target = path if path in FIELDS else ""
        if not target:
            for known in FIELDS:
                if path and known.startswith(path + "."):
                    target = known
                    break
        label = "" if target == path or not path else f"{path}: "
        form.problems.setdefault(target, []).append(label + text)
