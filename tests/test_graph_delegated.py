"""Delegated consent for Microsoft Graph (`graph.auth: "delegated"`), against the strict fake Entra
ID and the fake Graph on 127.0.0.1 (real HTTP): the authorize URL, the code's redemption with the
client secret, the mailbox learnt from the id_token becoming the sender, sending with the
mailbox's own (rotated) tokens through the worker, the changes that ask for consent again, Reset,
the test e-mail's steps, the admin page, and the refresh token never shown anywhere."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from conftest import TEST_KEY
from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider
from mailgate import Attachment, Mailgate, Message
from mailgate.config import Config
from mailgate.db.models import ServerSecret
from mailgate.errors import SettingsError
from mailgate.oauth import TokenError
from mailgate.oauth.consent import _consenting_mailbox, challenge_of
from test_api import Api, api_of
from test_web import UI, text_of, ui  # noqa: F401  (the fixture)

TENANT_ID = "3c1d5e7f-0000-4000-8000-00000000d31e"
APP = "44444444-5555-6666-7777-888888888888"
SECRET = "De~legated.secret-value_0123456789"
MAILBOX = "notifications@contoso.example"
CALLBACK = "http://127.0.0.1:8000/v1/oauth/callback"
SEND = "https://graph.microsoft.com/Mail.Send"
READWRITE = "https://graph.microsoft.com/Mail.ReadWrite"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, lease=30,
              tenant_networks="loopback")  # fmt: skip


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(APP, SECRET, redirect_uris=(CALLBACK,))  # no application permission: delegated only
        yield fake


@pytest.fixture
def graph(idp: FakeIdentityProvider) -> Iterator[FakeGraph]:
    with FakeGraph(idp) as fake:
        fake.add_mailbox(MAILBOX)
        yield fake


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin@acme", config=FAST) as opened:
        await opened.tenants.add("acme", may_use_own_server=True)
        await opened.servers.set("global", {"from_address": "no-reply@operator.example",
                                            "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"}})  # fmt: skip
        yield opened


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with api_of(database_url, FAST, Api) as opened:
        yield opened


def delegated_doc(idp: FakeIdentityProvider, graph: FakeGraph, **settings: Any) -> dict[str, Any]:
    """A delegated Graph server before its consent: no mailbox, no from_address."""
    return {"kind": "graph", "from_name": "Contoso",
            "graph": {"auth": "delegated", "authority": idp.url, "endpoint": graph.url, "directory_id": TENANT_ID,
                      "client_id": APP, "client_secret": SECRET, **settings},
            "connection": {"connect_timeout": 5, "protocol_timeout": 10}}  # fmt: skip


async def connect(mg: Mailgate, idp: FakeIdentityProvider, subject: str = MAILBOX, **kw: Any) -> str:
    """The admin connects acme's mailbox: consent as `subject`. Returns the authorize URL."""
    url = await mg.begin_consent("acme")
    redirect, code = idp.consent(url, subject=subject, **kw)
    await mg.complete_consent(parse_qs(urlsplit(redirect).query)["state"][0], code)
    return url


async def stored_refresh_token(mg: Mailgate) -> str | None:
    loaded = await mg.servers.loaded("acme")
    assert loaded is not None and loaded.server.graph is not None
    token = loaded.server.graph.refresh_token
    return token.get_secret_value() if token else None


async def deliver(mg: Mailgate, *messages: Message) -> list[int]:
    pks = [await mg.submit("acme", m) for m in messages]
    await mg.run_worker(until_idle=True)
    return pks


# ---- the consent ----------------------------------------------------------------------------------


