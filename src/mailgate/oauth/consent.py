"""The delegated grant: an admin consents in the browser (authorization code + PKCE, RFC 7636)
and mailgate keeps the refresh token.

`begin` returns the authorize URL; the state (only its hash is stored) and the PKCE verifier
(encrypted) stay server-side for ten minutes. `complete` takes the state and code the provider
sent to the redirect URI, exchanges them once, and stores the refresh token. `reset` forgets it.

Two kinds of server have a delegated grant: SMTP with an XOAUTH2 token source whose grant is
`delegated` (the mailbox is `auth.username`), and Graph with `graph.auth` delegated, whose
consent also asks for the OpenID Connect scopes: the id_token names the mailbox that consented,
which becomes `graph.mailbox` and the sender address.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from sqlalchemy import delete, select

from ..access import token_hash
from ..db.engine import Database
from ..db.models import ConsentRequest, now
from ..errors import Conflict, NotFound, SettingsError
from ..message import Address
from ..settings.document import MailServer, OAuth2AuthSettings
from ..settings.secrets import Keyring
from ..settings.store import LoadedServer, ServerInfo, Servers
from .cache import TokenCache
from .endpoints import Endpoint, ews_endpoint, graph_consent_endpoint, smtp_endpoint
from .tokens import decode_claims, request_token

if TYPE_CHECKING:
    from ..destinations import Destinations

CONSENT_LIFETIME = timedelta(minutes=10)  # authorization codes live about as long (reference §8)
VERIFIER_FIELD = "consent.code_verifier"
# Which id_token claim names the consenting mailbox, best first. `email` (asked for with the email
# scope) is the user's mail attribute: the mailbox's primary SMTP address, the From that Graph's
# sendMail gives the user's mail. `preferred_username` is the sign-in name (the UPN), which is often
# the same address but need not be (an onmicrosoft.com UPN, a renamed mailbox); `upn` is its v1.0
# form. None is trusted for anything but the From: Graph sends as the token's user whatever we think.
MAILBOX_CLAIMS = ("email", "preferred_username", "upn")
# Authorities' directory ids that are not one directory: an id_token from them has its own tid.
_MULTI_TENANT = ("common", "organizations", "consumers")


@dataclass(frozen=True)
class ConsentResult:
    scope: str  # the mail server's scope: "global" or the tenant
    mailbox: str  # the connected mailbox (the XOAUTH2 user)
    granted_scope: str | None  # what the provider says it granted


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge): 86 characters of randomness, and its hash."""
    verifier = secrets.token_urlsafe(64)
    return verifier, challenge_of(verifier)


