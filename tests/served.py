"""A real `mailgate serve` process (API and worker) delivering to a real SMTP server on 127.0.0.1,
with tenant acme and a sender token: what the Python client and the Django backend talk to."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from conftest import TEST_KEY
from smtp_servers import RecordingServer, serve_in_thread
from test_serve import Served


@dataclass
class Mailgate:
    process: Served
    url: str
    admin: str  # a system-admin token
    sender: str  # acme's sender token
    smtp: RecordingServer


@contextmanager
def served_with_smtp(directory: Path) -> Iterator[Mailgate]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")}
    env.update(MAILGATE_SECRET_KEYS=TEST_KEY, MAILGATE_POLL_INTERVAL="0.1")
    process = Served(directory, env, [])
    try:
        admin = process.cli("tokens", "create", "--role", "system-admin").strip()
        with serve_in_thread() as smtp:
            with httpx2.Client(base_url=process.url, headers={"Authorization": f"Bearer {admin}"}, timeout=10) as http:
                assert http.post("/v1/tenants", json={"id": "acme"}).status_code == 201
                # from_policy any: the clients' tests check that a message's own From arrives.
                server = {"from_address": "no-reply@example.com", "from_policy": "any",
                          "smtp": {"host": smtp.host, "port": smtp.port, "security": "none"}}  # fmt: skip
                assert http.put("/v1/servers/global", json=server).status_code == 200
            sender = json.loads(process.cli("tokens", "create", "--role", "sender", "--tenant", "acme", "--json"))
            yield Mailgate(process, process.url, admin, sender["token"], smtp)
    finally:
        if process.process.poll() is None:
            process.stop()
