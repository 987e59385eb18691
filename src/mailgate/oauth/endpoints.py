"""Where a mail server's tokens come from: token URL, authorize URL, client and scope.

The presets only fill what the settings leave out (reference §2.2, §6, §8): an explicit
`token_url`, `authorize_url` or `scope` always wins. Authorities and Graph endpoints are settings,
so sovereign clouds work by changing them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..errors import SettingsError
from ..settings.document import GraphSettings, TokenSourceSettings

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"

# Exchange Online SMTP, app-only (client credentials; the app needs SMTP.SendAsApp).
SMTP_APP_SCOPE = "https://outlook.office365.com/.default"
# Exchange Online SMTP, delegated; offline_access brings the refresh token.
SMTP_DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# Graph, delegated (a mailbox's user consents): Mail.Send, and Mail.ReadWrite for the drafts and
# upload sessions of large attachments (reference §5.5); offline_access brings the refresh token.
GRAPH_MAIL_SEND = "https://graph.microsoft.com/Mail.Send"
GRAPH_MAIL_READWRITE = "https://graph.microsoft.com/Mail.ReadWrite"
# OpenID Connect: the id_token whose claims name the consenting mailbox (reference §8: besides
# one resource, a token request may carry only these).
OIDC_SCOPES = "openid email profile"

# EWS (kind ews) with Entra ID tokens: app-only (full_access_as_app, with ExchangeImpersonation),
# or delegated by the mailbox's user.
EWS_APP_SCOPE = "https://outlook.office365.com/.default"
EWS_DELEGATED_SCOPE = "https://outlook.office365.com/EWS.AccessAsUser.All offline_access"
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"

Provider = Literal["microsoft", "google", "generic"]


@dataclass(frozen=True)
class Endpoint:
    """One client at one token endpoint, asking for one scope."""

    provider: Provider
    token_url: str
    client_id: str
    client_secret: str | None = field(repr=False)
    scope: str | None
    client_auth: Literal["form", "basic"] = "form"
    authorize_url: str | None = None


def _microsoft(authority: str | None, directory_id: str | None, leg: str) -> str:
    if directory_id is None:
        raise SettingsError([("auth.token.directory_id", "is required for the microsoft provider")])
    return f"{(authority or MICROSOFT_AUTHORITY).rstrip('/')}/{directory_id}/oauth2/v2.0/{leg}"


def smtp_endpoint(token: TokenSourceSettings) -> Endpoint:
    """The endpoint of an SMTP server's XOAUTH2 token source."""
    assert token.client_id is not None  # the document requires it
    delegated = token.grant != "client_credentials"
    authorize_url: str | None
    scope: str | None
    if token.provider == "microsoft":
        token_url = token.token_url or _microsoft(token.authority, token.directory_id, "token")
        authorize_url = token.authorize_url or (
            _microsoft(token.authority, token.directory_id, "authorize") if token.grant == "delegated" else None
        )
        scope = token.scope or (SMTP_DELEGATED_SCOPE if delegated else SMTP_APP_SCOPE)
    elif token.provider == "google":
        token_url = token.token_url or GOOGLE_TOKEN_URL
        authorize_url = token.authorize_url or GOOGLE_AUTHORIZE_URL
        scope = token.scope or GOOGLE_MAIL_SCOPE
    else:
        assert token.token_url is not None  # the document requires it
        token_url, authorize_url, scope = token.token_url, token.authorize_url, token.scope
    secret = token.client_secret.get_secret_value() if token.client_secret else None
    return Endpoint(token.provider, token_url, token.client_id, secret, scope, token.client_auth, authorize_url)


def graph_permissions(graph: GraphSettings) -> str:
    """The delegated Graph permissions a server needs, as scopes of one resource."""
    return GRAPH_MAIL_SEND + (f" {GRAPH_MAIL_READWRITE}" if graph.large_attachments else "")


def ews_endpoint(token: TokenSourceSettings) -> Endpoint:
    """The endpoint of an EWS server's token source: an SMTP one's, with EWS's Microsoft scope."""
    endpoint = smtp_endpoint(token)
    if token.provider != "microsoft" or token.scope is not None:
        return endpoint
    scope = EWS_APP_SCOPE if token.grant == "client_credentials" else EWS_DELEGATED_SCOPE
    return dataclasses.replace(endpoint, scope=scope)


def graph_endpoint(graph: GraphSettings) -> Endpoint:
    """The endpoint of a Graph server's tokens: app-only (client credentials, `.default`), or for
    a delegated server the refresh of its grant (the permissions it needs, and offline_access so
    the refresh token is replaced)."""
    secret = graph.client_secret.get_secret_value() if graph.client_secret else None
    token_url = _microsoft(graph.authority, graph.directory_id, "token")
    if graph.auth == "delegated":
        scope = f"{graph_permissions(graph)} offline_access"
        return Endpoint("microsoft", token_url, graph.client_id, secret, scope,
                        authorize_url=_microsoft(graph.authority, graph.directory_id, "authorize"))  # fmt: skip
    return Endpoint("microsoft", token_url, graph.client_id, secret, GRAPH_SCOPE)


def graph_consent_endpoint(graph: GraphSettings) -> Endpoint:
    """The endpoint of a delegated Graph server's consent: the authorize URL and the code's
    redemption ask for the permissions, offline_access and the OpenID Connect scopes (the
    id_token tells which mailbox consented)."""
    endpoint = graph_endpoint(graph)
    return dataclasses.replace(endpoint, scope=f"{graph_permissions(graph)} offline_access {OIDC_SCOPES}")
