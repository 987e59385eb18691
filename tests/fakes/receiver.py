"""A webhook receiver on 127.0.0.1, strict as a real one should be: POST to its one path only,
JSON only, and every delivery checked with the `standardwebhooks` package (the reference Python
library of the spec, not mailgate's code) before it is accepted. It answers from a script of
replies (status, body, headers), then 204s; what it got and what it answered is recorded."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from fakes.identity import HTTPRequest, HTTPResponse, ThreadedFake

PATH = "/hooks/mailgate"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int
    event: dict[str, Any] | None = None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0


class WebhookReceiver(ThreadedFake):
    def __init__(self, secret: str | None = None, replies: list[Reply] | None = None) -> None:
        super().__init__()
        self.secret = secret
        self.replies: deque[Reply] = deque(replies or [])
        self.deliveries: list[Delivery] = []
        self.got = threading.Event()

    @property
    def hook_url(self) -> str:
        return self.url + PATH

    def _handle(self, request: HTTPRequest) -> HTTPResponse:
        if request.path != PATH:
            return HTTPResponse(404, b"not found")
        if request.method != "POST":
            return HTTPResponse(405, b"method not allowed", [("Allow", "POST")])
        if request.headers.get("content-type") != "application/json":
            return HTTPResponse(415, b"JSON only")
        verified, event = False, None
        if self.secret is not None:
            try:
                event = Webhook(self.secret).verify(request.body, request.headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        with self._lock:
            reply = self.replies.popleft() if self.replies else Reply(204)
        if reply.delay:
            threading.Event().wait(reply.delay)
        status = reply.status if verified or self.secret is None else 401
        with self._lock:
            self.deliveries.append(Delivery(dict(request.headers), request.body, verified, status, event))
        self.got.set()
        return HTTPResponse(status, reply.body if status != 401 else b'{"error":"bad signature"}', reply.headers)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(d.body) for d in self.deliveries]