async def test_the_authorize_url_asks_graph_for_mail_send_with_pkce(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    url = await mg.begin_consent("acme")
    assert url.startswith(f"{idp.url}/{TENANT_ID}/oauth2/v2.0/authorize?")
    query = {k: v for k, [v] in parse_qs(urlsplit(url).query).items()}
    challenge = query.pop("code_challenge")
    assert len(challenge) == 43 and len(query.pop("state")) >= 43
    assert query == {"client_id": APP, "response_type": "code", "redirect_uri": CALLBACK, "response_mode": "query",
                     "scope": f"{SEND} offline_access openid email profile",
                     "code_challenge_method": "S256"}  # fmt: skip
    idp.consent(url, subject=MAILBOX)  # the strict fake's authorize endpoint takes it
    await mg.servers.set("acme", delegated_doc(idp, graph, large_attachments=True))
    url = await mg.begin_consent("acme")
    assert parse_qs(urlsplit(url).query)["scope"] == [f"{SEND} {READWRITE} offline_access openid email profile"]


async def test_the_consent_redeems_the_code_with_the_secret_and_the_mailbox_becomes_the_sender(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    url = await mg.begin_consent("acme")
    redirect, code = idp.consent(url, subject=MAILBOX)
    result = await mg.complete_consent(parse_qs(urlsplit(redirect).query)["state"][0], code)
    assert (result.scope, result.mailbox, result.granted_scope) == ("acme", MAILBOX, SEND)
    [redemption] = idp.token_requests
    form = redemption.form
    assert form is not None and redemption.client_auth == "form" and redemption.status == 200
    verifier = form.pop("code_verifier")
    assert challenge_of(verifier) == parse_qs(urlsplit(url).query)["code_challenge"][0]
    assert form == {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
                    "scope": f"{SEND} offline_access openid email profile", "client_id": APP,
                    "client_secret": SECRET}  # fmt: skip

    info = await mg.servers.get("acme")
    assert info is not None
    assert info.document["from_address"] == MAILBOX and info.document["graph"]["mailbox"] == MAILBOX
    assert info.document["graph"]["refresh_token"] == {"set": True}
    [granted] = idp.refresh_tokens_for(MAILBOX)
    assert await stored_refresh_token(mg) == granted
    async with mg.db.sessions() as s:  # encrypted at rest
        ciphertext = await s.scalar(select(ServerSecret.ciphertext).where(ServerSecret.field == "graph.refresh_token"))
    assert ciphertext is not None and granted not in ciphertext
    [entry] = [e for e in await mg.audit_log("acme") if e.action == "server.consent"]
    assert entry.actor == "admin@acme"
    assert entry.changes == [{"field": "graph.mailbox", "from": None, "to": MAILBOX},
                             {"field": "from_address", "from": None, "to": MAILBOX},
                             {"field": "graph.refresh_token", "secret": "changed"}]  # fmt: skip
    assert granted not in str([e.to_dict() for e in await mg.audit_log("acme")])


async def test_the_mailbox_is_the_email_claim_not_the_sign_in_name(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp, subject="j.doe@contoso.onmicrosoft.com", email=MAILBOX)
    info = await mg.servers.get("acme")
    assert info is not None and info.document["graph"]["mailbox"] == info.document["from_address"] == MAILBOX


def id_token(**claims: Any) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_the_id_token_must_be_for_this_app_and_directory() -> None:
    mine = {"aud": APP, "tid": TENANT_ID}
    assert _consenting_mailbox(id_token(**mine, preferred_username="A@Contoso.Example"), APP, TENANT_ID) == \
        "A@contoso.example"  # fmt: skip
    assert _consenting_mailbox(id_token(**mine, upn="b@contoso.example"), APP, TENANT_ID) == "b@contoso.example"
    assert _consenting_mailbox(id_token(aud=APP, tid="other", email="c@x.example"), APP, "organizations") == \
        "c@x.example"  # fmt: skip
    for claims, why in (({"aud": "another-app", "tid": TENANT_ID, "email": MAILBOX}, "another application"),
                        ({"aud": APP, "tid": "another-directory", "email": MAILBOX}, "another directory"),
                        ({**mine, "preferred_username": "+4912345678"}, "no mailbox address")):  # fmt: skip
        with pytest.raises(SettingsError, match=why):
            _consenting_mailbox(id_token(**claims), APP, TENANT_ID)
    with pytest.raises(SettingsError, match="no id_token"):
        _consenting_mailbox(None, APP, TENANT_ID)


async def test_consent_is_only_for_a_delegated_graph_server(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    doc = delegated_doc(idp, graph, auth="client_credentials", mailbox=MAILBOX)
    doc["from_address"] = MAILBOX
    await mg.servers.set("acme", doc)
    with pytest.raises(SettingsError, match=r"graph\.auth"):
        await mg.begin_consent("acme")


# ---- sending ----------------------------------------------------------------------------------------


async def test_connect_through_the_api_then_the_worker_sends_as_the_mailbox_with_its_own_token(
    idp: FakeIdentityProvider, graph: FakeGraph, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin, _ = await api.mg.api_tokens.create("tenant-admin", "acme")
    headers = {"Authorization": f"Bearer {admin}"}
    doc = delegated_doc(idp, graph)
    doc["debug"] = {"protocol_log": True}
    assert (await api.client.put("/v1/tenants/acme/server", json=doc, headers=headers)).status_code == 200
    reply = await api.client.post("/v1/tenants/acme/server/oauth/connect", headers=headers)
    assert reply.status_code == 200
    redirect, _ = idp.consent(reply.json()["authorize_url"], subject=MAILBOX)
    callback = urlsplit(redirect)
    back = await api.client.get(f"{callback.path}?{callback.query}")  # the browser, without a token
    assert back.headers["location"] == "/v1/oauth/callback/done?result=connected"
    [first_refresh_token] = idp.refresh_tokens_for(MAILBOX)

    pk = await api.mg.submit("acme", Message(to="alice@example.org", subject="Review due", text="Please review."))
    await api.mg.run_worker(until_idle=True)
    assert (await api.mg.queue.get(pk)).summary.status == "sent"
    [sent] = graph.sent
    assert sent.from_ == MAILBOX and sent.to == ["alice@example.org"]
    assert sent.token is not None and (sent.token.grant, sent.token.subject) == ("refresh_token", MAILBOX)
    assert sent.token.scopes == ("Mail.Send",) and sent.token.roles == ()
    assert [r.path for r in graph.requests] == ["/v1.0/me/sendMail"]
    refresh = idp.token_requests[-1].form
    assert refresh == {"grant_type": "refresh_token", "refresh_token": first_refresh_token,
                       "scope": f"{SEND} offline_access", "client_id": APP, "client_secret": SECRET}  # fmt: skip
    # Entra ID replaced the refresh token: the newest is stored, for the next worker.
    newest = idp.refresh_tokens_for(MAILBOX)[-1]
    assert newest != first_refresh_token and await stored_refresh_token(api.mg) == newest

    shown = [
        (await api.client.get("/v1/tenants/acme/server", headers=headers)).text,
        (await api.client.get("/v1/tenants/acme/server/health", headers=headers)).text,
        (await api.client.get("/v1/audit", headers=headers)).text,
        (await api.client.get(f"/v1/messages/{pk}", headers=api.sender)).text,
        caplog.text,
    ]
    assert "/v1.0/me/sendMail" in caplog.text  # the protocol log ran, and shows no token either
    for token in (first_refresh_token, newest, SECRET):
        assert not any(token in text for text in shown)


async def test_large_attachments_go_by_upload_session_on_the_mailbox_with_mail_readwrite(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph, large_attachments=True))
    await connect(mg, idp)
    big = Attachment("export.bin", "application/octet-stream", bytes(range(256)) * (5 * 4096))  # 5 MiB
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="Export", text="attached", attachments=[big]))
    assert (await mg.queue.get(pk)).summary.status == "sent"
    [sent] = graph.sent
    assert sent.via == "draft" and sent.from_ in (None, MAILBOX) and sent.attachments[0].data == big.data
    assert sent.token is not None and set(sent.token.scopes) == {"Mail.Send", "Mail.ReadWrite"}
    assert all(r.path.startswith(("/v1.0/me/", "/upload/")) for r in graph.requests)


async def test_mail_for_a_mailbox_never_connected_waits_until_it_is_connected(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    # As for an SMTP server whose mailbox is not connected: the message is kept, nothing is sent.
    await mg.servers.set("acme", delegated_doc(idp, graph))
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="s", text="t"))
    assert not graph.requests and not idp.token_requests
    waiting = (await mg.queue.get(pk)).summary
    assert waiting.status == "deferred" and "no mailbox is connected" in (waiting.last_error or "")
    await connect(mg, idp)
    await mg.run_worker(until_idle=True)
    assert (await mg.queue.get(pk)).summary.status == "sent"
    [sent] = graph.sent
    assert sent.from_ in (None, MAILBOX)


