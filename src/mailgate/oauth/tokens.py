"""One token request (RFC 6749 §4.1.3, §4.4, §6) and what its reply means.

Client authentication is a form post (`client_id` and `client_secret` in the body) or HTTP basic
(RFC 6749 §2.3.1: both form-urlencoded, then base64), never both. A refusal becomes a
`TokenError` carrying the endpoint's `error`, AADSTS codes and trace id as data, with the
catalogue's explanation; whether it is transient decides between backoff and a broken server.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

from .._http import MAX_REPLY, TooLarge, read_capped
from .._http import retry_after as http_retry_after
from ..diagnostics.catalogue import Explanation, explain_token_error
from ..errors import DeliveryError, foreign_text
from .endpoints import Endpoint

if TYPE_CHECKING:
    import httpx2

DEFAULT_LIFETIME = 3600.0  # when a reply leaves out expires_in (RFC 6749 only recommends it)
_OAUTH_ERROR = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,100}")  # RFC 6749 §5.2's characters, bounded
_TRACE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True)
class AccessToken:
    """A bearer token. `renew_at` is when to stop using it (its expiry less the margin): the cache
    fetches a new one from then on, and an SMTP connection authenticated with it is closed."""

    value: str = field(repr=False)
    expires_at: float
    renew_at: float
    scope: str | None = None


@dataclass(frozen=True)
class TokenReply:
    access_token: str = field(repr=False)
    expires_in: float
    scope: str | None
    refresh_token: str | None = field(repr=False, default=None)
    id_token: str | None = field(repr=False, default=None)  # OpenID Connect: who signed in (a consent)


class TokenError(DeliveryError):
    """The token endpoint refused, or could not be asked. `error` is the OAuth error
    (invalid_client, invalid_grant, …), `error_codes` the AADSTS numbers Entra ID adds,
    `explanation` the catalogue's cause and fix. `code` is the HTTP status, when there was one."""

    def __init__(
        self,
        message: str,
        *,
        explanation: Explanation,
        error: str | None = None,
        error_codes: list[int] | None = None,
        trace_id: str | None = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("transient", explanation.transient)
        super().__init__(message, **kw)
        self.explanation = explanation
        self.error = error
        self.error_codes = error_codes or []
        self.trace_id = trace_id


async def request_token(
    http: httpx2.AsyncClient, endpoint: Endpoint, grant: dict[str, str], *, timeout: tuple[float, float]
) -> TokenReply:
    """POST `grant` (grant_type and its fields) to the endpoint with the client's credentials.
    `timeout` is (connect, read) in seconds."""
    import httpx2

    form = dict(grant)
    headers = {"Accept": "application/json"}
    if endpoint.client_secret is not None and endpoint.client_auth == "basic":
        pair = f"{quote_plus(endpoint.client_id)}:{quote_plus(endpoint.client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form["client_id"] = endpoint.client_id
        if endpoint.client_secret is not None:
            form["client_secret"] = endpoint.client_secret
    where = endpoint.token_url
    connect, read = timeout
    try:
        async with http.stream(
            "POST", endpoint.token_url, data=form, headers=headers, timeout=httpx2.Timeout(read, connect=connect)
        ) as r:
            content = await read_capped(r, MAX_REPLY)
    except httpx2.TimeoutException:
        raise _unreachable(f"the token endpoint {where} did not answer within {read:g} s") from None
    except (httpx2.ProtocolError, httpx2.DecodingError, TooLarge) as e:
        # Never the peer's bytes (h11 quotes them): a token URL may point at any kind of server.
        raise _unreachable(f"the token endpoint {where} did not answer as an HTTP server would "
                           f"({type(e).__name__})") from None  # fmt: skip
    except httpx2.HTTPError as e:
        raise _unreachable(f"cannot reach the token endpoint {where}: {e or type(e).__name__}") from None
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if r.status_code == 200 and isinstance(body, dict) and isinstance(body.get("access_token"), str):
        kind = str(body.get("token_type", "Bearer"))
        if kind.lower() != "bearer":
            raise _refused(f"the token endpoint {where} issued a {kind} token; XOAUTH2 and Graph need a Bearer token",
                           r.status_code, None, transient=False)  # fmt: skip
        return TokenReply(
            body["access_token"],
            _seconds(body.get("expires_in")),
            body.get("scope") if isinstance(body.get("scope"), str) else None,
            body.get("refresh_token") if isinstance(body.get("refresh_token"), str) else None,
            body.get("id_token") if isinstance(body.get("id_token"), str) else None,
        )
    # Never shown, even when the endpoint echoes them.
    secrets = (endpoint.client_secret, grant.get("refresh_token"), grant.get("code"), grant.get("code_verifier"))
    return _raise_refusal(where, r.status_code, body if isinstance(body, dict) else None, r.headers.get("Retry-After"),
                          secrets)  # fmt: skip


def _raise_refusal(
    where: str, status: int, body: dict[str, Any] | None, retry_after: str | None, secrets: tuple[str | None, ...]
) -> TokenReply:
    # Only what an OAuth endpoint says (RFC 6749 §5.2: error, error_description; Entra ID adds
    # error_codes and trace_id), each bounded: a tenant's token URL may point anywhere, and its
    # reply is shown to the tenant's admin and stored.
    error = body.get("error") if body else None
    error = error if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error) else None
    codes = [c for c in (body or {}).get("error_codes", []) if isinstance(c, int)][:10]
    description = (body or {}).get("error_description")
    first_line = foreign_text(description, secrets=secrets) if isinstance(description, str) else ""
    trace = (body or {}).get("trace_id")
    trace = trace if isinstance(trace, str) and _TRACE_ID.fullmatch(trace) else None
    explanation = explain_token_error(error, codes, status)
    said = " ".join(x for x in (error, f"({first_line})" if first_line else "") if x) or f"HTTP {status}"
    message = f"the token endpoint {where} refused: {said}. {explanation}"
    raise TokenError(
        message,
        explanation=explanation,
        error=error,
        error_codes=codes,
        trace_id=trace,
        code=status,
        reply=first_line or None,
        retry_after=http_retry_after(retry_after),
    )


def _unreachable(what: str) -> TokenError:
    explanation = explain_token_error("temporarily_unavailable")
    return TokenError(f"{what}; mailgate tries again with backoff", explanation=explanation, transient=True)


def _refused(what: str, status: int, error: str | None, *, transient: bool) -> TokenError:
    return TokenError(what, explanation=explain_token_error(error, None, status), code=status, transient=transient)


def _seconds(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME
    return seconds if seconds > 0 else DEFAULT_LIFETIME


def decode_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT access token, unverified (for diagnostics: audience, roles, expiry),
    or None when the token is not a JWT (Google's are opaque)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None
