"""The HTTP client for token endpoints and Graph: httpx2, made only when first needed (its
import costs ~150 ms, which the CLI's quick commands should not pay).

A client made for a destination policy (destinations.py) resolves every host itself, checks each
address, and connects only to an address it checked: a tenant's token URL or Graph endpoint
can't reach the operator's network, not even through a name that resolves there, or resolves
there the second time it is asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx2

    from .destinations import DestinationPolicy

USER_AGENT = "mailgate/0.1"
MAX_REPLY = 1 << 20  # bytes of a token endpoint's or Graph's reply: theirs are a few KB


class TooLarge(Exception):
    """A reply longer than the caller's limit: not what a token endpoint or Graph sends."""


async def read_capped(response: httpx2.Response, limit: int) -> bytes:
    """The body of a streamed response, or TooLarge once it passes `limit` bytes (a hostile
    server's endless reply is never held in memory)."""
    chunks = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the reply is larger than {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delay form; a date is not worth trusting), or None."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def new_client(destinations: DestinationPolicy | None = None) -> httpx2.AsyncClient:
    """A client for token endpoints and Graph; with `destinations`, one that connects only where
    that policy allows (and then ignores HTTP(S)_PROXY from the environment: a proxy would
    connect on our behalf, out of the policy's sight)."""
    import httpx2

    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=50)
    transport = _guarded_transport(destinations, limits) if destinations is not None else None
    # Redirects are not followed: a token endpoint or Graph never redirects a POST we make, and
    # following one could carry a client secret or bearer token somewhere else.
    return httpx2.AsyncClient(
        follow_redirects=False, headers={"User-Agent": USER_AGENT}, limits=limits, transport=transport
    )


def _guarded_transport(policy: DestinationPolicy, limits: httpx2.Limits) -> httpx2.AsyncBaseTransport:
    import httpcore2
    import httpx2
    from httpcore2 import AsyncNetworkBackend, AsyncNetworkStream

    class GuardedBackend(AsyncNetworkBackend):
        """Resolves and checks the host, then connects to one of its checked addresses."""

        def __init__(self) -> None:
            self._inner = httpcore2.AnyIOBackend()

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> AsyncNetworkStream:
            try:
                async with asyncio.timeout(timeout):
                    addresses = await policy.resolve(host, port)
            except TimeoutError:
                raise httpcore2.ConnectTimeout(f"resolving {host} took longer than {timeout:g} s") from None
            except OSError as e:
                raise httpcore2.ConnectError(f"cannot resolve {host}: {e.strerror or e}") from None
            failure: Exception | None = None
            for address in addresses:
                try:
                    return await self._inner.connect_tcp(
                        address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                    )
                except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as e:
                    failure = e
            assert failure is not None
            raise failure

        async def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
        ) -> AsyncNetworkStream:
            raise httpcore2.ConnectError("mailgate does not connect to unix sockets")

        async def sleep(self, seconds: float) -> None:
            await self._inner.sleep(seconds)

    transport = httpx2.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx takes no network backend; its pool does. Same pool as httpx makes, our backend.
    transport._pool = httpcore2.AsyncConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(),
    )
    return transport