async def test_a_revoked_grant_marks_the_server_broken_until_the_mailbox_is_connected_again(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp)
    for token in idp.refresh_tokens_for(MAILBOX):
        idp.revoke_refresh_token(token)
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="s", text="t"))
    assert (await mg.queue.get(pk)).summary.status == "deferred"
    resolution = await mg.resolve("acme")
    assert resolution.broken_reason is not None and "AADSTS70008" in resolution.broken_reason
    assert "connects the mailbox again" in resolution.broken_reason
    await connect(mg, idp)  # a consent mends the server: the message goes
    await mg.run_worker(until_idle=True)
    assert (await mg.queue.get(pk)).summary.status == "sent"


async def test_a_grant_without_mail_readwrite_is_refused_for_large_attachments_with_aadsts65001(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    # A refresh token given directly (not through the consent) whose grant lacks Mail.ReadWrite.
    idp.add_refresh_token("1.AQ-given", client_id=APP, subject=MAILBOX, scope=f"{SEND} offline_access", rotate=True)
    doc = delegated_doc(idp, graph, large_attachments=True, mailbox=MAILBOX, refresh_token="1.AQ-given")
    await mg.servers.set("acme", doc)
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="s", text="t"))
    assert (await mg.queue.get(pk)).summary.status == "deferred"
    resolution = await mg.resolve("acme")
    assert resolution.broken_reason is not None and "AADSTS65001" in resolution.broken_reason
    assert "Mail.ReadWrite" in resolution.broken_reason and "connect the mailbox again" in resolution.broken_reason


