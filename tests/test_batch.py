"""POST /v1/messages/batch: up to 500 messages, each answered on its own in order (a bad one does
not refuse the others), idempotency keys per item, the valid ones committed together, and the
messages delivered by the worker to a real SMTP server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import event, func, select

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.db.models import MessageRow
from smtp_servers import RecordingServer, ServerConfig, serve, serve_in_thread

URL = "/v1/messages/batch"
Headers = dict[str, str]


@asynccontextmanager
async def api(
    mg: Mailgate,
) -> AsyncIterator[tuple[httpx2.AsyncClient, dict[str, str], dict[str, str], RecordingServer]]:
    async with serve(ServerConfig()) as peer:
        await mg.tenants.add("acme")
        await mg.tenants.add("globex")
        smtp = {"host": peer.host, "port": peer.port, "security": "none"}
        await mg.servers.set("global", {"from_address": "no-reply@example.com", "smtp": smtp})
        admin, _ = await mg.api_tokens.create("system-admin")
        sender, _ = await mg.api_tokens.create("sender", "acme")
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
            yield http, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {sender}"}, peer


async def count(mg: Mailgate) -> int:
    async with mg.db.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(MessageRow)) or 0)


def message(i: int, **extra: Any) -> dict[str, Any]:
    return {"to": [f"r{i}@example.org"], "subject": f"Invoice {i}", "text": f"Invoice {i} is ready.", **extra}


async def test_each_message_gets_its_own_answer_and_bad_ones_do_not_refuse_the_others(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, peer):
        body = {"messages": [
            message(0),
            {"to": ["not an address"], "subject": "bad address"},
            message(2, colour="red"),  # not a field
            message(3, tenant="globex"),  # another tenant's: does not exist for this token
            {"subject": "no recipient"},
            message(5),
        ]}  # fmt: skip
        reply = await http.post(URL, json=body, headers=sender)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r.get("error", {}).get("code") for r in results] == [
            None, "invalid_input", "invalid_input", "not_found", "invalid_input", None,
        ]  # fmt: skip
        assert results[1]["error"]["status"] == 422 and results[1]["error"]["problems"][0]["field"] == "to[0]"
        assert results[2]["error"]["problems"] == [{"field": "colour", "problem": "is not a field here"}]
        assert results[0]["tenant"] == "acme" and results[0]["status"] == "queued" and results[0]["replayed"] is False
        assert await count(mg) == 2
        # Each id is its own message, and the worker delivers them to a real SMTP server.
        for i in (0, 5):
            detail = (await http.get(f"/v1/messages/{results[i]['id']}", headers=sender)).json()
            assert detail["subject"] == f"Invoice {i}"
        await mg.run_worker(until_idle=True)
        assert sorted(tuple(m.rcpt_tos) for m in peer.messages) == [("r0@example.org",), ("r5@example.org",)]


async def test_a_batch_takes_notification_templates_each_checked_on_its_own(mg: Mailgate) -> None:
    data = {"inviter_name": "Ada", "organization": "Acme", "accept_url": "https://a.example", "expires_at": "1 mei"}
    async with api(mg) as (http, _, sender, _peer):
        body = {"messages": [
            {"to": ["r0@example.org"], "template": "invitation", "locale": "nl", "data": data},
            {"to": ["r1@example.org"], "template": "invitation", "data": dict(data)},
            {"to": ["r2@example.org"], "template": "invitation", "data": {"inviter_name": "Ada"}},
        ]}  # fmt: skip
        del body["messages"][1]["data"]["accept_url"]
        results = (await http.post(URL, json=body, headers=sender)).json()["results"]
        assert "error" not in results[0]
        detail = (await http.get(f"/v1/messages/{results[0]['id']}", headers=sender)).json()
        single = await mg.templates.render("invitation", "nl", "acme", data)
        assert detail["subject"] == single.subject and "Acme" in detail["subject"]
        assert [p["field"] for p in results[1]["error"]["problems"]] == ["data.accept_url"]
        assert {"data.organization", "data.accept_url", "data.expires_at"} <= {
            p["field"] for p in results[2]["error"]["problems"]}  # fmt: skip
        assert await count(mg) == 1


async def test_idempotency_keys_per_item(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        first = await http.post(URL, json={"messages": [message(1, idempotency_key="inv-1")]}, headers=sender)
        [done] = first.json()["results"]
        again = await http.post(URL, headers=sender, json={"messages": [
            message(1, idempotency_key="inv-1"),  # stored before
            message(2, idempotency_key="inv-2"),
            message(2, idempotency_key="inv-2"),  # twice in one batch: one message
            message(3, idempotency_key="bad\nkey"),
        ]})  # fmt: skip
        r = again.json()["results"]
        assert r[0]["id"] == done["id"] and r[0]["replayed"] is True
        assert r[1]["replayed"] is False and r[2] == {**r[1], "replayed": True}
        assert r[3]["error"]["problems"][0]["field"] == "idempotency_key"
        assert await count(mg) == 2


async def test_the_valid_messages_are_committed_together(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        commits = [0]

        def on_commit(*_: Any) -> None:
            commits[0] += 1

        event.listen(mg.db.engine.sync_engine, "commit", on_commit)
        reply = await http.post(URL, json={"messages": [message(i) for i in range(200)]}, headers=sender)
        event.remove(mg.db.engine.sync_engine, "commit", on_commit)
        assert len({r["id"] for r in reply.json()["results"]}) == 200
        assert commits[0] <= 3, f"{commits[0]} transactions for one batch of 200"  # the token's last_used_at too


async def test_bounds_and_roles(mg: Mailgate) -> None:
    async with api(mg) as (http, admin, sender, _peer):
        too_many = await http.post(URL, json={"messages": [message(i) for i in range(501)]}, headers=sender)
        assert too_many.status_code == 422 and too_many.json()["problems"][0]["field"] == "messages"
        empty = await http.post(URL, json={"messages": []}, headers=sender)
        assert empty.status_code == 422
        tenant_admin, _ = await mg.api_tokens.create("tenant-admin", "acme")
        forbidden = await http.post(URL, json={"messages": [message(1)]},
                                    headers={"Authorization": f"Bearer {tenant_admin}"})  # fmt: skip
        assert forbidden.status_code == 403
        # A system admin names the tenant for the batch, or per message.
        mixed = await http.post(URL, headers=admin, json={"tenant": "acme", "messages": [
            message(1), message(2, tenant="globex"), message(3, tenant="nobody"), message(4, tenant=None),
        ]})  # fmt: skip
        r = mixed.json()["results"]
        assert [x.get("tenant") for x in r] == ["acme", "globex", None, "acme"]
        assert r[2]["error"]["code"] == "not_found"
        no_tenant = await http.post(URL, headers=admin, json={"messages": [message(1)]})
        assert no_tenant.json()["results"][0]["error"]["problems"][0]["field"] == "tenant"


async def test_sending_disabled_answers_each_message(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        await mg.servers.disable("global")
        reply = await http.post(URL, json={"messages": [message(1), message(2)]}, headers=sender)
        assert [r["error"]["code"] for r in reply.json()["results"]] == ["sending_disabled"] * 2
        assert await count(mg) == 0


async def test_concurrent_batches(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        replies = await asyncio.gather(*(http.post(URL, json={"messages": [message(i * 10 + j) for j in range(10)]},
                                                   headers=sender) for i in range(5)))  # fmt: skip
        assert all(r.status_code == 200 for r in replies)
        assert await count(mg) == 50


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_posts_a_batch_to_mailgate_serve_and_the_worker_delivers_it(tmp_path: Path) -> None:
    from test_serve import Served

    env = {**{k: v for k, v in os.environ.items() if k not in ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")},
           "MAILGATE_SECRET_KEYS": TEST_KEY, "MAILGATE_POLL_INTERVAL": "0.1"}  # fmt: skip
    served = Served(tmp_path, env, [])
    try:
        with serve_in_thread() as peer:
            served.cli("tenants", "add", "acme")
            smtp = {"host": peer.host, "port": peer.port, "security": "none"}
            (tmp_path / "g.json").write_text(json.dumps({"from_address": "no-reply@example.com", "smtp": smtp}))
            served.cli("servers", "set", "global", "--file", str(tmp_path / "g.json"))
            token = json.loads(served.cli("tokens", "create", "--role", "sender", "--tenant", "acme", "--json"))[
                "token"
            ]
            body = {"messages": [message(1), {"to": ["nobody"]}, message(3, idempotency_key="k3")]}
            done = subprocess.run(
                ["curl", "-sS", "-X", "POST", f"{served.url}{URL}", "-H", f"Authorization: Bearer {token}",
                 "-H", "Content-Type: application/json", "--data-binary", json.dumps(body)],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            results = json.loads(done.stdout)["results"]
            assert "id" in results[0] and results[1]["error"]["code"] == "invalid_input" and "id" in results[2]
            got = peer.wait_for_messages_sync(2, timeout=30)
        assert sorted(m.rcpt_tos[0] for m in got) == ["r1@example.org", "r3@example.org"]
    finally:
        assert served.stop() == 0
