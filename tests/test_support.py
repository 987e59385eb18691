"""Support requests (POST /v1/support-requests, `mg.support_request`, `mailgate support request`)
and the global support address (/v1/system-settings, `mailgate system …`): routed to the right
address, delivered through the worker to a real SMTP server with the system information attached,
refused when they must be — and never a secret in what support receives."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx2
import pytest

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.message import Message
from mailgate.support import MAX_ATTACHMENT, MAX_PROBLEMS, attachment_bytes, summary, system_information
from smtp_servers import RecordingServer, ServerConfig, serve
from test_cli_settings import CLI
from test_web import ACME, ADMIN, GLOBEX, UI, ui
from test_web import smtp_doc as web_smtp_doc
from test_web import text_of as page_text

FIXTURES = (ui,)  # test_web.py's, found by pytest under this name here
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, tenant_networks="loopback")
OWN_PASSWORD = "own-Relay-pa55word-7f3a9c"
GLOBAL_PASSWORD = "global-Relay-pa55word-e41b"


def smtp_doc(server: RecordingServer, *, password: str | None = None, from_address: str = "no-reply@example.com"
             ) -> dict[str, Any]:  # fmt: skip
    auth = {"method": "password", "username": "user@example.com", "password": password} if password else {
        "method": "none"}  # fmt: skip
    return {"kind": "smtp", "enabled": True, "from_address": from_address,
            "smtp": {"host": server.host, "port": server.port, "security": "none"}, "auth": auth,
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


@dataclass
class Desk:
    mg: Mailgate
    client: httpx2.AsyncClient
    smtp: RecordingServer  # the global server
    admin: dict[str, str]  # a system-admin token
    sender: dict[str, str]  # acme's sender token
    acme_admin: dict[str, str]  # acme's tenant-admin token
    beta_admin: dict[str, str]  # beta's tenant-admin token

    async def request(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx2.Response:
        return await self.client.post("/v1/support-requests", json=body,
                                      headers=self.sender if headers is None else headers)  # fmt: skip

    async def delivered(self, count: int = 1) -> list[EmailMessage]:
        await self.mg.run_worker(until_idle=True)
        return [m.parsed() for m in await self.smtp.wait_for_messages(count)]


@pytest.fixture
async def desk(database_url: str) -> AsyncIterator[Desk]:
    async with serve(ServerConfig()) as smtp:
        async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="setup", config=FAST) as mg:
            await mg.tenants.add("acme", name="Acme Corp", may_use_own_server=True, admin_address="it@acme.example")
            await mg.tenants.add("beta")
            await mg.servers.set("global", smtp_doc(smtp))
            tokens = [
                (await mg.api_tokens.create(role, tenant))[0]
                for role, tenant in [
                    ("system-admin", None),
                    ("sender", "acme"),
                    ("tenant-admin", "acme"),
                    ("tenant-admin", "beta"),
                ]
            ]
            transport = httpx2.ASGITransport(app=create_app(mg))
            async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
                yield Desk(mg, client, smtp, *({"Authorization": f"Bearer {t}"} for t in tokens))


def attachment(message: EmailMessage) -> dict[str, Any]:
    [part] = [p for p in message.iter_attachments() if p.get_filename() == "mailgate-system-info.json"]
    assert part.get_content_type() == "application/json"
    data = part.get_content()
    return json.loads(data)  # type: ignore[no-any-return]


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def problems(reply: httpx2.Response) -> dict[str, str]:
    return {p["field"]: p["problem"] for p in reply.json().get("problems", [])}


REQUEST = {"subject": "Invitations do not arrive", "text": "Since this morning nobody gets our invitations."}


# ---- routing ------------------------------------------------------------------------------------


async def test_request_goes_to_the_tenants_support_address_with_the_system_information(desk: Desk) -> None:
    await desk.mg.tenants.update("acme", support_address="help@acme.example", may_set_support_address=True)
    await desk.mg.system.update(support_address="ops@operator.example")
    await desk.mg.submit("acme", Message(to="bob@example.org", subject="Welcome", text="hi"))  # waiting
    reply = await desk.request({**REQUEST, "reply_to": "Jane <jane@acme.example>"}, desk.acme_admin)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert (body["routed_to"], body["sends_through"], body["status"]) == ("tenant", "global", "queued")
    assert reply.headers["location"] == f"/v1/messages/{body['id']}"
    assert "help@acme.example" not in reply.text  # the kind of address, not the address
    [received] = [m for m in await desk.delivered(2) if m["Subject"].startswith("[mailgate support]")]
    assert [m.rcpt_tos for m in desk.smtp.messages if b"support" in m.content] == [["help@acme.example"]]
    assert received["Reply-To"] == "Jane <jane@acme.example>"
    assert received["Subject"] == "[mailgate support] Acme Corp (acme): Invitations do not arrive"
    text = text_of(received)
    assert text.startswith("Since this morning nobody gets our invitations.")
    assert "Sends through: the global mail server — rule 3" in text
    info = attachment(received)
    assert info["tenant"]["id"] == "acme" and info["tenant"]["name"] == "Acme Corp"
    assert info["mailgate"]["version"]
    assert info["resolution"]["sends_through"] == "global" and info["resolution"]["rule"] == 3
    assert info["resolution"]["server"]["host"] == f"127.0.0.1:{desk.smtp.port} (none)"
    assert info["queue"] == {"held": 0, "queued": 1, "sending": 0, "deferred": 0, "sent": 0, "failed": 0,
                             "cancelled": 0}  # the one waiting when the request was made  # fmt: skip
    assert info["servers"]["global"]["health"]["status"] in ("ok", "unknown")
    assert (await desk.client.get(f"/v1/messages/{body['id']}", headers=desk.acme_admin)).json()["status"] == "sent"


async def test_without_an_allowed_tenant_address_it_goes_to_the_global_one(desk: Desk) -> None:
    # Set by a system admin, but the tenant may not set it: the rule sends it to the global one.
    await desk.mg.tenants.update("acme", support_address="help@acme.example", may_set_support_address=False)
    reply = await desk.client.patch("/v1/system-settings", json={"support_address": "Ops@Operator.example"},
                                    headers=desk.admin)  # fmt: skip
    assert reply.status_code == 200 and reply.json()["support_address"] == "Ops@operator.example"
    reply = await desk.request(REQUEST)
    assert reply.status_code == 202 and reply.json()["routed_to"] == "global"
    [received] = await desk.delivered()
    assert desk.smtp.messages[0].rcpt_tos == ["Ops@operator.example"]
    assert received["Reply-To"] == "it@acme.example"  # the tenant's admin address, when none is given
    assert attachment(received)["tenant"]["id"] == "acme"


async def test_a_system_admin_names_the_tenant_and_may_leave_the_system_information_out(desk: Desk) -> None:
    await desk.mg.system.update(support_address="ops@operator.example")
    reply = await desk.request(REQUEST, desk.admin)
    assert reply.status_code == 422 and "tenant" in problems(reply)
    reply = await desk.request({**REQUEST, "tenant": "beta", "attach_system_info": False}, desk.admin)
    assert reply.status_code == 202 and reply.json()["system_info_attached"] is False
    [received] = await desk.delivered()
    assert list(received.iter_attachments()) == []
    assert "System information" not in text_of(received)


async def test_no_support_address_is_a_409_of_its_own(desk: Desk) -> None:
    await desk.mg.tenants.update("acme", may_set_support_address=True)  # allowed, but none set
    reply = await desk.request(REQUEST)
    assert reply.status_code == 409 and reply.json()["code"] == "no_support_address"
    assert "support_address" in problems(reply)
    assert (await desk.mg.queue.stats())["by_status"]["queued"] == 0


async def test_a_request_through_a_broken_server_waits_and_says_so(desk: Desk) -> None:
    """The tenant's own server is marked broken: the request is stored all the same (the outbox
    sends a tenant's mail only through the server it resolves to), and the reply and the form warn."""
    await desk.mg.system.update(support_address="ops@operator.example")
    await desk.mg.servers.set("acme", smtp_doc(desk.smtp, from_address="mail@acme.example"))
    own = await desk.mg.servers.loaded("acme")
    assert own is not None
    await desk.mg.servers.mark_broken(own.id, own.version, "535 5.7.3 Authentication unsuccessful")
    reply = await desk.request(REQUEST)
    assert reply.status_code == 202 and reply.json()["sends_through"] == "tenant"
    assert "marked broken" in reply.json()["warning"] and "5.7.3" in reply.json()["warning"]
    await desk.mg.run_worker(until_idle=True)
    assert desk.smtp.messages == [] and (await desk.mg.queue.get(reply.json()["id"])).summary.status == "deferred"