def challenge_of(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


class Consents:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        servers: Servers,
        cache: TokenCache,
        actor: str,
        destinations: Destinations | None = None,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.servers = servers
        self.cache = cache
        self.actor = actor
        self.destinations = destinations  # where each scope's token endpoint may be; None: anywhere

    async def begin(self, scope: str, redirect_uri: str) -> str:
        """The URL to send the admin to; the provider comes back to `redirect_uri` with a code."""
        loaded = await self._delegated(scope)
        endpoint = _endpoint(loaded)
        assert endpoint.authorize_url is not None
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(32)
        async with self.db.write() as s:
            await s.execute(delete(ConsentRequest).where(ConsentRequest.expires_at < now()))
            s.add(ConsentRequest(
                state_hash=token_hash(state), server_id=loaded.id, server_version=loaded.version,
                verifier=self.keyring.encrypt(scope, VERIFIER_FIELD, verifier), redirect_uri=redirect_uri,
                actor=self.actor, expires_at=now() + CONSENT_LIFETIME,
            ))  # fmt: skip
        params = {
            "client_id": endpoint.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "response_mode": "query",
            "scope": endpoint.scope or "",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        hint = _mailbox_of(loaded.server)
        if hint:
            params["login_hint"] = hint
        if endpoint.provider == "google":  # a refresh token only with offline access (reference §6)
            params |= {"access_type": "offline", "prompt": "consent"}
            del params["response_mode"]
        return f"{endpoint.authorize_url}?{urlencode(params)}"

    async def complete(self, state: str, code: str) -> ConsentResult:
        """Exchange the code for tokens and store the refresh token. A state works once."""
        if not state or not code:
            raise SettingsError([("state" if not state else "code", "is required")])
        async with self.db.write() as s:  # used up at once, whatever happens next
            request = await s.scalar(select(ConsentRequest).where(ConsentRequest.state_hash == token_hash(state)))
            if request is not None:
                await s.delete(request)
        if request is None:
            raise NotFound([("state", "no consent is under way with this state (already used, or reset): "
                                      "connect again")])  # fmt: skip
        if request.expires_at < now():
            raise Conflict([("state", "the consent took longer than 10 minutes: connect again")])
        loaded = await self.servers.loaded_by_id(request.server_id)
        if loaded is None or loaded.version != request.server_version:
            raise Conflict([("state", "the mail server's settings changed during the consent: connect again")])
        endpoint = _endpoint(loaded)
        verifier = self.keyring.decrypt(loaded.scope, VERIFIER_FIELD, request.verifier)
        grant = {"grant_type": "authorization_code", "code": code, "redirect_uri": request.redirect_uri,
                 "code_verifier": verifier}  # fmt: skip
        if endpoint.scope and endpoint.provider != "google":
            grant["scope"] = endpoint.scope
        c = loaded.server.connection
        http = self.cache.http_for(self.destinations.for_scope(loaded.scope) if self.destinations else None)
        reply = await request_token(http, endpoint, grant, timeout=(c.connect_timeout, c.protocol_timeout))
        graph = loaded.server.graph
        if not reply.refresh_token:
            hint = "access_type=offline" if endpoint.provider == "google" else "the offline_access scope"
            where = "graph.refresh_token" if graph is not None else "auth.token.scope"
            raise SettingsError([(where, f"the provider granted no refresh token: ask for {hint}")])
        learnt = None
        if graph is not None:
            learnt = _consenting_mailbox(reply.id_token, endpoint.client_id, graph.directory_id)
        stored = await self.servers.store_refresh_token(
            loaded.id, loaded.version, reply.refresh_token, consent=True, actor=request.actor, mailbox=learnt
        )
        if not stored:
            raise Conflict([("state", "the mail server's settings changed during the consent: connect again")])
        return ConsentResult(loaded.scope, learnt or _mailbox_of(loaded.server) or "", reply.scope)

    async def reset(self, scope: str) -> ServerInfo:
        """Forget the stored refresh token and any consent under way."""
        await self._delegated(scope)
        return await self.servers.forget_refresh_token(scope)

    async def _delegated(self, scope: str) -> LoadedServer:
        loaded = await self.servers.loaded(scope)
        if loaded is None:
            raise NotFound([("server", f"no mail server is set for {scope}")])
        graph, auth = loaded.server.graph, loaded.server.auth
        if graph is not None:
            if graph.auth != "delegated":
                why = "consent is for a graph server whose auth is delegated; this one sends as the app itself"
                raise SettingsError([("graph.auth", why)])
        elif not isinstance(auth, OAuth2AuthSettings) or auth.token.grant != "delegated":
            raise SettingsError([("auth.token.grant", "consent is for a mail server whose token source is delegated")])
        return loaded


def _endpoint(loaded: LoadedServer) -> Endpoint:
    if loaded.server.graph is not None:
        return graph_consent_endpoint(loaded.server.graph)
    auth = loaded.server.auth
    assert isinstance(auth, OAuth2AuthSettings)
    return ews_endpoint(auth.token) if loaded.server.kind == "ews" else smtp_endpoint(auth.token)


def _mailbox_of(server: MailServer) -> str | None:
    """The mailbox the server's grant is for, as far as the settings know it (before a Graph
    consent: the address the admin expects, if any: a login hint)."""
    if server.graph is not None:
        return server.graph.mailbox or server.from_address
    auth = server.auth
    return auth.username if isinstance(auth, OAuth2AuthSettings) else None


def _consenting_mailbox(id_token: str | None, client_id: str, directory_id: str) -> str:
    """The mailbox address the id_token names (MAILBOX_CLAIMS). The token came straight from the
    token endpoint over TLS (OpenID Connect Core 3.1.3.7: no signature check needed then), but it
    must be for this app and, with a directory id, from that directory."""
    claims = decode_claims(id_token) if id_token else None
    if claims is None:
        raise SettingsError([("graph.mailbox", "the provider sent no id_token, so mailgate can't tell which mailbox "
                                               "consented: the consent asks for openid and email")])  # fmt: skip
    if claims.get("aud") != client_id:
        raise SettingsError([("graph.mailbox", "the id_token is for another application (aud): connect again")])
    if directory_id.lower() not in _MULTI_TENANT and str(claims.get("tid", "")).lower() != directory_id.lower():
        raise SettingsError([("graph.mailbox", "the id_token comes from another directory (tid) than "
                                               "graph.directory_id: connect again")])  # fmt: skip
    for claim in MAILBOX_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and 0 < len(value) <= 320 and "@" in value:
            try:
                return Address(value).address
            except ValueError:
                continue
    raise SettingsError([("graph.mailbox", "the id_token names no mailbox address (email or preferred_username): "
                                           "the account that consented has no mailbox")])  # fmt: skip
