"""The headers every response under /admin carries: no other site may frame the admin UI (a
clickjacking page could make an admin press "Remove…" or "Connect"), and nothing is kept in a
shared cache or the back-button cache (pages show settings, messages, and the CSRF token).

Static files (htmx, the stylesheet) are the same for everyone and hold nothing of anyone's: they
may be cached, and only get the framing headers.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .session import ADMIN

STATIC = f"{ADMIN}/static/"
NOT_FRAMED = "frame-ancestors 'none'"


def is_admin(path: str) -> bool:
    return path == ADMIN or path.startswith(ADMIN + "/")


def harden(headers: MutableHeaders, path: str) -> None:
    """Add the admin UI's headers to a response's `headers` (idempotent).

    A Content-Security-Policy the page set keeps its directives; `frame-ancestors 'none'` joins
    it unless the page says itself who may frame it (captured mail's html, framed by its own
    page). Browsers enforce every policy they are sent, so it joins the page's policy rather
    than coming as a second one that would forbid what the page allows.
    """
    policies = headers.getlist("content-security-policy")
    if not any(_directive(p, "frame-ancestors") for p in policies):
        first = policies[0].strip().rstrip(";").rstrip() if policies else ""
        policies[:1] = [f"{first}; {NOT_FRAMED}" if first else NOT_FRAMED]
        del headers["content-security-policy"]
        for policy in policies:
            headers.append("Content-Security-Policy", policy)
    headers.setdefault("X-Frame-Options", "DENY")  # for browsers without CSP frame-ancestors
    if not path.startswith(STATIC):
        headers["Cache-Control"] = "no-store"


def _directive(policy: str, name: str) -> bool:
    return any(part.split(maxsplit=1)[:1] == [name] for part in policy.lower().split(";"))


class AdminHeaders:
    """ASGI middleware: `harden` on every response under /admin, whichever route, redirect or
    error made it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not is_admin(path):
            await self.app(scope, receive, send)
            return

        async def hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                harden(MutableHeaders(scope=message), path)
            await send(message)

        await self.app(scope, receive, hardened)
