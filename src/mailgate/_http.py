"""The HTTP client for token endpoints and Graph: httpx2, made only when first needed (its
import costs ~150 ms, which the CLI's quick commands should not pay)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx2

USER_AGENT = "mailgate/0.1"


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delay form; a date is not worth trusting), or None."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def new_client() -> httpx2.AsyncClient:
    import httpx2

    # Redirects are not followed: a token endpoint or Graph never redirects a POST we make, and
    # following one could carry a client secret or bearer token somewhere else.
    return httpx2.AsyncClient(
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50),
    )
