"""Credential health: what the workers learn of each mail server (last success, last failure with
its explanation, the access token's expiry) and what is known of coming expiries, shown by
`mailgate servers health` and GET …/server/health."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_KEY
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, Message
from mailgate.config import Config
from smtp_servers import ServerConfig, serve

PASSWORD = "correct horse battery staple"
TENANT_ID = "0b8e4a5c-1d2f-4e3a-9b7c-5d6e7f8a9b0c"
CLIENT = "11111111-2222-3333-4444-555555555555"
SECRET = "Qx~8Q~secret.value-that-is-long_enough"
MAILBOX = "noreply@contoso.example"


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    # tenant_networks: the tenants' own servers run on 127.0.0.1 here.
    config = Config(
        retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, tenant_networks="loopback"
    )
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=config) as opened:
        await opened.tenants.add("acme")
        yield opened


def smtp_doc(server: Any, password: str = PASSWORD) -> dict[str, Any]:
    return {"from_address": "no-reply@example.com",
            "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "auth": {"method": "password", "username": "user@example.com", "password": password},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


PLAIN = ServerConfig(security="none", auth={"PLAIN"}, auth_require_tls=False, password=PASSWORD)


async def test_a_delivery_then_a_refusal_show_in_the_health(mg: Mailgate) -> None:
    async with serve(PLAIN) as server:
        await mg.servers.set("global", smtp_doc(server))
        assert (await mg.servers.health("global")).status == "unknown"
        await mg.submit("acme", Message(to="bob@example.org", subject="s", text="t"))
        before = datetime.now(UTC)
        await mg.run_worker(until_idle=True)
        health = await mg.servers.health("global")
        assert health.status == "ok" and health.last_success_at is not None and health.last_success_at >= before
        assert health.last_failure_at is None

        await mg.servers.set("global", smtp_doc(server, password="wrong"))
        await mg.submit("acme", Message(to="bob@example.org", subject="s", text="t"))
        await mg.run_worker(until_idle=True)
    shown = (await mg.servers.health("global")).to_dict()
    assert shown["status"] == "broken" and "535" in shown["broken"]["reason"]
    failure = shown["last_failure"]
    assert (
        failure is not None and "535" in failure["text"] and "Fix: Check the user name and password" in failure["text"]
    )
    assert shown["last_success_at"] is not None  # the earlier success is still known
    assert "wrong" not in json.dumps(shown)


async def test_an_oauth2_server_shows_its_token_expiry_and_the_secret_note(mg: Mailgate) -> None:
    with FakeIdentityProvider() as idp:
        idp.add_tenant(TENANT_ID)
        idp.add_app(CLIENT, SECRET, roles=("SMTP.SendAsApp",))
        config = ServerConfig(security="none", auth={"XOAUTH2"}, auth_require_tls=False, username=MAILBOX,
                              xoauth2_style="exchange", token_check=idp.check)  # fmt: skip
        async with serve(config) as server:
            token = {"grant": "client_credentials", "provider": "microsoft", "authority": idp.url,
                     "directory_id": TENANT_ID, "client_id": CLIENT, "client_secret": SECRET}  # fmt: skip
            await mg.servers.set("global", {
                "from_address": MAILBOX, "smtp": {"host": server.host, "port": server.port, "security": "none"},
                "auth": {"method": "oauth2", "username": MAILBOX, "token": token}})  # fmt: skip
            await mg.submit("acme", Message(to="bob@example.org", subject="s", text="t"))
            now = datetime.now(UTC).timestamp()
            await mg.run_worker(until_idle=True)
    health = await mg.servers.health("global")
    assert health.status == "ok" and health.token_expires_at is not None
    assert 3000 < health.token_expires_at.timestamp() - now < 3700  # the fake's tokens live 3599 s
    assert any("AADSTS7000222" in n and "Certificates & secrets" in n for n in health.notes)


async def test_servers_health_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/h.db"
    async with Mailgate.open(url, secret_keys=TEST_KEY) as mg:
        await mg.tenants.add("acme")
        async with serve(PLAIN) as server:
            await mg.servers.set("global", smtp_doc(server))
            await mg.submit("acme", Message(to="bob@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
    env = {**os.environ, "MAILGATE_SECRET_KEYS": TEST_KEY, "MAILGATE_DATABASE_URL": url}
    mailgate = str(Path(sys.executable).with_name("mailgate"))
    done = subprocess.run([mailgate, "servers", "health"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("global (version 1, smtp): ok") and "last success:  20" in done.stdout
    shown = json.loads(subprocess.run([mailgate, "servers", "health", "global", "--json"], env=env,
                                      capture_output=True, text=True, timeout=60, check=True).stdout)  # fmt: skip
    assert shown[0]["status"] == "ok" and PASSWORD not in json.dumps(shown)


async def test_a_broken_tenant_server_is_told_once_to_the_tenant_admin_through_the_global_server(
    mg: Mailgate,
) -> None:
    await mg.tenants.update("acme", may_use_own_server=True, admin_address="it@acme.example")
    async with serve(PLAIN) as own, serve(ServerConfig()) as global_server:
        await mg.servers.set("global", {"from_address": "no-reply@operator.example",
                                        "smtp": {"host": global_server.host, "port": global_server.port,
                                                 "security": "none"}})  # fmt: skip
        await mg.servers.set("acme", smtp_doc(own, password="wrong"))
        for i in range(3):
            await mg.submit("acme", Message(to=f"r{i}@example.org", subject="invitation", text="t"))
        await mg.run_worker(until_idle=True)
        await mg.run_worker(until_idle=True)  # again: still one notice, not one per message or per round
    [notice] = global_server.messages
    assert notice.rcpt_tos == ["it@acme.example"] and notice.mail_from == "no-reply@operator.example"
    parsed = notice.parsed()
    assert "Mail of acme is waiting" in parsed["Subject"]
    body = parsed.get_content()
    assert "535" in body and "Fix:" in body and "wrong" not in body
    assert own.messages == []