# ---- who may ------------------------------------------------------------------------------------


async def test_only_the_tenants_own_tokens_write_for_it(desk: Desk) -> None:
    await desk.mg.system.update(support_address="ops@operator.example")
    assert (await desk.request({**REQUEST, "tenant": "acme"}, desk.beta_admin)).status_code == 404
    assert (await desk.request({**REQUEST, "tenant": "beta"}, desk.sender)).status_code == 404
    assert (await desk.request({**REQUEST, "tenant": "nobody"}, desk.admin)).status_code == 404
    assert (await desk.request(REQUEST, desk.beta_admin)).status_code == 202
    assert (await desk.request(REQUEST, {"Authorization": "Bearer mgt_nope"})).status_code == 401


async def test_system_settings_are_a_system_admins_and_audited(desk: Desk) -> None:
    for headers in (desk.sender, desk.acme_admin):
        assert (await desk.client.get("/v1/system-settings", headers=headers)).status_code == 403
        reply = await desk.client.patch("/v1/system-settings", json={"support_address": "x@example.com"},
                                        headers=headers)  # fmt: skip
        assert reply.status_code == 403
    assert (await desk.client.get("/v1/system-settings", headers=desk.admin)).json()["support_address"] is None
    await desk.client.patch("/v1/system-settings", json={"support_address": "ops@operator.example"}, headers=desk.admin)
    reply = await desk.client.patch("/v1/system-settings", json={"support_address": None}, headers=desk.admin)
    assert reply.json()["support_address"] is None and reply.json()["updated_by"].startswith("token:")
    log = [r for r in await desk.mg.audit_log() if r.action == "system.update"]
    assert [c["to"] for r in log for c in r.changes] == [None, "ops@operator.example"]
    assert [c["field"] for r in log for c in r.changes] == ["support_address"] * 2
    reply = await desk.client.patch("/v1/system-settings", json={"support_address": "not an address"},
                                    headers=desk.admin)  # fmt: skip
    assert reply.status_code == 422 and "support_address" in problems(reply)
    reply = await desk.client.patch("/v1/system-settings", json={"support_address": "a\x00@example.com"},
                                    headers=desk.admin)  # fmt: skip
    assert reply.status_code == 422 and "U+0000" in problems(reply)["support_address"]