async def test_a_refresh_token_given_directly_needs_its_mailbox(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    with pytest.raises(SettingsError, match=r"graph\.mailbox"):
        await mg.servers.set("acme", delegated_doc(idp, graph, refresh_token="1.AQ-given"))


# ---- consent again, and Reset ------------------------------------------------------------------


async def connected_document(mg: Mailgate) -> dict[str, Any]:
    info = await mg.servers.get("acme")
    assert info is not None
    return info.document


async def test_saving_the_same_settings_keeps_the_connection(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp)
    granted = await stored_refresh_token(mg)
    await mg.servers.set("acme", await connected_document(mg))  # as read back: the secrets {"set": true}
    again = delegated_doc(idp, graph)  # the document first saved: no mailbox, no from_address
    again["from_name"] = "Contoso Notifications"
    await mg.servers.set("acme", again)
    doc = await connected_document(mg)
    assert (doc["from_address"], doc["graph"]["mailbox"], doc["from_name"]) == (MAILBOX, MAILBOX,
                                                                                "Contoso Notifications")  # fmt: skip
    assert await stored_refresh_token(mg) == granted
    assert (await mg.servers.health("acme")).consented_at is not None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"from_address": "billing@contoso.example", "graph.allow_delegate": True}, "from_address changed"),
        ({"graph.large_attachments": True}, "Mail.ReadWrite"),
        ({"graph.mailbox": "other@contoso.example", "from_address": "other@contoso.example"}, "graph.mailbox changed"),
        ({"graph.directory_id": "contoso.onmicrosoft.com", "graph.client_secret": SECRET}, "graph.directory_id"),
    ],
)
async def test_a_change_that_makes_the_grant_wrong_asks_for_consent_again(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate, change: dict[str, Any], why: str
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp)
    doc = await connected_document(mg)
    for path, value in change.items():
        *parents, name = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[name] = value
    info = await mg.servers.set("acme", doc)
    assert info.document["graph"]["refresh_token"] == {"set": False}
    assert await stored_refresh_token(mg) is None
    assert (await mg.servers.health("acme")).consented_at is None
    [removed] = [c for c in (await mg.audit_log("acme"))[0].changes if c.get("secret") == "removed"]
    assert removed["field"] == "graph.refresh_token" and why in removed["why"]
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="s", text="t"))
    assert "no mailbox is connected" in ((await mg.queue.get(pk)).summary.last_error or "")
    assert not graph.requests


