"""The EWS transport end to end through the outbox, against a fake Exchange (real HTTP on
127.0.0.1) that checks every request as Exchange does: SOAP envelope and namespaces,
RequestServerVersion, CreateItem's shape, the MimeContent and recipients, and the credentials —
a real NTLM handshake, Basic, or a Bearer token of the fake identity provider. Refusals map to
retry (ErrorServerBusy with its BackOffMilliseconds, 5xx), a broken server (401,
ErrorAccessDenied, ErrorNonExistentMailbox, ErrorImpersonateUserDenied) or a failed message
(ErrorInvalidRecipients, ErrorMessageSizeExceeded); the destination policy covers ews.url."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

import test_graph
from conftest import TEST_KEY
from fakes.ews import NS_M, NS_SOAP, NS_T, FakeEWS
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, Message
from mailgate.config import Config
from mailgate.errors import SettingsError
from test_graph import deliver, note, status

mg = test_graph.mg  # the fixture: a Mailgate with tenant acme, as the Graph tests have it

ACCOUNT = "CONTOSO\\notify"
PASSWORD = "Ex~change.Pa55-word_0123"
MAILBOX = "notifications@contoso.example"
TENANT_ID = "7f0c2b9e-0000-4000-8000-00000000c0de"
APP = "33333333-4444-5555-6666-777777777777"
APP_SECRET = "Ews~app.secret-value_0123456789"


@pytest.fixture
def ews() -> Iterator[FakeEWS]:
    with FakeEWS(schemes=("NTLM", "Basic")) as fake:
        fake.add_account(ACCOUNT, PASSWORD)
        fake.add_account("CONTOSO\\other", "other-password")
        fake.add_mailbox(MAILBOX, owner=ACCOUNT, send_as=())
        fake.add_mailbox("billing@contoso.example", owner="CONTOSO\\other", send_as=(ACCOUNT,))
        fake.add_mailbox("ceo@contoso.example", owner="CONTOSO\\other")
        yield fake


def ews_doc(ews: FakeEWS, *, scheme: str = "ntlm", password: str = PASSWORD, **settings: Any) -> dict[str, Any]:
    from_address = settings.pop("from_address", MAILBOX)
    return {"kind": "ews", "from_address": from_address, "from_name": "Contoso",
            "auth": {"method": "password", "username": ACCOUNT, "password": password},
            "ews": {"url": ews.ews_url, "mailbox": MAILBOX, "password_scheme": scheme, **settings},
            "connection": {"connect_timeout": 5, "protocol_timeout": 10}}  # fmt: skip


def soap(body: bytes) -> ET.Element:
    root = ET.fromstring(body)
    assert root.tag == f"{{{NS_SOAP}}}Envelope"
    return root


# ---- sending ----------------------------------------------------------------------------------


async def test_a_message_goes_as_mime_over_ntlm_with_every_recipient(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    message = note(cc="bob@example.org", bcc="auditor@example.org",
                   headers=[("List-Unsubscribe", "<mailto:unsub@contoso.example>")])  # fmt: skip
    [pk] = await deliver(mg, message)
    assert await status(mg, pk) == "sent"
    [sent] = ews.sent
    assert sent.account == ACCOUNT.lower() and sent.mailbox == MAILBOX and sent.from_ == MAILBOX
    # Bcc is never in the composed headers: the request names it, so Exchange sends it there too.
    assert (sent.to, sent.cc, sent.bcc) == (["alice@example.org"], ["bob@example.org"], ["auditor@example.org"])
    assert sent.disposition == "SendAndSaveCopy" and sent.saved and sent.version == "Exchange2013"
    parsed = sent.parsed()
    assert parsed["Subject"] == "Zugriffsprüfung fällig" and parsed["Bcc"] is None
    assert parsed["List-Unsubscribe"] == "<mailto:unsub@contoso.example>"
    assert ews.ntlm_handshakes == 1
    [create] = [r for r in ews.requests if r.body and b"CreateItem" in r.body]
    assert create.headers["content-type"] == "text/xml; charset=utf-8"
    assert create.headers["authorization"].startswith("NTLM ")  # the third leg carries the request
    root = soap(create.body)
    assert root.find(f"{{{NS_SOAP}}}Header/{{{NS_T}}}RequestServerVersion").get("Version") == "Exchange2013"
    item = root.find(f".//{{{NS_M}}}CreateItem")
    assert item is not None and item.get("MessageDisposition") == "SendAndSaveCopy"
    folder = item.find(f"{{{NS_M}}}SavedItemFolderId/{{{NS_T}}}DistinguishedFolderId")
    assert folder is not None and folder.get("Id") == "sentitems"
    assert folder.findtext(f"{{{NS_T}}}Mailbox/{{{NS_T}}}EmailAddress") == MAILBOX
    mime = item.findtext(f".//{{{NS_T}}}MimeContent")
    assert mime is not None and base64.b64decode(mime) == sent.mime
    attempt = (await mg.queue.get(pk)).attempts[-1]
    assert attempt["server"]["address"] == f"ews:{MAILBOX}"


async def test_an_ntlm_connection_stays_authenticated(ews: FakeEWS, mg: Mailgate) -> None:
    doc = ews_doc(ews)
    doc["connection"]["pool_size"] = 1
    await mg.servers.set("global", doc)
    pks = await deliver(mg, *(note(to=f"u{i}@example.org") for i in range(5)))
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 5
    assert len(ews.sent) == 5 and ews.ntlm_handshakes == 1  # one handshake, then the connection is known
    assert [r.headers.get("authorization") is None for r in ews.requests].count(True) == 4


async def test_basic_and_send_only(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews, scheme="basic", save_to_sent_items=False))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent"
    [sent] = ews.sent
    assert sent.disposition == "SendOnly" and not sent.saved
    [create] = [r for r in ews.requests if b"CreateItem" in r.body]
    expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{PASSWORD}".encode()).decode()
    assert create.headers["authorization"] == expected
    assert soap(create.body).find(f".//{{{NS_M}}}SavedItemFolderId") is None
    assert ews.ntlm_handshakes == 0


async def test_exchange_version_is_sent_as_set(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews, exchange_version="Exchange2016"))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent" and ews.sent[0].version == "Exchange2016"


async def test_send_as_another_address_needs_allow_delegate(ews: FakeEWS, mg: Mailgate) -> None:
    with pytest.raises(SettingsError, match="allow_delegate"):
        await mg.servers.set("global", ews_doc(ews, from_address="billing@contoso.example"))
    await mg.servers.set("global", ews_doc(ews, from_address="billing@contoso.example", allow_delegate=True))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent"
    [sent] = ews.sent
    assert sent.from_ == "billing@contoso.example" and sent.mailbox == MAILBOX
    [create] = [r for r in ews.requests if b"CreateItem" in r.body]
    assert soap(create.body).findtext(f".//{{{NS_T}}}From/{{{NS_T}}}Mailbox/{{{NS_T}}}EmailAddress") == \
        "billing@contoso.example"  # fmt: skip


async def test_a_message_from_another_address_without_allow_delegate_fails(ews: FakeEWS, mg: Mailgate) -> None:
    # "any": the global server's default sender policy (fixed) would send it from the mailbox instead.
    await mg.servers.set("global", {**ews_doc(ews), "from_policy": "any"})
    [pk] = await deliver(mg, note(from_="ceo@contoso.example"))
    assert await status(mg, pk) == "failed"
    assert not ews.sent and "ews.allow_delegate" in (await mg.queue.get(pk)).attempts[-1]["text"]


async def test_send_as_denied_fails_the_message(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", {**ews_doc(ews, from_address=MAILBOX, allow_delegate=True), "from_policy": "any"})
    [pk] = await deliver(mg, note(from_="ceo@contoso.example"))
    assert await status(mg, pk) == "failed"
    text = (await mg.queue.get(pk)).attempts[-1]["text"]
    assert "ErrorSendAsDenied" in text and "Send As" in text
    assert (await mg.resolve("acme")).broken_reason is None


# ---- what Exchange says -------------------------------------------------------------------------


async def test_server_busy_waits_its_back_off_then_succeeds(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    ews.fail_next("ErrorServerBusy", fault=True, back_off_ms=2000)  # a SOAP fault, HTTP 500
    [pk] = await deliver(mg, note())
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred" and "ErrorServerBusy" in detail.attempts[-1]["text"]
    due, started = detail.summary.due_at, datetime.fromisoformat(detail.attempts[-1]["started_at"])
    assert due is not None and (due - started).total_seconds() >= 2  # BackOffMilliseconds, not the 0.05 s backoff
    assert (await mg.resolve("acme")).broken_reason is None
    await asyncio.sleep(2.1)
    await mg.run_worker(until_idle=True)
    assert await status(mg, pk) == "sent" and len(ews.sent) == 1


async def test_server_busy_in_a_response_message_is_transient_too(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    ews.fail_next("ErrorServerBusy", back_off_ms=40_000)
    [pk] = await deliver(mg, note())
    detail = await mg.queue.get(pk)
    due, started = detail.summary.due_at, datetime.fromisoformat(detail.attempts[-1]["started_at"])
    assert detail.summary.status == "deferred" and due is not None and (due - started).total_seconds() >= 40
    assert (await mg.resolve("acme")).broken_reason is None


@pytest.mark.parametrize("status_code", [500, 503])
async def test_http_5xx_is_transient(ews: FakeEWS, mg: Mailgate, status_code: int) -> None:
    await mg.servers.set("global", ews_doc(ews))
    ews.fail_next("", status=status_code)
    [pk] = await deliver(mg, note())
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred" and f"HTTP {status_code}" in detail.attempts[-1]["text"]
    assert (await mg.resolve("acme")).broken_reason is None


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param("password", "HTTP 401", id="wrong-password"),
        pytest.param("access", "ErrorAccessDenied", id="access-denied"),
        pytest.param("mailbox", "ErrorNonExistentMailbox", id="no-mailbox"),
    ],
)
async def test_settings_refusals_mark_the_server_broken(ews: FakeEWS, mg: Mailgate, setup: str, expected: str) -> None:
    doc = ews_doc(ews, password="wrong-password" if setup == "password" else PASSWORD)
    if setup == "access":
        doc["ews"]["mailbox"] = doc["from_address"] = "ceo@contoso.example"  # not the account's, no rights
    if setup == "mailbox":
        doc["ews"]["mailbox"] = doc["from_address"] = "nobody@contoso.example"
    await mg.servers.set("global", doc)
    [pk] = await deliver(mg, note(from_=doc["from_address"]))
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and expected in reason and "Fix:" in reason
    assert "wrong-password" not in reason and PASSWORD not in reason
    assert not ews.sent


@pytest.mark.parametrize(
    ("code", "words"),
    [
        pytest.param("ErrorInvalidRecipients", "Correct the recipients", id="recipients"),
        pytest.param("ErrorMessageSizeExceeded", "MaxSendSize", id="size"),
    ],
)
async def test_message_refusals_fail_the_message_not_the_server(
    ews: FakeEWS, mg: Mailgate, code: str, words: str
) -> None:
    await mg.servers.set("global", ews_doc(ews))
    ews.fail_next(code)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "failed"
    text = (await mg.queue.get(pk)).attempts[-1]["text"]
    assert code in text and words in text
    assert (await mg.resolve("acme")).broken_reason is None
    [other] = await deliver(mg, note(to="carol@example.org"))
    assert await status(mg, other) == "sent"


async def test_the_size_limit_is_exchanges(ews: FakeEWS, mg: Mailgate) -> None:
    from mailgate import Attachment

    ews.max_message_size = 200_000
    await mg.servers.set("global", ews_doc(ews))
    [pk] = await deliver(mg, note(attachments=[Attachment("big.bin", "application/octet-stream", b"x" * 300_000)]))
    assert await status(mg, pk) == "failed"
    assert "ErrorMessageSizeExceeded" in (await mg.queue.get(pk)).attempts[-1]["text"]


async def test_a_wrong_version_marks_the_server_broken(ews: FakeEWS, mg: Mailgate) -> None:
    ews.fail_next("ErrorInvalidServerVersion", fault=True)
    await mg.servers.set("global", ews_doc(ews))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and "ErrorInvalidServerVersion" in reason and "exchange_version" in reason


async def test_no_ews_at_the_url_marks_the_server_broken(ews: FakeEWS, mg: Mailgate) -> None:
    doc = ews_doc(ews)
    doc["ews"]["url"] = ews.url + "/owa/"
    await mg.servers.set("global", doc)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and "HTTP 404" in reason and "Exchange.asmx" in reason


def autodiscover_doc(ews: FakeEWS) -> dict[str, Any]:
    doc = ews_doc(ews)
    doc["ews"] = {k: v for k, v in doc["ews"].items() if k != "url"} | {"autodiscover": True}
    return doc


async def send_directly(
    server: Any, message: Message, *, new_http: Callable[[], Any] | None = None, **kw: Any
) -> tuple[Any, Any]:
    """One EWSTransport of `server`, sending `message` twice: (the first Delivery, the transport)."""
    from mailgate._http import new_client
    from mailgate.transports.ews import EWSTransport

    new_http = new_http or new_client
    http = new_http()
    transport = EWSTransport(server, http, new_http=new_http, **kw)
    try:
        first = await transport.send(message.envelope(), message)
        await transport.send(message.envelope(), message)
    finally:
        await transport.aclose()
        await http.aclose()
    return first, transport


async def test_autodiscover_finds_the_ews_url_once() -> None:
    """Over https: an EWS URL that Autodiscover names is used only if it is https."""
    import httpx2
    from cryptography.hazmat.primitives import serialization

    from certs import make_ca
    from mailgate.settings.document import parse_server

    ca = make_ca("mailgate test CA")
    cert = ca.issue()
    der = cert.certificate.public_bytes(serialization.Encoding.DER)
    tried: list[str] = []
    with FakeEWS(tls=(cert.server_context(), der)) as ews:
        ews.add_account(ACCOUNT, PASSWORD)
        ews.add_mailbox(MAILBOX, owner=ACCOUNT)

        def candidates(domain: str) -> list[str]:  # the fake stands for the domain's web server
            tried.append(domain)
            return [ews.url + "/not-here/autodiscover.xml", ews.url + "/autodiscover/autodiscover.xml"]

        first, transport = await send_directly(
            parse_server(autodiscover_doc(ews)), note(from_=MAILBOX), autodiscover_urls=candidates,
            new_http=lambda: httpx2.AsyncClient(verify=ca.client_context()),  # the test CA, not the public ones
        )  # fmt: skip
        assert ews.ews_url.startswith("https://")
        assert [r.outcome for r in first.results] == ["accepted"] and len(ews.sent) == 2
        assert tried == ["contoso.example"] and transport.url == ews.ews_url  # the external (EXPR) URL
        discover = [r for r in ews.requests if r.path.startswith("/autodiscover")]
        assert len(discover) == 2  # the NTLM negotiate leg and the authenticated request, once
        assert discover[-1].headers["authorization"].startswith("NTLM ") and MAILBOX.encode() in discover[-1].body


async def test_autodiscover_follows_no_redirect(ews: FakeEWS) -> None:
    from mailgate.settings.document import parse_server
    from mailgate.transports.ews import EWSError

    ews.autodiscover_redirect = "notifications@attacker.example"
    with pytest.raises(EWSError) as refused:
        await send_directly(parse_server(autodiscover_doc(ews)), note(from_=MAILBOX),
                            autodiscover_urls=lambda domain: [ews.url + "/autodiscover/autodiscover.xml"])  # fmt: skip
    assert (
        not refused.value.transient and "redirectAddr" in refused.value.message and "ews.url" in refused.value.message
    )
    assert not ews.sent and not [r for r in ews.requests if r.path == "/EWS/Exchange.asmx"]


async def test_autodiscover_of_a_domain_that_does_not_answer_waits(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", autodiscover_doc(ews))  # contoso.example: no such host
    [pk] = await deliver(mg, note())
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred" and "Autodiscover found no EWS URL for contoso.example" in \
        detail.attempts[-1]["text"]  # fmt: skip
    assert (await mg.resolve("acme")).broken_reason is None and not ews.requests


async def test_a_reply_that_is_not_ews_is_not_quoted(mg: Mailgate) -> None:
    """ews.url is a setting: whatever answers there is not shown to the tenant's admin."""
    from fakes.identity import HTTPRequest, HTTPResponse, ThreadedFake

    class Intranet(ThreadedFake):
        def _handle(self, request: HTTPRequest) -> HTTPResponse:
            page = b"<html><title>internal wiki: payroll</title></html>"
            return HTTPResponse(200, page, [("Content-Type", "text/html")])

    with Intranet() as intranet:
        url = intranet.url + "/EWS/Exchange.asmx"
        doc = {"kind": "ews", "from_address": MAILBOX,
               "auth": {"method": "password", "username": ACCOUNT, "password": PASSWORD},
               "ews": {"url": url, "mailbox": MAILBOX, "password_scheme": "basic"}}  # fmt: skip
        await mg.servers.set("global", doc)
        [pk] = await deliver(mg, note())
    reason = (await mg.resolve("acme")).broken_reason
    assert await status(mg, pk) == "deferred" and reason is not None
    assert "not as EWS" in reason and "payroll" not in reason


