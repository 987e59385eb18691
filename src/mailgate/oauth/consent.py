"""The delegated grant: an admin consents in the browser (authorization code + PKCE, RFC 7636)
and mailgate keeps the refresh token.

`begin` returns the authorize URL; the state (only its hash is stored) and the PKCE verifier
(encrypted) stay server-side for ten minutes. `complete` takes the state and code the provider
sent to the redirect URI, exchanges them once, and stores the refresh token. `reset` forgets it.
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
from ..settings.document import OAuth2AuthSettings
from ..settings.secrets import Keyring
from ..settings.store import LoadedServer, ServerInfo, Servers
from .cache import TokenCache
from .endpoints import Endpoint, ews_endpoint, smtp_endpoint
from .tokens import request_token

if TYPE_CHECKING:
    from ..destinations import Destinations

CONSENT_LIFETIME = timedelta(minutes=10)  # authorization codes live about as long (reference §8)
VERIFIER_FIELD = "consent.code_verifier"


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
        auth = loaded.server.auth
        assert isinstance(auth, OAuth2AuthSettings)
        params = {
            "client_id": endpoint.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "response_mode": "query",
            "scope": endpoint.scope or "",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "login_hint": auth.username,
        }
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
        if not reply.refresh_token:
            hint = "access_type=offline" if endpoint.provider == "google" else "the offline_access scope"
            raise SettingsError([("auth.token.scope", f"the provider granted no refresh token: ask for {hint}")])
        stored = await self.servers.store_refresh_token(
            loaded.id, loaded.version, reply.refresh_token, consent=True, actor=request.actor
        )
        if not stored:
            raise Conflict([("state", "the mail server's settings changed during the consent: connect again")])
        auth = loaded.server.auth
        assert isinstance(auth, OAuth2AuthSettings)
        return ConsentResult(loaded.scope, auth.username, reply.scope)

    async def reset(self, scope: str) -> ServerInfo:
        """Forget the stored refresh token and any consent under way."""
        await self._delegated(scope)
        return await self.servers.forget_refresh_token(scope)

    async def _delegated(self, scope: str) -> LoadedServer:
        loaded = await self.servers.loaded(scope)
        if loaded is None:
            raise NotFound([("server", f"no mail server is set for {scope}")])
        auth = loaded.server.auth
        if not isinstance(auth, OAuth2AuthSettings) or auth.token.grant != "delegated":
            raise SettingsError([("auth.token.grant", "consent is for a mail server whose token source is delegated")])
        return loaded


def _endpoint(loaded: LoadedServer) -> Endpoint:
    auth = loaded.server.auth
    assert isinstance(auth, OAuth2AuthSettings)
    return ews_endpoint(auth.token) if loaded.server.kind == "ews" else smtp_endpoint(auth.token)
