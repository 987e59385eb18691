"""One token cache for every tenant's mail servers.

Keyed by (token URL, client id, scope, subject) and a fingerprint of the credential that obtains
the token, so a tenant that copies another's client id never gets the other's token. A token is
reused until `margin` before it expires (at most half its lifetime); at most one request per key
is under way at a time, however many senders ask; a transient failure is retried with backoff
before it is reported; a rotated refresh token is stored (encrypted, by the caller's
`store_refresh_token`) before the access token that came with it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..diagnostics.catalogue import Explanation
from ..settings.document import MailServer, OAuth2AuthSettings
from .endpoints import Endpoint, ews_endpoint, graph_endpoint, smtp_endpoint
from .tokens import AccessToken, TokenError, TokenReply, request_token

if TYPE_CHECKING:
    import httpx2

    from ..destinations import DestinationPolicy

RefreshStore = Callable[[str], Awaitable[None]]
Key = tuple[str, str, str | None, str | None, str]

_FINGERPRINT_KEY = os.urandom(32)  # fingerprints never leave the process


def _fingerprint(*secrets: str | None) -> str:
    data = "\0".join(s or "" for s in secrets).encode()
    return hmac.new(_FINGERPRINT_KEY, data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TokenSource:
    """How one mail server gets its access tokens. `subject` is the mailbox a refresh token
    belongs to (None for an app's own token); `margin` is the server's token_expiry_margin."""

    endpoint: Endpoint
    grant: Literal["client_credentials", "refresh_token"]
    refresh_token: str | None = field(default=None, repr=False)
    subject: str | None = None
    margin: float = 300.0
    timeout: tuple[float, float] = (30.0, 60.0)  # connect, read
    store_refresh_token: RefreshStore | None = field(default=None, compare=False)
    # Where its token endpoint may be (the policy of the server's scope); None: anywhere.
    destinations: DestinationPolicy | None = field(default=None, compare=False)

    def key(self, refresh_token: str | None = None) -> Key:
        e = self.endpoint
        credential = (e.client_secret, refresh_token or self.refresh_token) if self.grant == "refresh_token" else (
            e.client_secret,)  # fmt: skip
        return (e.token_url, e.client_id, e.scope, self.subject, _fingerprint(*credential))

    def grant_fields(self, refresh_token: str | None) -> dict[str, str]:
        if self.grant == "client_credentials":
            fields = {"grant_type": "client_credentials"}
        else:
            assert refresh_token is not None
            fields = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        # Google's refresh takes no scope (the grant has one); Microsoft's wants it.
        if self.endpoint.scope and not (self.grant == "refresh_token" and self.endpoint.provider == "google"):
            fields["scope"] = self.endpoint.scope
        return fields


@dataclass
class _Entry:
    token: AccessToken | None = None
    refresh_token: str | None = field(default=None, repr=False)
    task: asyncio.Task[AccessToken] | None = None


class TokenCache:
    """`await cache.get(source)` returns a current access token for `source`.

    `attempts` and `backoff`: a transient failure (network, HTTP 5xx/429, temporarily_unavailable)
    is tried again up to `attempts` times in all, after `backoff` seconds, doubling, with jitter;
    a Retry-After up to `max_wait` is honoured. Then the error goes to the caller (the outbox
    defers the message)."""

    def __init__(
        self,
        http: httpx2.AsyncClient | None = None,
        *,
        attempts: int = 3,
        backoff: float = 0.5,
        max_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._own_http = http is None
        self._guarded: dict[DestinationPolicy, httpx2.AsyncClient] = {}
        self._entries: dict[Key, _Entry] = {}
        self.attempts = attempts
        self.backoff = backoff
        self.max_wait = max_wait
        self.clock = clock
        self.requests = 0  # token requests sent, for metrics and tests
        self._rng = random.Random()

    @property
    def http(self) -> httpx2.AsyncClient:
        if self._http is None:
            from .._http import new_client

            self._http = new_client()
        return self._http

    def http_for(self, destinations: DestinationPolicy | None) -> httpx2.AsyncClient:
        """The HTTP client that connects only where `destinations` allows (one per policy, shared
        by every server of that scope); `http` when there is no policy."""
        if destinations is None:
            return self.http
        client = self._guarded.get(destinations)
        if client is None:
            from .._http import new_client

            client = self._guarded[destinations] = new_client(destinations)
        return client

    async def get(self, source: TokenSource) -> AccessToken:
        entry = self._entries.setdefault(source.key(), _Entry())
        token = entry.token
        if token is not None and self.clock() < token.renew_at:
            return token
        if entry.task is None:
            entry.task = asyncio.create_task(self._renew(entry, source))
            entry.task.add_done_callback(_retrieve)
        return await asyncio.shield(entry.task)

    def peek(self, source: TokenSource) -> AccessToken | None:
        """The token held for `source` now, if any (nothing is fetched)."""
        entry = self._entries.get(source.key())
        return entry.token if entry is not None else None

    def invalidate(self, source: TokenSource, token: AccessToken | None = None) -> None:
        """The server refused `token` (or whatever is cached): fetch a new one next time."""
        entry = self._entries.get(source.key())
        if entry is not None and (token is None or entry.token is None or entry.token.value == token.value):
            entry.token = None

    def handle(self, source: TokenSource) -> TokenHandle:
        return TokenHandle(self, source)

    async def aclose(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None
        guarded, self._guarded = list(self._guarded.values()), {}
        for client in guarded:
            await client.aclose()

    async def _renew(self, entry: _Entry, source: TokenSource) -> AccessToken:
        try:
            refresh_token = entry.refresh_token or source.refresh_token
            for attempt in range(1, self.attempts + 1):
                started = self.clock()
                try:
                    self.requests += 1
                    reply = await request_token(
                        self.http_for(source.destinations),
                        source.endpoint,
                        source.grant_fields(refresh_token),
                        timeout=source.timeout,
                    )
                    break
                except TokenError as e:
                    wait = self.backoff * 2 ** (attempt - 1) * (0.5 + self._rng.random())
                    if e.retry_after is not None:
                        wait = max(wait, e.retry_after)
                    if not e.transient or attempt == self.attempts or wait > self.max_wait:
                        raise
                    await asyncio.sleep(wait)
            if reply.refresh_token and reply.refresh_token != refresh_token:
                await self._rotate(entry, source, refresh_token, reply)
            entry.token = _token(reply, started, source.margin)
            return entry.token
        finally:
            entry.task = None

    async def _rotate(self, entry: _Entry, source: TokenSource, old: str | None, reply: TokenReply) -> None:
        new = reply.refresh_token
        assert new is not None
        if source.store_refresh_token is not None:
            try:
                await source.store_refresh_token(new)
            except Exception as e:  # the database is away: don't use a token whose grant we'd lose
                raise TokenError(
                    f"the token endpoint issued a new refresh token, and it could not be stored ({e}); "
                    "trying again later",
                    explanation=Explanation("The rotated refresh token could not be stored.", "", transient=True),
                    transient=True,
                ) from None
        entry.refresh_token = new
        # The stored settings now carry the new refresh token: find this entry under it too.
        self._entries[source.key(new)] = entry
        if old is not None and old != source.refresh_token:
            self._entries.pop(source.key(old), None)


class TokenHandle:
    """A token source bound to the cache: what an SMTP connection calls for its XOAUTH2 token,
    and tells when the server refused it."""

    def __init__(self, cache: TokenCache, source: TokenSource) -> None:
        self.cache = cache
        self.source = source

    async def __call__(self) -> AccessToken:
        return await self.cache.get(self.source)

    @property
    def current(self) -> AccessToken | None:
        return self.cache.peek(self.source)

    def invalidate(self, token: AccessToken | None = None) -> None:
        self.cache.invalidate(self.source, token)


def _token(reply: TokenReply, started: float, margin: float) -> AccessToken:
    expires_at = started + reply.expires_in
    return AccessToken(reply.access_token, expires_at, expires_at - min(margin, reply.expires_in / 2), reply.scope)


def _retrieve(task: asyncio.Task[AccessToken]) -> None:
    # Every waiter may have been cancelled: don't let asyncio report an unretrieved exception.
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()


def not_connected(server: str) -> TokenError:
    explanation = Explanation(
        f"The {server} has delegated tokens (a delegated token source, or graph.auth delegated), but no mailbox "
        "is connected (no refresh token).",
        "An admin connects the mailbox: Connect (consent) in the mail server settings.",
    )
    return TokenError(f"no refresh token: {explanation}", explanation=explanation, transient=False)


def smtp_token_source(
    server: MailServer,
    *,
    name: str = "mail server",
    store_refresh_token: RefreshStore | None = None,
    destinations: DestinationPolicy | None = None,
) -> TokenSource:
    """The token source of an SMTP (or EWS) server with oauth2 auth; `destinations`: where its
    token endpoint may be (the policy of the server's scope)."""
    auth = server.auth
    assert isinstance(auth, OAuth2AuthSettings)
    t = auth.token
    endpoint = ews_endpoint(t) if server.kind == "ews" else smtp_endpoint(t)
    c = server.connection
    timeout = (c.connect_timeout, c.protocol_timeout)
    if t.grant == "client_credentials":
        return TokenSource(endpoint, "client_credentials", margin=c.token_expiry_margin, timeout=timeout,
                           destinations=destinations)  # fmt: skip
    refresh_token = t.refresh_token.get_secret_value() if t.refresh_token else None
    if refresh_token is None:
        raise not_connected(name)
    return TokenSource(
        endpoint,
        "refresh_token",
        refresh_token,
        subject=auth.username.lower(),
        margin=c.token_expiry_margin,
        timeout=timeout,
        store_refresh_token=store_refresh_token,
        destinations=destinations,
    )


def graph_token_source(
    server: MailServer,
    *,
    name: str = "mail server",
    store_refresh_token: RefreshStore | None = None,
    destinations: DestinationPolicy | None = None,
) -> TokenSource:
    """The token source of a Graph server: the app's own token (client credentials), or for
    `graph.auth` delegated the consented mailbox's refresh token (rotations stored through
    `store_refresh_token`, as for SMTP). TokenError when nobody connected the mailbox yet."""
    g = server.graph
    assert g is not None
    c = server.connection
    timeout = (c.connect_timeout, c.protocol_timeout)
    if g.auth == "client_credentials":
        return TokenSource(graph_endpoint(g), "client_credentials", margin=c.token_expiry_margin, timeout=timeout,
                           destinations=destinations)  # fmt: skip
    refresh_token = g.refresh_token.get_secret_value() if g.refresh_token else None
    if refresh_token is None:
        raise not_connected(name)
    return TokenSource(
        graph_endpoint(g),
        "refresh_token",
        refresh_token,
        subject=g.mailbox.lower() if g.mailbox else None,
        margin=c.token_expiry_margin,
        timeout=timeout,
        store_refresh_token=store_refresh_token,
        destinations=destinations,
    )