# ---- bounds and refusals --------------------------------------------------------------------------

# fmt: off
BAD_REQUESTS = [
    ({"subject": "Help\x00", "text": "t"}, "subject"),
    ({"subject": "Help\r\nBcc: all@example.org", "text": "t"}, "subject"),
    ({"subject": "x" * 201, "text": "t"}, "subject"),
    ({"subject": "", "text": "t"}, "subject"),
    ({"subject": "Help", "text": "nul \x00 in it"}, "text"),
    ({"subject": "Help", "text": "x" * 20_001}, "text"),
    ({"subject": "Help", "text": "   "}, "text"),
    ({"subject": "Help", "text": "t", "reply_to": "not an address"}, "reply_to"),
    ({"subject": "Help", "text": "t", "reply_to": "a@example.org\r\nBcc: all@example.org"}, "reply_to"),
    ({"subject": "Help", "text": "t", "bogus": 1}, "bogus"),
]
# fmt: on


@pytest.mark.parametrize(("body", "field"), BAD_REQUESTS)
async def test_a_bad_request_is_refused_naming_the_field(desk: Desk, body: dict[str, Any], field: str) -> None:
    await desk.mg.system.update(support_address="ops@operator.example")
    reply = await desk.request(body)
    assert reply.status_code == 422, reply.text
    assert field in problems(reply), problems(reply)
    assert (await desk.mg.queue.stats())["by_status"]["queued"] == 0


