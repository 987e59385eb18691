"""The FastAPI application: routers, error replies, the request size limit, and (for
`mailgate serve`) the service's and the worker's lifetimes.

    app = create_app(mg)                 # over an open service (tests, embedding)
    app = create_app(database_url=…)     # opens it at start-up, closes it at shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Config
from ..service import Mailgate
from . import errors, health, messages, settings
from . import events as event_routes
from . import support as support_requests
from . import templates as template_routes
from .limits import MAX_TEST_EMAILS, MAX_TEST_EMAILS_PER_SCOPE, Slots

log = logging.getLogger("mailgate.api")


def create_app(
    mg: Mailgate | None = None,
    *,
    database_url: str | None = None,
    config: Config | None = None,
    worker: bool = False,
) -> FastAPI:
    """The API over `mg` (left open), or over a service opened at start-up from `database_url` and
    `config`. `worker`: run a delivery worker in the same process while the app runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = mg is None
        service = mg if mg is not None else await Mailgate.open(database_url, config=config, actor="api")
        app.state.mg = service
        stop = asyncio.Event()
        if worker:
            app.state.worker = service.new_worker()
            app.state.worker_task = asyncio.create_task(app.state.worker.run(stop))
        try:
            yield
        finally:
            stop.set()
            task = getattr(app.state, "worker_task", None)
            if task is not None:
                # The worker finishes the sends under way (stop_grace) and gives the rest back.
                await asyncio.gather(task, return_exceptions=True)
            if own:
                await service.aclose()

    app = FastAPI(
        title="mailgate",
        version=__version__,
        description="Outbound notification mail for multi-tenant applications. Every route but /healthz, "
        "/readyz and the OAuth callback needs an API token (`Authorization: Bearer mgt_…`).",
        lifespan=lifespan,
    )
    if mg is not None:
        app.state.mg = mg
    app.state.test_emails = Slots(MAX_TEST_EMAILS, MAX_TEST_EMAILS_PER_SCOPE)
    errors.install(app)
    app.include_router(messages.router)
    app.include_router(settings.router)
    app.include_router(health.router)
    app.include_router(support_requests.router)
    app.include_router(template_routes.router)
    app.include_router(event_routes.router)
    limit = (config or (mg.config if mg is not None else None) or Config.load()).max_request_size
    app.add_middleware(BodyLimit, limit=limit)
    from ..web import install as install_admin_ui

    install_admin_ui(app)  # after BodyLimit: the admin UI's headers go on its 413s too
    return app


# List items and object members in one JSON body, at most. The largest message the schemas allow
# has ~4,000 (1,000 recipients as {"address", "name"}, 100 headers, 100 attachments of 4 fields).
# Parsed and validated, two million of them cost seconds of the event loop, gigabytes, and a
# problem each: counted first on the bytes, a body with more is refused before anything parses it.
MAX_JSON_VALUES = 20_000
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{,]')
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b"[{,")


def too_many_json_values(body: bytes, limit: int = MAX_JSON_VALUES) -> bool:
    """Whether the JSON text `body` opens more than `limit` lists, objects and items in them, by its
    commas and brackets outside strings. Stops at the first one past `limit`. A body of a few long
    strings with many commas in them costs ~2 ns a byte, about what parsing it does."""
    if len(body) <= limit or len(body.translate(None, _NOT_STRUCTURE)) <= limit:
        return False  # fewer such bytes in all, strings included: ~0.5 ns a byte
    seen = 0
    for token in _JSON_TOKEN.finditer(body):
        seen += 1 if len(token.group()) == 1 else 0
        if seen > limit:
            return True
    return False


class BodyLimit:
    """Refuses a request body larger than `limit` bytes with 413, by its Content-Length or, when
    it is chunked, as soon as that many bytes arrived — before anything parses it. The body is read
    whole first (the routes read whole JSON bodies anyway), then handed on; a JSON body with more
    than MAX_JSON_VALUES items is refused (422) there too."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(scope, send)
                return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _json(scope) and too_many_json_values(body):
            why = f"the body holds more than {MAX_JSON_VALUES:,} JSON values (list items and object members)"
            await self._refuse(scope, send, errors.invalid([("", why)]))
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, response: Response | None = None) -> None:
        if response is None:
            response = errors.error(413, "payload_too_large", f"the request body is larger than {self.limit:,} "
                                    "bytes (MAILGATE_MAX_REQUEST_SIZE)")  # fmt: skip

        async def nothing() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, nothing, send)


def _json(scope: Scope) -> bool:
    """Whether the routes will read the body as JSON: it says so, or says nothing (FastAPI then
    tries JSON); forms and files are the admin UI's, which bounds its own."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind.endswith((b"/json", b"+json"))
    return True
