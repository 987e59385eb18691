"""OAuth2 token sources for XOAUTH2 and Graph, over httpx2 (no OAuth library).

- `endpoints`: where tokens come from, with the microsoft and google presets;
- `tokens`: one token request and its reply, and what a refusal means (`TokenError`);
- `cache`: one cache for all tenants, one refresh per key at a time, backoff on transient failures;
- `consent`: the delegated grant's authorization code + PKCE flow.
"""

from .cache import TokenCache, TokenSource, graph_token_source, smtp_token_source
from .endpoints import Endpoint, graph_endpoint, smtp_endpoint
from .tokens import AccessToken, TokenError

__all__ = [
    "AccessToken",
    "Endpoint",
    "TokenCache",
    "TokenError",
    "TokenSource",
    "graph_endpoint",
    "graph_token_source",
    "smtp_endpoint",
    "smtp_token_source",
]