async def test_a_lone_surrogate_is_refused_naming_the_field(desk: Desk) -> None:
    await desk.mg.system.update(support_address="ops@operator.example")
    raw = b'{"subject": "Help", "text": "half a pair: \\ud800"}'
    reply = await desk.client.post("/v1/support-requests", content=raw,
                                   headers={**desk.sender, "Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == 422 and "text" in problems(reply)
    with pytest.raises(Exception, match="surrogate"):
        await desk.mg.support_request("acme", subject="Help \ud800", text="t")


async def test_the_system_information_is_bounded(desk: Desk) -> None:
    refusing = ServerConfig(rcpt_reply=lambda address, _: f"550 5.1.1 <{address}>: Recipient address rejected")
    async with serve(refusing) as own:
        await desk.mg.servers.set("acme", smtp_doc(own, from_address="mail@acme.example"))
        await desk.mg.submit_many("acme", [Message(to=f"user{i}@example.org", subject="s", text="t")
                                           for i in range(MAX_PROBLEMS + 5)])  # fmt: skip
        await desk.mg.run_worker(until_idle=True)
    info = await system_information(desk.mg, "acme")
    assert len(info["recent_problems"]) == MAX_PROBLEMS
    assert info["queue"]["failed"] == MAX_PROBLEMS + 5
    big = {**info, "recent_problems": info["recent_problems"] * 40}  # far past the bound
    data = attachment_bytes(big)
    assert len(data) <= MAX_ATTACHMENT and json.loads(data)["recent_problems_left_out"] > 0


# ---- never a secret -------------------------------------------------------------------------------


async def test_what_support_receives_holds_no_secret_and_no_recipient(desk: Desk) -> None:
    """The tenant's own server (password) refuses one recipient; the global one has a password too.
    The request, delivered, holds neither password nor the refused recipient's address — but the
    refusal, its explanation and the recipient's domain."""
    bob = "bob.secretive@example.org"
    refusing = ServerConfig(auth={"PLAIN"}, auth_require_tls=False, password=OWN_PASSWORD,
                            rcpt_reply=lambda a, _: f"550 5.1.1 <{a}>: Recipient address rejected" if "bob" in a
                            else None)  # fmt: skip
    async with serve(ServerConfig(auth={"PLAIN"}, auth_require_tls=False, password=GLOBAL_PASSWORD)) as glob, \
            serve(refusing) as own:  # fmt: skip
        await desk.mg.servers.set("global", smtp_doc(glob, password=GLOBAL_PASSWORD))
        await desk.mg.servers.set("acme", smtp_doc(own, password=OWN_PASSWORD, from_address="mail@acme.example"))
        await desk.mg.tenants.update("acme", support_address="help@acme.example", may_set_support_address=True)
        await desk.mg.submit("acme", Message(to=bob, subject="Your secret plan", text="The body of the plan"))
        await desk.mg.run_worker(until_idle=True)
        reply = await desk.request(REQUEST)
        assert reply.status_code == 202 and reply.json()["sends_through"] == "tenant"
        await desk.mg.run_worker(until_idle=True)
        [received] = await own.wait_for_messages(1)
    assert received.rcpt_tos == ["help@acme.example"] and received.auth_login == "user@example.com"
    message = received.parsed()
    info = attachment(message)
    shown = json.dumps(info) + text_of(message) + received.content.decode()
    for secret in (OWN_PASSWORD, GLOBAL_PASSWORD, "bob.secretive", "Your secret plan", "The body of the plan"):
        assert secret not in shown
    assert info["servers"]["own"]["document"]["auth"]["password"] == {"set": True}
    [problem] = info["recent_problems"]
    assert problem["status"] == "failed" and problem["recipients"] == {"failed": 1}
    assert problem["last_attempt"]["code"] == 550 and problem["last_attempt"]["enhanced"] == "5.1.1"
    assert "…@example.org" in problem["last_attempt"]["reply"]
    assert problem["last_attempt"]["explanation"]  # the catalogue's cause and fix
    assert info["resolution"]["sends_through"] == "tenant" and info["resolution"]["rule"] == 2


# Every secret field of the settings document, each with a value the attachment must never show.
SECRETS = {
    "auth.password": "sEcReT-password-0001",
    "auth.token.client_secret": "sEcReT-client-secret-0002",
    "auth.token.refresh_token": "sEcReT-refresh-token-0003",
    "graph.client_secret": "sEcReT-graph-secret-0004",
    "graph.refresh_token": "sEcReT-graph-refresh-0005",
}
_SMTP = {"kind": "smtp", "enabled": True, "from_address": "mail@acme.example",
         "smtp": {"host": "127.0.0.1", "port": 2525, "security": "starttls-required"}}  # fmt: skip
_TOKEN = {"provider": "generic", "token_url": "https://127.0.0.1:9/token", "client_id": "c1"}
SECRET_DOCUMENTS = [
    {**_SMTP, "auth": {"method": "password", "username": "u", "password": SECRETS["auth.password"]}},
    {**_SMTP, "auth": {"method": "oauth2", "username": "u", "token": {
        **_TOKEN, "grant": "client_credentials", "client_secret": SECRETS["auth.token.client_secret"]}}},
    {**_SMTP, "auth": {"method": "oauth2", "username": "u", "token": {
        **_TOKEN, "grant": "refresh_token", "client_secret": SECRETS["auth.token.client_secret"],
        "refresh_token": SECRETS["auth.token.refresh_token"]}}},
    {"kind": "graph", "enabled": True, "from_address": "mail@acme.example", "graph": {
        "authority": "https://127.0.0.1:9", "endpoint": "https://127.0.0.1:9", "directory_id": "d1",
        "client_id": "c1", "client_secret": SECRETS["graph.client_secret"], "mailbox": "mail@acme.example"}},
    {"kind": "graph", "enabled": True, "from_address": "mail@acme.example", "graph": {
        "authority": "https://127.0.0.1:9", "endpoint": "https://127.0.0.1:9", "directory_id": "d1",
        "client_id": "c1", "client_secret": SECRETS["graph.client_secret"], "auth": "delegated",
        "mailbox": "mail@acme.example", "refresh_token": SECRETS["graph.refresh_token"]}},
]  # fmt: skip


@pytest.mark.parametrize("document", SECRET_DOCUMENTS, ids=["password", "client-credentials", "refresh-token",
                                                            "graph", "graph-delegated"])  # fmt: skip
async def test_no_secret_field_reaches_the_system_information(desk: Desk, document: dict[str, Any]) -> None:
    await desk.mg.servers.set("acme", document)
    await desk.mg.servers.set("global", document)
    stored = await desk.mg.servers.with_secrets("acme")
    assert stored is not None
    info = await system_information(desk.mg, "acme")
    shown = attachment_bytes(info).decode() + summary(info)
    given = [value for value in SECRETS.values() if value in json.dumps(document)]
    assert given  # the document holds secrets, and none of them shows
    for value in given:
        assert value not in shown
    assert '"set": true' in shown


# ---- the command line ----------------------------------------------------------------------------


def test_the_cli_sets_the_global_address_and_sends_a_request(tmp_path: Path) -> None:
    cli = CLI(tmp_path)
    cli("tenants", "add", "acme")
    out = cli("support", "request", "--tenant", "acme", "--subject", "Help", "--message", "x", check=2)
    assert "no support address" in out.stderr
    assert json.loads(cli("system", "set", "--support-address", "ops@operator.example", "--json").stdout)[
        "support_address"] == "ops@operator.example"  # fmt: skip
    assert "ops@operator.example" in cli("system", "show").stdout
    out = cli("support", "request", "--tenant", "acme", "--subject", "Help", "--message", "x", check=1)
    assert "sending is disabled" in out.stderr
    cli("servers", "set", "global", "--file", cli.doc(smtp={"host": "127.0.0.1", "port": 2525, "security": "none"},
                                                        auth={"method": "none"}))  # fmt: skip
    (tmp_path / "text.txt").write_text("Nothing arrives since 9:00.\n")
    done = json.loads(cli("support", "request", "--tenant", "acme", "--subject", "Help", "--message-file",
                          tmp_path / "text.txt", "--no-system-info", "--json").stdout)  # fmt: skip
    assert done["routed_to"] == "global" and done["system_info_attached"] is False and done["status"] == "queued"
    shown = json.loads(cli("queue", "show", str(done["id"]), "--json").stdout)
    assert shown["subject"] == "[mailgate support] acme: Help"
    out = cli("support", "request", "--tenant", "acme", "--subject", "Help\x01", "--message", "x", check=2)
    assert "subject" in out.stderr
    out = cli("support", "request", "--tenant", "acme", "--subject", "Help", check=2)
    assert "--message" in out.stderr
    cli("system", "set", "--no-support-address")
    assert "support_address:" in cli("system", "show").stdout
    assert json.loads(cli("system", "show", "--json").stdout)["support_address"] is None


# ---- the admin UI, in process (the browser's view is in test_web_support_browser.py) ------------


async def test_the_support_form_is_the_tenants_admins_and_checks_its_csrf_token(ui: UI) -> None:
    await ui.mg.system.update(support_address="ops@operator.example")
    await ui.mg.servers.set("global", web_smtp_doc(2525))  # nothing is delivered here
    globex = await ui.signed_in(GLOBEX)
    assert (await globex.get("/admin/tenants/acme/support")).status_code == 404
    acme = await ui.signed_in(ACME)
    form = await acme.get("/admin/tenants/acme/support")
    assert form.status_code == 200 and f'value="{ACME}"' in form.text and "marked broken" not in form.text
    glob = await ui.mg.servers.loaded("global")
    assert glob is not None
    await ui.mg.servers.mark_broken(glob.id, glob.version, "535 5.7.3 Authentication unsuccessful")
    assert "is marked broken" in page_text(await acme.get("/admin/tenants/acme/support"))
    request = {"subject": "Help", "text": "Mail is stuck", "attach_system_info": "on"}
    assert (await acme.post("/admin/tenants/acme/support", request, csrf=False)).status_code == 403
    assert (await globex.post("/admin/tenants/acme/support", request)).status_code == 404
    refused = await acme.post("/admin/tenants/acme/support", {**request, "subject": "Help\x00"})
    assert refused.status_code == 422 and "U+0000" in page_text(refused)
    assert (await ui.mg.queue.stats())["by_status"]["queued"] == 0
    sent = await acme.post("/admin/tenants/acme/support", request)
    assert sent.status_code == 303 and sent.headers["location"].startswith("/admin/tenants/acme/support?sent=")
    assert (await ui.mg.queue.stats())["by_status"]["queued"] == 1


async def test_only_a_system_admin_sets_the_global_support_address_in_the_ui(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    await acme.get("/admin/tenants/acme")
    assert (await acme.post("/admin/system", {"support_address": "x@example.com"})).status_code == 403
    assert "Global support address" not in (await acme.get("/admin/tenants/acme")).text
    admin = await ui.signed_in(ADMIN)
    assert "Global support address" in (await admin.get("/admin/global")).text
    assert (await admin.post("/admin/system", {"support_address": "x@example.com"}, csrf=False)).status_code == 403
    assert (await admin.post("/admin/system", {"support_address": "ops@operator.example"})).status_code == 303
    assert (await ui.mg.system.get()).support_address == "ops@operator.example"
    assert 'value="ops@operator.example"' in (await admin.get("/admin/global")).text
    await admin.post("/admin/system", {"support_address": ""})
    assert (await ui.mg.system.get()).support_address is None