async def test_reset_forgets_the_tokens_and_the_sender_the_consent_set(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp)
    info = await mg.reset_consent("acme")
    doc = info.document
    assert doc["from_address"] is None and doc["graph"]["mailbox"] is None
    assert doc["graph"]["refresh_token"] == {"set": False} and doc["graph"]["client_secret"] == {"set": True}
    [entry] = [e for e in await mg.audit_log("acme") if e.action == "server.consent_reset"]
    assert entry.changes == [{"field": "graph.mailbox", "from": MAILBOX, "to": None},
                             {"field": "from_address", "from": MAILBOX, "to": None},
                             {"field": "graph.refresh_token", "secret": "removed"}]  # fmt: skip
    assert (await mg.servers.health("acme")).consented_at is None
    await connect(mg, idp, subject="alerts@contoso.example")  # another mailbox connects: it sends now
    doc = await connected_document(mg)
    assert doc["from_address"] == doc["graph"]["mailbox"] == "alerts@contoso.example"


# ---- the test e-mail ----------------------------------------------------------------------------


async def test_the_test_email_says_delegated_the_scopes_granted_and_the_mailbox(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    report = await mg.test_server("acme", "alice@example.org")
    assert not report.ok and report.failed is not None and report.failed.name == "resolve settings"
    assert "no mailbox is connected" in report.failed.details["error"]
    assert report.failed.explanation is not None and "Connect" in report.failed.explanation.fix

    await connect(mg, idp)
    report = await mg.test_server("acme", "alice@example.org")
    assert report.ok, report.to_dict()
    steps = {s.name: s.details for s in report.steps}
    assert steps["resolve settings"]["auth"] == "delegated"
    assert steps["token"]["token"].startswith("delegated") and steps["token"]["mailbox"] == MAILBOX
    assert steps["token"]["scopes"] == ["Mail.Send"] and steps["token"]["granted_scope"] == SEND
    assert steps["token"]["user"] == MAILBOX
    assert steps["permissions"]["needed"] == ["Mail.Send"] and steps["permissions"]["granted"] == ["Mail.Send"]
    [sent] = graph.sent
    assert sent.from_ == MAILBOX and sent.subject == "mailgate test e-mail"
    granted = await stored_refresh_token(mg)
    assert granted is not None and granted not in json.dumps(report.to_dict())


async def test_the_test_email_explains_a_grant_without_mail_readwrite(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    idp.add_refresh_token("1.AQ-given", client_id=APP, subject=MAILBOX, scope=f"{SEND} offline_access")
    await mg.servers.set("acme", delegated_doc(idp, graph, large_attachments=True, mailbox=MAILBOX,
                                              refresh_token="1.AQ-given"))  # fmt: skip
    report = await mg.test_server("acme", "alice@example.org")
    assert report.failed is not None and report.failed.name == "token"
    assert report.failed.explanation is not None and "AADSTS65001" in report.failed.explanation.cause
    assert "connect the mailbox again" in report.failed.explanation.fix


# ---- where the settings may point ---------------------------------------------------------------


async def test_a_tenants_authority_on_the_operators_network_is_refused(
    idp: FakeIdentityProvider, graph: FakeGraph, database_url: str
) -> None:
    strict = Config(retry_base=0.05, poll_interval=0.05)  # tenants may not reach loopback
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=strict) as mg:
        await mg.tenants.add("acme", may_use_own_server=True)
        with pytest.raises(SettingsError) as refused:
            await mg.servers.set("acme", delegated_doc(idp, graph))
    assert {field for field, _ in refused.value.problems} == {"graph.authority", "graph.endpoint"}


# ---- the admin page -----------------------------------------------------------------------------


async def test_the_page_connects_a_graph_mailbox_shows_it_and_resets_it(
    ui: UI,  # noqa: F811
    idp: FakeIdentityProvider,
    graph: FakeGraph,
) -> None:
    from test_web import ACME

    b = await ui.signed_in(ACME)
    await b.get("/admin/tenants/acme")
    form = {"enabled": "on", "from_name": "Contoso", "kind": "graph", "graph.auth": "delegated",
            "graph.directory_id": TENANT_ID, "graph.client_id": APP, "graph.client_secret": SECRET,
            "graph.authority": idp.url, "graph.endpoint": graph.url, "graph.delegate_as": "send_as",
            "graph.save_to_sent_items": "on", "graph.mailbox": "ignored@contoso.example"}  # fmt: skip
    reply = await b.post("/admin/servers/acme", form)
    assert reply.status_code == 303, text_of(reply)
    page = await b.get("/admin/tenants/acme")
    assert "Connect with Microsoft 365" in text_of(page) and "Not connected yet" in text_of(page)
    info = await ui.mg.servers.get("acme")
    assert info is not None and info.document["graph"]["mailbox"] is None  # hidden for delegated: not sent
    reply = await b.post("/admin/servers/acme/connect")
    assert reply.status_code == 303 and reply.headers["location"].startswith(f"{idp.url}/{TENANT_ID}/")
    redirect, _ = idp.consent(reply.headers["location"], subject=MAILBOX)
    callback = urlsplit(redirect)
    back = await b.client.get(f"{callback.path}?{callback.query}")
    assert back.headers["location"] == "/admin/tenants/acme#consent"
    page = await b.get("/admin/tenants/acme")
    assert f"Connected: {MAILBOX} now sends the mail of acme." in text_of(page)
    assert f"Connected: {MAILBOX} , consent given" in text_of(page)
    assert f'value="{MAILBOX}"' in page.text  # the sender address field shows the learnt mailbox
    granted = idp.refresh_tokens_for(MAILBOX)[-1]
    assert granted not in page.text and SECRET not in page.text
    # Saving the page unchanged keeps the connection.
    form |= {"from_address": MAILBOX, "csrf_token": b.csrf}
    del form["graph.mailbox"]
    assert (await b.post("/admin/servers/acme", form)).status_code == 303
    assert "Reset…" in text_of(await b.get("/admin/tenants/acme"))
    assert (await b.post("/admin/servers/acme/reset")).status_code == 303
    page = await b.get("/admin/tenants/acme")
    assert "Not connected yet" in text_of(page) and f'value="{MAILBOX}"' not in page.text


async def test_graph_refusing_the_mailbox_says_to_connect_it_again(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    await connect(mg, idp)
    graph.refuse_next(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    [pk] = await deliver(mg, Message(to="alice@example.org", subject="s", text="t"))
    assert (await mg.queue.get(pk)).summary.status == "deferred"
    resolution = await mg.resolve("acme")
    assert resolution.broken_reason is not None and "ErrorAccessDenied" in resolution.broken_reason
    assert "delegated Microsoft Graph permissions" in resolution.broken_reason
    assert "connect the mailbox again" in resolution.broken_reason


async def test_a_consent_by_an_account_without_a_mailbox_address_connects_nothing(
    idp: FakeIdentityProvider, graph: FakeGraph, api: Api
) -> None:
    await api.mg.servers.set("acme", delegated_doc(idp, graph))
    url = await api.mg.begin_consent("acme")
    redirect, _ = idp.consent(url, subject="+4912345678")  # a phone-number sign-in: no address in the id_token
    callback = urlsplit(redirect)
    back = await api.client.get(f"{callback.path}?{callback.query}")
    assert back.headers["location"] == "/v1/oauth/callback/done?result=no_mailbox"
    page = await api.client.get(back.headers["location"])
    assert "did not say which mailbox consented" in page.text
    assert await stored_refresh_token(api.mg) is None
    assert (await api.mg.servers.health("acme")).consented_at is None


async def test_a_consent_to_fewer_permissions_is_refused_at_the_redemption(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("acme", delegated_doc(idp, graph))
    url = await mg.begin_consent("acme")
    fewer = url.replace("Mail.Send", "User.Read")  # what the account consented to: not Mail.Send
    redirect, code = idp.consent(fewer, subject=MAILBOX)
    with pytest.raises(TokenError) as refused:
        await mg.complete_consent(parse_qs(urlsplit(redirect).query)["state"][0], code)
    assert refused.value.error_codes == [65001] and "connect the mailbox again" in refused.value.explanation.fix
    assert await stored_refresh_token(mg) is None
