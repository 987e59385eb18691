"""The test e-mail over the HTTP API, through a real server (uvicorn on 127.0.0.1, in the test's
loop): how many run at once (per mail server, and in all), and a run stopped when its client goes
away — seen by a mail server that never answers, which receives QUIT as soon as the client left
instead of waiting out the 30 s greeting timeout."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import uvicorn

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.api.limits import BUSY_RETRY_AFTER, MAX_TEST_EMAILS, MAX_TEST_EMAILS_PER_SCOPE
from mailgate.config import Config
from smtp_servers import ScriptedServer, ServerConfig, scripted, serve

# The silent server's greeting never comes: only a cancelled run ends before this.
SLOW = {"connect_timeout": 30, "protocol_timeout": 30}


def server_doc(port: int) -> dict[str, Any]:
    return {"kind": "smtp", "from_address": "no-reply@example.com", "connection": SLOW,
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none"}}  # fmt: skip


@dataclass
class Served:
    mg: Mailgate
    url: str
    admin: dict[str, str]


@contextlib.asynccontextmanager
async def uvicorn_serving(mg: Mailgate) -> AsyncIterator[str]:
    """The API over `mg` on 127.0.0.1:<free port>; stopped (gracefully, then bounded) at exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(mg), lifespan="off", log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            assert not task.done(), task
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@pytest.fixture
async def served(tmp_path: Any) -> AsyncIterator[Served]:
    config = Config(tenant_networks="loopback")  # the tenants' test e-mails go to the silent server too
    async with Mailgate.open(f"sqlite:///{tmp_path}/m.db", secret_keys=TEST_KEY, config=config) as mg:
        admin, _ = await mg.api_tokens.create("system-admin", name="ops")
        async with uvicorn_serving(mg) as url:
            yield Served(mg, url, {"Authorization": f"Bearer {admin}"})


async def _wait_for(silent: ScriptedServer, connections: int) -> None:
    await silent.wait_until(lambda: silent.connection_count >= connections, timeout=10)


async def test_test_emails_are_bounded_per_mail_server_and_in_all_and_stop_when_the_client_leaves(
    served: Served,
) -> None:
    tenants = [f"t{i}" for i in range(MAX_TEST_EMAILS // MAX_TEST_EMAILS_PER_SCOPE)]  # the global one makes 1 more
    async with scripted("silent") as silent:
        await served.mg.servers.set("global", server_doc(silent.port))
        for tenant in tenants:
            await served.mg.tenants.add(tenant, may_use_own_server=True)
            await served.mg.servers.set(tenant, server_doc(silent.port))
        async with httpx2.AsyncClient(base_url=served.url, headers=served.admin, timeout=60) as http:

            def start(scope_path: str) -> asyncio.Task[httpx2.Response]:
                return asyncio.ensure_future(http.post(f"{scope_path}/test", json={"to": "bob@example.org"}))

            hanging = [start("/v1/servers/global") for _ in range(MAX_TEST_EMAILS_PER_SCOPE)]
            await _wait_for(silent, MAX_TEST_EMAILS_PER_SCOPE)
            busy = await http.post("/v1/servers/global/test", json={"to": "bob@example.org"})
            assert busy.status_code == 429 and busy.json()["code"] == "too_many_requests", busy.text
            assert busy.headers["retry-after"] == str(BUSY_RETRY_AFTER)
            assert "under way for global" in busy.json()["message"]

            # Another mail server's test is not held up by the global one's, until all are taken.
            for tenant in tenants[:-1]:
                hanging += [start(f"/v1/tenants/{tenant}/server") for _ in range(MAX_TEST_EMAILS_PER_SCOPE)]
            await _wait_for(silent, MAX_TEST_EMAILS)
            assert silent.connection_count == MAX_TEST_EMAILS and not any(t.done() for t in hanging)
            busy = await http.post(f"/v1/tenants/{tenants[-1]}/server/test", json={"to": "bob@example.org"})
            assert busy.status_code == 429 and f"{MAX_TEST_EMAILS} test e-mails are under way" in busy.json()["message"]
            assert silent.connection_count == MAX_TEST_EMAILS  # refused before it connected anywhere

            for task in hanging:  # the clients give up: their connections to mailgate close
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
        # Each run was stopped: it said QUIT at once, instead of waiting 30 s for the greeting.
        await silent.wait_until(lambda: all(b"QUIT" in c.received for c in silent.connections), timeout=10)
    # The silent server gone, the runs end and give their places back: a test e-mail goes through.
    async with serve(ServerConfig()) as smtp:
        await served.mg.servers.set("global", {**server_doc(smtp.port), "connection": {}})
        async with httpx2.AsyncClient(base_url=served.url, headers=served.admin, timeout=60) as http:
            for _ in range(100):
                reply = await http.post("/v1/servers/global/test", json={"to": "bob@example.org"})
                if reply.status_code != 429:
                    break
                await asyncio.sleep(0.1)
    assert reply.status_code == 200 and reply.json()["ok"] is True, reply.text
    assert [m.rcpt_tos for m in smtp.messages] == [["bob@example.org"]]