# ---- the destination policy, secrets ----------------------------------------------------------


async def test_a_tenants_ews_url_on_the_operators_network_is_refused(ews: FakeEWS, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    async with Mailgate.open(
        url, secret_keys=TEST_KEY, config=Config(tenant_networks="loopback", **_fast())
    ) as allowed:
        await allowed.servers.set(
            "global", {"from_address": "no-reply@example.com", "smtp": {"host": "smtp.example.com"}}
        )
        await allowed.tenants.add("acme", may_use_own_server=True)
        await allowed.servers.set("acme", ews_doc(ews))  # saved while the operator allowed loopback
    async with Mailgate.open(url, secret_keys=TEST_KEY, config=Config(**_fast())) as mg:
        with pytest.raises(SettingsError) as saving:
            await mg.servers.set("acme", ews_doc(ews))
        [pk] = await deliver(mg, note())  # the worker's connection is checked as well
        reason = (await mg.resolve("acme")).broken_reason
        assert await status(mg, pk) == "deferred"
    assert [f for f, _ in saving.value.problems] == ["ews.url"]
    assert "loopback" in saving.value.problems[0][1]
    assert reason is not None and "loopback" in reason and "MAILGATE_TENANT_NETWORKS" in reason
    assert not ews.requests  # nothing reached the server on the operator's network


def _fast() -> dict[str, Any]:
    return {"retry_base": 0.05, "retry_max_delay": 0.2, "poll_interval": 0.05, "broken_recheck": 60, "lease": 30}


async def test_secrets_never_reach_the_logs(ews: FakeEWS, mg: Mailgate, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailgate")
    for doc in (ews_doc(ews), ews_doc(ews, scheme="basic"), ews_doc(ews, scheme="basic", password="not-the-password")):
        await mg.servers.set("global", doc | {"debug": {"protocol_log": True}})
        await deliver(mg, note())
    assert len(ews.sent) == 2
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mailgate"))
    assert "C: POST " + ews.ews_url in logged and "S: 200" in logged and "S: 401" in logged  # the log was on
    credentials = [r.headers["authorization"].partition(" ")[2] for r in ews.requests if "authorization" in r.headers]
    assert len(credentials) >= 4 and not any(c in logged for c in credentials)  # NTLM legs, Basic
    assert PASSWORD not in logged and "not-the-password" not in logged
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and "HTTP 401" in reason and "not-the-password" not in reason


# ---- OAuth2 -------------------------------------------------------------------------------------


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(APP, APP_SECRET, roles=("full_access_as_app",))
        fake.add_app("no-rights-app", "no-rights-secret", roles=())
        yield fake


@pytest.fixture
def ews_oauth(idp: FakeIdentityProvider) -> Iterator[FakeEWS]:
    with FakeEWS(schemes=("Bearer",), idp=idp) as fake:
        fake.add_mailbox(MAILBOX, owner=MAILBOX)
        yield fake


def oauth_doc(idp: FakeIdentityProvider, ews: FakeEWS, **token: Any) -> dict[str, Any]:
    source = {"grant": "client_credentials", "provider": "microsoft", "authority": idp.url,
              "directory_id": TENANT_ID, "client_id": APP, "client_secret": APP_SECRET, **token}  # fmt: skip
    return {"kind": "ews", "from_address": MAILBOX,
            "auth": {"method": "oauth2", "username": MAILBOX, "token": source},
            "ews": {"url": ews.ews_url, "mailbox": MAILBOX},
            "connection": {"connect_timeout": 5, "protocol_timeout": 10}}  # fmt: skip


async def test_app_only_oauth_impersonates_the_mailbox(
    idp: FakeIdentityProvider, ews_oauth: FakeEWS, mg: Mailgate
) -> None:
    await mg.servers.set("global", oauth_doc(idp, ews_oauth))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent"
    [sent] = ews_oauth.sent
    assert sent.account == f"app:{APP}" and sent.mailbox == MAILBOX
    [token_request] = idp.token_requests
    assert token_request.form is not None and token_request.form["scope"] == "https://outlook.office365.com/.default"
    [create] = [r for r in ews_oauth.requests if b"CreateItem" in r.body]
    info = idp.check(create.headers["authorization"].removeprefix("Bearer "))
    assert info is not None and info.audience == "https://outlook.office365.com"
    sid = soap(create.body).find(f"{{{NS_SOAP}}}Header/{{{NS_T}}}ExchangeImpersonation/{{{NS_T}}}ConnectingSID")
    assert sid is not None and sid.findtext(f"{{{NS_T}}}PrimarySmtpAddress") == MAILBOX


async def test_an_app_that_may_not_impersonate_marks_the_server_broken(
    idp: FakeIdentityProvider, ews_oauth: FakeEWS, mg: Mailgate
) -> None:
    await mg.servers.set("global", oauth_doc(idp, ews_oauth, client_id="no-rights-app",
                                             client_secret="no-rights-secret"))  # fmt: skip
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and "ErrorImpersonateUserDenied" in reason and "ApplicationImpersonation" in reason


async def test_a_delegated_token_sends_as_its_user(idp: FakeIdentityProvider, ews_oauth: FakeEWS, mg: Mailgate) -> None:
    scope = "https://outlook.office365.com/EWS.AccessAsUser.All offline_access"
    idp.add_refresh_token("rt-ews-1", client_id=APP, subject=MAILBOX, scope=scope)
    await mg.servers.set("global", oauth_doc(idp, ews_oauth, grant="refresh_token", refresh_token="rt-ews-1"))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent"
    [sent] = ews_oauth.sent
    assert sent.account == MAILBOX
    [token_request] = idp.token_requests
    assert token_request.form is not None and token_request.form["scope"] == scope
    [create] = [r for r in ews_oauth.requests if b"CreateItem" in r.body]
    assert soap(create.body).find(f".//{{{NS_T}}}ExchangeImpersonation") is None


# ---- the test e-mail ----------------------------------------------------------------------------


async def test_the_test_e_mail_goes_through_the_ews_steps(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    report = (await mg.test_server("global", "admin@example.org")).to_dict()
    assert report["kind"] == "ews" and report["ok"], report
    assert [s["name"] for s in report["steps"]] == ["resolve settings", "credentials", "GetFolder", "CreateItem"]
    get_folder = report["steps"][2]["details"]
    assert get_folder["server_version"] == "15.2.1544.4 (V2017_07_11)" and get_folder["requested_version"] == \
        "Exchange2013"  # fmt: skip
    assert [m.to for m in ews.sent] == [["admin@example.org"]]
    assert PASSWORD not in str(report)


async def test_a_dry_test_e_mail_sends_nothing(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    report = (await mg.test_server("global", "admin@example.org", dry_run=True)).to_dict()
    assert report["ok"] and report["steps"][3]["status"] == "skipped" and not ews.sent
    assert [op for op, _ in ews.operations] == ["GetFolder"]


@pytest.mark.parametrize(
    ("setup", "step", "words"),
    [
        pytest.param("password", "GetFolder", "HTTP 401", id="wrong-password"),
        pytest.param("mailbox", "GetFolder", "ErrorNonExistentMailbox", id="no-mailbox"),
        pytest.param("recipients", "CreateItem", "ErrorInvalidRecipients", id="recipients"),
        pytest.param("autodiscover", "GetFolder", "ews.url", id="autodiscover"),
    ],
)
async def test_the_test_e_mail_explains_each_failure(
    ews: FakeEWS, mg: Mailgate, setup: str, step: str, words: str
) -> None:
    doc = ews_doc(ews, password="wrong-password" if setup == "password" else PASSWORD)
    if setup == "mailbox":
        doc["ews"]["mailbox"] = doc["from_address"] = "nobody@contoso.example"
    if setup == "autodiscover":
        doc["ews"] = {k: v for k, v in doc["ews"].items() if k != "url"} | {"autodiscover": True}
    await mg.servers.set("global", doc)
    if setup == "recipients":
        ews.fail_next("ErrorInvalidRecipients", operation="CreateItem")
    report = (await mg.test_server("global", "admin@example.org")).to_dict()
    failed = next(s for s in report["steps"] if s["status"] == "failed")
    assert failed["name"] == step and (words in failed["cause"] or words in failed["fix"]), failed
    assert failed["fix"]


# ---- NTLM over TLS with Extended Protection -------------------------------------------------------


@pytest.mark.parametrize("bound", [True, False], ids=["channel-bound", "server-without-ep"])
async def test_ntlm_over_tls_carries_the_channel_binding(bound: bool) -> None:
    """Exchange 2019 CU14 turns Extended Protection on: NTLM over TLS must name the server's
    certificate. The fake's acceptor (pyspnego) refuses a handshake whose binding differs."""
    import httpx2
    from cryptography.hazmat.primitives import serialization

    from certs import make_ca
    from mailgate.message import Envelope
    from mailgate.settings.document import parse_server
    from mailgate.transports.ews import EWSTransport

    ca = make_ca("mailgate test CA")
    cert = ca.issue()
    der = cert.certificate.public_bytes(serialization.Encoding.DER)
    with FakeEWS(tls=(cert.server_context(), der), extended_protection=bound) as fake:
        fake.add_account(ACCOUNT, PASSWORD)
        fake.add_mailbox(MAILBOX, owner=ACCOUNT)
        server = parse_server(ews_doc(fake))
        assert server.ews is not None and server.ews.url is not None and server.ews.url.startswith("https://")
        clients: list[httpx2.AsyncClient] = []

        def trusting() -> httpx2.AsyncClient:  # the test CA instead of the public ones
            clients.append(httpx2.AsyncClient(verify=ca.client_context()))
            return clients[-1]

        transport = EWSTransport(server, trusting(), new_http=trusting)
        try:
            message = note(from_=MAILBOX)
            delivery = await transport.send(Envelope(MAILBOX, ("alice@example.org",)), message)
        finally:
            await transport.aclose()
            for client in clients:
                await client.aclose()
        assert [r.outcome for r in delivery.results] == ["accepted"]
        assert fake.ntlm_handshakes == 1 and len(fake.sent) == 1


# ---- the CLI ------------------------------------------------------------------------------------


def test_mailgate_send_through_ews_with_the_password_from_stdin(ews: FakeEWS, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    doc = ews_doc(ews)
    del doc["auth"]["password"]
    path = tmp_path / "ews.json"
    path.write_text(json.dumps(doc))
    mailgate = str(Path(sys.executable).with_name("mailgate"))
    out = subprocess.run([mailgate, "send", "--server", str(path), "--to", "alice@example.org", "--bcc",
                          "auditor@example.org", "--subject", "s", "--text", "t", "--password-stdin", "--protocol-log",
                          "--json"], input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    [sent] = ews.sent
    assert sent.recipients == ["alice@example.org", "auditor@example.org"] and sent.account == ACCOUNT.lower()
    assert "C: POST " + ews.ews_url in out.stderr and PASSWORD not in out.stdout + out.stderr
    assert [r["outcome"] for r in json.loads(out.stdout)["recipients"]] == ["accepted", "accepted"]


@pytest.mark.parametrize(("fault", "expected"), [(True, "deferred"), (False, "failed")], ids=["fault", "response"])
async def test_an_unknown_code_is_about_the_settings_in_a_fault_and_the_message_in_a_response(
    ews: FakeEWS, mg: Mailgate, fault: bool, expected: str
) -> None:
    await mg.servers.set("global", ews_doc(ews))
    ews.fail_next("ErrorSomethingNew", fault=fault)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == expected
    reason = (await mg.resolve("acme")).broken_reason
    assert (reason is not None and "ErrorSomethingNew" in reason) == fault
