"""The HTTP API in process (ASGI): submitting, bad input of every kind, secrets write-only, tokens,
the delegated consent's callback, metrics. The route × role matrix is in test_api_matrix.py; the
real server process (`mailgate serve`) in test_serve.py."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from sqlalchemy import select, text

from conftest import TEST_KEY
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.db.models import ApiToken, MessageRow
from smtp_servers import ServerConfig, serve

FAST = Config(
    retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, max_request_size=64 * 1024, tenant_networks="loopback"
)  # the tenants' servers and identity providers run on 127.0.0.1 here
PASSWORD = "s3cret-Pa55word-for-the-relay"


def smtp_doc(host: str = "127.0.0.1", port: int = 2525, **auth: Any) -> dict[str, Any]:
    return {"kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
            "smtp": {"host": host, "port": port, "security": "none"},
            "auth": auth or {"method": "none"},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


@dataclass
class Api:
    mg: Mailgate
    client: httpx2.AsyncClient
    admin: dict[str, str]  # headers of a system-admin token
    sender: dict[str, str]  # headers of acme's sender token

    async def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx2.Response:
        return await self.client.post("/v1/messages", json=body, headers=self.sender if headers is None else headers)


A = TypeVar("A", bound=Api)


@asynccontextmanager
async def api_of(database_url: str, config: Config, kind: type[A]) -> AsyncIterator[A]:
    """The API in process over a new service: tenant acme (which may use its own server), the
    global server, a system-admin token and acme's sender token."""
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="setup", config=config) as mg:
        await mg.tenants.add("acme", may_use_own_server=True)
        await mg.servers.set("global", smtp_doc())
        admin, _ = await mg.api_tokens.create("system-admin", name="ops")
        sender, _ = await mg.api_tokens.create("sender", "acme")
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
            yield kind(mg, client, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {sender}"})


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with api_of(database_url, FAST, Api) as opened:
        yield opened


def problems(reply: httpx2.Response) -> dict[str, str]:
    return {p["field"]: p["problem"] for p in reply.json().get("problems", [])}


# ---- submitting --------------------------------------------------------------------------------


async def test_submitted_message_is_stored_queued(api: Api) -> None:
    reply = await api.submit({"to": ["Bob <bob@example.org>", {"address": "eve@example.org", "name": "Eve"}],
                              "subject": "Welcome", "text": "hi", "headers": {"X-Campaign": "w1"},
                              "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                               "content_base64": base64.b64encode(b"hello").decode()}]})  # fmt: skip
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["tenant"] == "acme" and body["status"] == "queued"
    assert reply.headers["location"] == f"/v1/messages/{body['id']}"
    shown = (await api.client.get(f"/v1/messages/{body['id']}", headers=api.sender)).json()
    assert shown["subject"] == "Welcome" and [r["recipient"] for r in shown["recipient_outcomes"]] == [
        "bob@example.org", "eve@example.org"]  # fmt: skip
    assert shown["recipients"] == {"pending": 2, "accepted": 0, "failed": 0}


async def test_same_idempotency_key_answers_the_first_message(api: Api) -> None:
    body = {"to": ["bob@example.org"], "subject": "Reset your password", "text": "…"}
    first = await api.submit(body, {**api.sender, "Idempotency-Key": "reset-42"})
    again = await api.submit(body, {**api.sender, "Idempotency-Key": "reset-42"})
    other = await api.submit(body, {**api.sender, "Idempotency-Key": "reset-43"})
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert (first.status_code, again.status_code) == (202, 200) and again.json()["replayed"] is True
    async with api.mg.db.sessions() as s:
        assert await s.scalar(select(text("count(*)")).select_from(MessageRow)) == 2


async def test_system_admin_names_the_tenant(api: Api) -> None:
    reply = await api.submit({"to": ["bob@example.org"], "subject": "s", "text": "t"}, api.admin)
    assert reply.status_code == 422 and "tenant" in problems(reply)
    reply = await api.submit({"tenant": "acme", "to": ["bob@example.org"], "subject": "s"}, api.admin)
    assert reply.status_code == 202
    reply = await api.submit({"tenant": "nobody", "to": ["bob@example.org"], "subject": "s"}, api.admin)
    assert reply.status_code == 404 and reply.json()["code"] == "not_found"


async def test_sending_disabled_refuses_with_the_reason(api: Api) -> None:
    assert (await api.client.post("/v1/servers/global/disable", headers=api.admin)).status_code == 200
    reply = await api.submit({"to": ["bob@example.org"], "subject": "s", "text": "t"})
    assert reply.status_code == 409
    assert reply.json()["code"] == "sending_disabled" and "switched off" in reply.json()["message"]


# ---- bad input ---------------------------------------------------------------------------------


# fmt: off
BAD_MESSAGES = [
    ({"to": ["bob@example.org"], "subject": "Hi\r\nBcc: all@example.org"}, "subject"),
    ({"to": ["bob@example.org"], "headers": {"X-Tag": "a\r\nBcc: all@example.org"}}, "headers['X-Tag']"),
    ({"to": ["bob@example.org"], "headers": {"X-Tag\r\nBcc": "x"}}, "headers['X-Tag\\r\\nBcc']"),
    ({"to": ["bob@example.org\r\nBcc: all@example.org"]}, "to[0]"),
    ({"to": [{"address": "bob@example.org", "name": "Bob\r\nBcc: all@example.org"}]}, "to[0]"),
    ({"to": ["bob@example.org"], "from": "Eve <eve@example.org>\nBcc: x@example.org"}, "from"),
    ({"to": ["not an address"]}, "to[0]"),
    ({"to": []}, "to"),
    ({"to": ["bob@example.org"], "cc": ["@example.org"]}, "cc[0]"),
    ({"to": ["bob@example.org"], "attachments": [{"filename": "a", "content_type": "text/plain",
                                                  "content_base64": "not base64!"}]},
     "attachments[0].content_base64"),
    ({"to": ["bob@example.org"], "headers": {"Subject": "x"}}, "headers['Subject']"),
    ({"to": ["bob@example.org"], "bogus": 1}, "bogus"),
    ({"to": "bob@example.org", "subject": 5}, "subject"),
]
BAD_MESSAGE_IDS = [
    "subject-crlf", "header-value-crlf", "header-name-crlf", "address-crlf", "name-crlf", "from-lf",
    "bad-address", "no-recipient", "bad-cc", "bad-base64", "reserved-header", "unknown-field", "wrong-types",
]
# fmt: on


@pytest.mark.parametrize(("body", "field"), BAD_MESSAGES, ids=BAD_MESSAGE_IDS)
async def test_bad_message_is_refused_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    reply = await api.submit(body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == "invalid_input"
    assert field in problems(reply), problems(reply)
    async with api.mg.db.sessions() as s:
        assert await s.scalar(select(text("count(*)")).select_from(MessageRow)) == 0


async def test_malformed_json_is_a_400(api: Api) -> None:
    headers = {**api.sender, "Content-Type": "application/json"}
    reply = await api.client.post("/v1/messages", content=b'{"to": ["bob@example.org"', headers=headers)
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_json"
    reply = await api.client.post("/v1/messages", content=b"[1, 2]", headers=headers)
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_input"


async def test_oversize_body_is_a_413_before_it_is_read(api: Api) -> None:
    big = {"to": ["bob@example.org"], "text": "x" * (FAST.max_request_size + 1)}
    reply = await api.submit(big)
    assert reply.status_code == 413 and reply.json()["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"to": ["bob@example.org"], "text": "'
        for _ in range(FAST.max_request_size // 4096 + 1):
            yield b"y" * 4096
        yield b'"}'

    reply = await api.client.post("/v1/messages", content=chunks(), headers=api.sender)
    assert reply.status_code == 413
    small = await api.submit({"to": ["bob@example.org"], "text": "x" * 1000})
    assert small.status_code == 202


async def test_list_validates_its_query(api: Api) -> None:
    reply = await api.client.get("/v1/messages?status=lost", headers=api.sender)
    assert reply.status_code == 422 and "status" in problems(reply)
    reply = await api.client.get("/v1/messages?limit=0", headers=api.sender)
    assert reply.status_code == 422 and "limit" in problems(reply)


async def test_list_pages_newest_first(api: Api) -> None:
    ids = [(await api.submit({"to": ["b@example.org"], "subject": f"m{i}"})).json()["id"] for i in range(5)]
    page = (await api.client.get("/v1/messages?limit=2", headers=api.sender)).json()
    assert [m["id"] for m in page["messages"]] == ids[:-3:-1]
    page2 = (await api.client.get(f"/v1/messages?limit=2&before={page['next_before']}", headers=api.sender)).json()
    assert [m["id"] for m in page2["messages"]] == ids[-3:-5:-1]
    last = (await api.client.get(f"/v1/messages?limit=2&before={ids[1]}", headers=api.sender)).json()
    assert [m["id"] for m in last["messages"]] == [ids[0]] and last["next_before"] is None


# ---- tokens ------------------------------------------------------------------------------------


async def test_missing_wrong_and_revoked_tokens_are_401(api: Api) -> None:
    body = {"to": ["bob@example.org"], "subject": "s"}
    assert (await api.submit(body, {})).status_code == 401
    reply = await api.submit(body, {"Authorization": "Bearer mgt_not-a-real-token"})
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    token, info = await api.mg.api_tokens.create("sender", "acme")
    assert (await api.submit(body, {"Authorization": f"Bearer {token}"})).status_code == 202
    await api.mg.api_tokens.revoke(info.id)
    assert (await api.submit(body, {"Authorization": f"Bearer {token}"})).status_code == 401


async def test_tokens_are_stored_hashed_and_never_listed(api: Api) -> None:
    token, info = await api.mg.api_tokens.create("tenant-admin", "acme", name="portal")
    assert token.startswith("mgt_") and len(token) > 40 and info.prefix == token[:12]
    async with api.mg.db.sessions() as s:
        rows = [tuple(str(v) for v in r) for r in await s.execute(select(ApiToken.__table__))]
    assert rows and not any(token in v for r in rows for v in r)
    listed = [t.to_dict() for t in await api.mg.api_tokens.list()]
    assert any(t["name"] == "portal" for t in listed) and token not in str(listed)


async def test_token_roles_need_the_right_tenant(api: Api) -> None:
    from mailgate import InvalidInput, NotFound

    with pytest.raises(InvalidInput, match="tenant"):
        await api.mg.api_tokens.create("sender")
    with pytest.raises(InvalidInput, match="tenant"):
        await api.mg.api_tokens.create("system-admin", "acme")
    with pytest.raises(InvalidInput, match="role"):
        await api.mg.api_tokens.create("root")
    with pytest.raises(NotFound):
        await api.mg.api_tokens.create("sender", "nobody")


async def test_removing_a_tenant_removes_its_tokens(api: Api) -> None:
    assert (await api.client.get("/v1/messages", headers=api.sender)).status_code == 200  # now cached
    assert (await api.client.delete("/v1/tenants/acme", headers=api.admin)).status_code == 204
    assert (await api.client.get("/v1/messages", headers=api.sender)).status_code == 401


# ---- settings through the API ------------------------------------------------------------------


async def test_secrets_are_write_only_and_a_changed_host_needs_them_again(api: Api) -> None:
    doc = smtp_doc(method="password", username="relay-user", password=PASSWORD)
    reply = await api.client.put("/v1/servers/global", json=doc, headers=api.admin)
    assert reply.status_code == 200 and PASSWORD not in reply.text
    assert reply.json()["server"]["auth"]["password"] == {"set": True}
    shown = await api.client.get("/v1/servers/global", headers=api.admin)
    assert PASSWORD not in shown.text and shown.json()["server"]["auth"]["password"] == {"set": True}

    kept = shown.json()["server"]  # saved back as read: the stored password stays
    assert (await api.client.put("/v1/servers/global", json=kept, headers=api.admin)).status_code == 200
    moved = {**kept, "smtp": {**kept["smtp"], "host": "relay.elsewhere.example"}}
    reply = await api.client.put("/v1/servers/global", json=moved, headers=api.admin)
    assert reply.status_code == 422 and "give it again" in problems(reply)["auth.password"]

    audit = (await api.client.get("/v1/audit", headers=api.admin)).json()
    assert PASSWORD not in str(audit)
    assert {"field": "auth.password", "secret": "changed"} in audit[1]["changes"]
    assert audit[0]["actor"].startswith("token:") and "system-admin" in audit[0]["actor"]


async def test_settings_errors_name_the_fields(api: Api) -> None:
    reply = await api.client.put("/v1/servers/global", json={"kind": "smtp", "smtp": {"port": 99999}},
                                 headers=api.admin)  # fmt: skip
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_input" and problems(reply)
    reply = await api.client.post("/v1/tenants", json={"id": "bad id!"}, headers=api.admin)
    assert reply.status_code == 422 and "tenant" in problems(reply)
    reply = await api.client.post("/v1/tenants", json={"id": "acme"}, headers=api.admin)
    assert reply.status_code == 409 and reply.json()["code"] == "conflict"
    reply = await api.client.patch("/v1/tenants/acme", json={"name": "A\r\nB"}, headers=api.admin)
    assert reply.status_code == 422 and "name" in problems(reply)


async def test_patch_changes_only_the_fields_given(api: Api) -> None:
    reply = await api.client.patch("/v1/tenants/acme", json={"support_address": "help@acme.example"},
                                   headers=api.admin)  # fmt: skip
    assert reply.json()["support_address"] == "help@acme.example" and reply.json()["may_use_own_server"] is True
    reply = await api.client.patch("/v1/tenants/acme", json={"support_address": None}, headers=api.admin)
    assert reply.json()["support_address"] is None


# ---- delegated consent through the API ---------------------------------------------------------


async def test_consent_connect_and_callback(api: Api) -> None:
    tenant_id, client_id, mailbox = "9188040d-6c67-4c5b-b112-36a304b66dad", "0b5c2d4e-1111-2222-3333-444455556666", \
        "mailer@acme.example"  # fmt: skip
    with FakeIdentityProvider() as idp:
        idp.add_tenant(tenant_id)
        idp.add_app(client_id, "app-secret-value", redirect_uris=("http://127.0.0.1:8000/v1/oauth/callback",))
        doc = smtp_doc()
        doc["auth"] = {"method": "oauth2", "username": mailbox,
                       "token": {"grant": "delegated", "provider": "microsoft", "authority": idp.url,
                                 "directory_id": tenant_id, "client_id": client_id,
                                 "client_secret": "app-secret-value"}}  # fmt: skip
        admin, _ = await api.mg.api_tokens.create("tenant-admin", "acme")
        headers = {"Authorization": f"Bearer {admin}"}
        assert (await api.client.put("/v1/tenants/acme/server", json=doc, headers=headers)).status_code == 200
        reply = await api.client.post("/v1/tenants/acme/server/oauth/connect", headers=headers)
        assert reply.status_code == 200
        redirect, _code = idp.consent(reply.json()["authorize_url"], subject=mailbox)
        callback = urlsplit(redirect)
        assert callback.path == "/v1/oauth/callback"
        back = await api.client.get(f"{callback.path}?{callback.query}")  # the browser, without a token
        assert back.status_code == 303
        page = await api.client.get(back.headers["location"])
        assert page.status_code == 200 and "Mailbox connected" in page.text
        assert back.headers["location"] == "/v1/oauth/callback/done?result=connected"
        server = (await api.client.get("/v1/tenants/acme/server", headers=headers)).json()["server"]
        assert server["auth"]["token"]["refresh_token"] == {"set": True}
        health = (await api.client.get("/v1/tenants/acme/server/health", headers=headers)).json()
        assert health["consented_at"] is not None and any("90 days" in n for n in health["notes"])
        assert "app-secret-value" not in page.text + str(server)

        again = await api.client.get(f"{callback.path}?{callback.query}")  # a state works once
        page = await api.client.get(again.headers["location"])
        assert "not connected" in page.text and "connect again" in page.text
        refused = await api.client.get("/v1/oauth/callback?error=access_denied&error_description=<script>x</script>")
        page = await api.client.get(refused.headers["location"])
        assert "not connected" in page.text and "declined" in page.text and "<script>" not in page.text

        reset = await api.client.post("/v1/tenants/acme/server/oauth/reset", headers=headers)
        assert reset.json()["server"]["auth"]["token"]["refresh_token"] == {"set": False}
        health = (await api.client.get("/v1/tenants/acme/server/health", headers=headers)).json()
        assert health["consented_at"] is None
    code = parse_qs(callback.query)["code"][0]
    assert code not in str((await api.client.get("/v1/audit", headers=api.admin)).json())


# Words anyone can put in a link to mailgate's own page (phishing on mailgate's origin).
CRAFTED = "Your mailbox is suspended. Call +1-800-555-0199 or sign in at evil.example"


@pytest.mark.parametrize("query", [
    {"ok": "1", "text": CRAFTED},
    {"ok": "0", "text": CRAFTED},
    {"result": CRAFTED},
    {"result": "connected", "text": CRAFTED},
], ids=["ok-text", "not-ok-text", "result-text", "result-and-text"])  # fmt: skip
async def test_the_consent_done_page_shows_no_words_from_the_link(api: Api, query: dict[str, str]) -> None:
    page = await api.client.get("/v1/oauth/callback/done", params=query)
    assert page.status_code in (200, 422)
    assert "800-555" not in page.text and "evil.example" not in page.text and "suspended" not in page.text


@pytest.mark.parametrize(("error", "says"), [
    ("access_denied", "the account that signed in declined it"),
    ("consent_required", "an administrator's consent"),
    ("invalid_scope", "check the mail server's client id and scope"),
    ("temporarily_unavailable", "connect again in a few minutes"),
    (CRAFTED, "The provider refused the consent."),
])  # fmt: skip
async def test_a_providers_error_picks_a_sentence_of_mailgates_and_its_description_is_never_shown(
    api: Api, error: str, says: str
) -> None:
    back = await api.client.get("/v1/oauth/callback", params={"error": error, "error_description": CRAFTED})
    assert back.status_code == 303 and "800-555" not in back.headers["location"]
    page = await api.client.get(back.headers["location"])
    assert "Mailbox not connected" in page.text and says in page.text
    assert "800-555" not in page.text and "evil.example" not in page.text


async def test_a_callback_without_a_consent_under_way_says_connect_again(api: Api) -> None:
    back = await api.client.get("/v1/oauth/callback", params={"state": "made-up", "code": CRAFTED})
    page = await api.client.get(back.headers["location"])
    assert "Mailbox not connected" in page.text and "connect again from mailgate" in page.text
    assert "800-555" not in page.text


# ---- health and metrics ------------------------------------------------------------------------


async def test_metrics_count_messages_by_tenant_and_status(api: Api) -> None:
    async with serve(ServerConfig()) as smtp:
        await api.mg.servers.set("global", smtp_doc(smtp.host, smtp.port))
        for i in range(3):
            await api.submit({"to": [f"r{i}@example.org"], "subject": "s", "text": "t"})
        stats = await api.mg.run_worker(until_idle=True)
    assert stats.sent == 3
    await api.submit({"to": ["later@example.org"], "subject": "s", "text": "t"})
    reply = await api.client.get("/metrics", headers=api.admin)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    lines = set(reply.text.splitlines())
    assert 'mailgate_messages{status="sent",tenant="acme"} 3.0' in lines
    assert 'mailgate_messages{status="queued",tenant="acme"} 1.0' in lines
    assert 'mailgate_attempts{outcome="accepted"} 3.0' in lines
    assert "mailgate_queue_due 1.0" in lines


async def test_metrics_of_a_process_that_runs_its_worker_count_the_pools_connections(api: Api) -> None:
    # `mailgate serve` runs the worker in the API's process: /metrics then also reads its pools.
    app = create_app(api.mg, worker=True)
    async with serve(ServerConfig()) as smtp, app.router.lifespan_context(app):
        await api.mg.servers.set("global", smtp_doc(smtp.host, smtp.port))
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://mailgate.test") as c:
            location = (await api.submit({"to": ["bob@example.org"], "subject": "s", "text": "t"})).headers["location"]
            for _ in range(200):  # the worker polls every 0.05 s
                if (await c.get(location, headers=api.admin)).json()["status"] == "sent":
                    break
                await asyncio.sleep(0.05)
            reply = await c.get("/metrics", headers=api.admin)
    assert reply.status_code == 200, reply.text
    [gauge] = [line for line in reply.text.splitlines() if line.startswith("mailgate_pool_connections ")]
    assert float(gauge.split()[1]) >= 1  # the connection that sent it stays pooled


async def test_health_and_readiness(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = (await api.client.get("/readyz")).json()
    assert ready == {"status": "ok", "checks": {"database": "ok", "worker": "not in this process"}}


async def test_ids_past_64_bits_are_not_found_not_a_crash(api: Api) -> None:
    # schemathesis found these answering 500 (the database driver refuses such an integer).
    assert (await api.client.get(f"/v1/messages/{2**63}", headers=api.admin)).status_code == 422
    assert (await api.mg.queue.list_messages(before=2**70)) == []
    from mailgate import NotFound

    with pytest.raises(NotFound):
        await api.mg.queue.get(2**63)


async def test_a_tenant_admin_sets_the_admin_address_but_not_the_switches(api: Api) -> None:
    token, _ = await api.mg.api_tokens.create("tenant-admin", "acme")
    headers = {"Authorization": f"Bearer {token}"}
    reply = await api.client.patch("/v1/tenants/acme", json={"admin_address": "it@acme.example"}, headers=headers)
    assert reply.status_code == 200 and reply.json()["admin_address"] == "it@acme.example"
    reply = await api.client.patch("/v1/tenants/acme", json={"admin_address": "not an address"}, headers=headers)
    assert reply.status_code == 422 and "admin_address" in problems(reply)
    reply = await api.client.patch("/v1/tenants/acme", json={"support_address": "help@acme.example"}, headers=headers)
    assert reply.status_code == 403  # acme may not set its support address
    reply = await api.client.patch("/v1/tenants/acme", json={"admin_address": None}, headers=headers)
    assert reply.json()["admin_address"] is None
