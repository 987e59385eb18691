"""The Graph transport end to end through the outbox, against a fake identity provider and a fake
Graph on 127.0.0.1 (real HTTP) that check every request as the real ones do: MIME and JSON
sendMail, large attachments by upload session, send as / on behalf, throttling with Retry-After,
the per-mailbox concurrency limit, and refusals that mark the server broken or fail the message."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import pytest

from conftest import TEST_KEY
from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider
from mailgate import Attachment, Mailgate, Message
from mailgate.config import Config
from mailgate.errors import SettingsError
from mailgate.settings.document import parse_server

TENANT_ID = "7f0c2b9e-0000-4000-8000-00000000c0de"
APP = "22222222-3333-4444-5555-666666666666"
SECRET = "Gr~aph.secret-value_0123456789"
MAILBOX = "notifications@contoso.example"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, lease=30)


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(APP, SECRET, roles=("Mail.Send", "Mail.ReadWrite"))
        yield fake


@pytest.fixture
def graph(idp: FakeIdentityProvider) -> Iterator[FakeGraph]:
    with FakeGraph(idp) as fake:
        fake.add_mailbox(MAILBOX, send_as=("billing@contoso.example",), send_on_behalf=("ceo@contoso.example",))
        yield fake


def graph_doc(idp: FakeIdentityProvider, graph: FakeGraph, **settings: Any) -> dict[str, Any]:
    from_address = settings.pop("from_address", MAILBOX)
    return {"kind": "graph", "from_address": from_address, "from_name": "Contoso",
            "graph": {"authority": idp.url, "endpoint": graph.url, "directory_id": TENANT_ID, "client_id": APP,
                      "client_secret": SECRET, "mailbox": MAILBOX, **settings},
            "connection": {"connect_timeout": 5, "protocol_timeout": 10}}  # fmt: skip


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=FAST) as opened:
        await opened.tenants.add("acme")
        yield opened


async def deliver(mg: Mailgate, *messages: Message) -> list[int]:
    pks = [await mg.submit("acme", m) for m in messages]
    await mg.run_worker(until_idle=True)
    return pks


async def status(mg: Mailgate, pk: int) -> str:
    return (await mg.queue.get(pk)).summary.status


def note(**kw: Any) -> Message:
    kw.setdefault("to", "alice@example.org")
    return Message(subject=kw.pop("subject", "Zugriffsprüfung fällig"), text=kw.pop("text", "Bitte prüfen."), **kw)


async def test_a_small_message_goes_as_mime_with_headers_and_attachments_intact(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    message = note(cc="bob@example.org", html="<p>Bitte <b>prüfen</b></p>",
                   headers=[("List-Unsubscribe", "<mailto:unsub@contoso.example>")],
                   attachments=[Attachment("bericht.csv", "text/csv", b"a;b\n1;2\n")])  # fmt: skip
    [pk] = await deliver(mg, message)
    assert await status(mg, pk) == "sent"
    [sent] = graph.sent
    assert sent.via == "mime" and sent.mailbox.lower() == MAILBOX
    assert (sent.to, sent.cc, sent.from_) == (["alice@example.org"], ["bob@example.org"], MAILBOX)
    assert sent.mime is not None
    parsed = email.message_from_bytes(sent.mime, policy=email.policy.default)
    assert parsed["Subject"] == "Zugriffsprüfung fällig"
    assert parsed["List-Unsubscribe"] == "<mailto:unsub@contoso.example>"
    assert parsed["Message-ID"].endswith("@contoso.example>")  # given by the outbox, in the sender's domain
    assert [(a.name, a.data) for a in sent.attachments] == [("bericht.csv", b"a;b\n1;2\n")]
    [post] = [r for r in graph.requests if r.path.endswith("/sendMail")]
    assert post.headers["content-type"] == "text/plain"
    assert base64.b64decode(post.body) == sent.mime
    info = idp.check(post.headers["authorization"].removeprefix("Bearer "))
    assert info is not None and info.audience == "https://graph.microsoft.com"
    [token_request] = idp.token_requests
    assert token_request.form is not None and token_request.form["scope"] == "https://graph.microsoft.com/.default"
    attempt = (await mg.queue.get(pk)).attempts[-1]
    assert attempt["server"]["address"] == f"graph:{MAILBOX}"


async def test_bcc_and_no_sent_items_copy_go_as_json(idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate) -> None:
    await mg.servers.set("global", graph_doc(idp, graph, save_to_sent_items=False))
    message = note(bcc="auditor@example.org", headers=[("X-Review-Id", "42"), ("List-Id", "<reviews>")])
    [pk] = await deliver(mg, message)
    assert await status(mg, pk) == "sent"
    [sent] = graph.sent
    assert sent.via == "json" and sent.save_to_sent_items is False
    assert (sent.to, sent.bcc) == (["alice@example.org"], ["auditor@example.org"])
    assert sent.internet_message_headers == [("X-Review-Id", "42")]
    text = (await mg.queue.get(pk)).attempts[-1]["text"]
    assert "left out List-Id" in text


async def test_a_ten_megabyte_attachment_goes_by_upload_session(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", graph_doc(idp, graph, large_attachments=True))
    big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    small = b"%PDF-1.7 small"
    message = note(attachments=[Attachment("export.bin", "application/octet-stream", big),
                                Attachment("cover.pdf", "application/pdf", small)])  # fmt: skip
    [pk] = await deliver(mg, message)
    assert await status(mg, pk) == "sent", (await mg.queue.get(pk)).summary.last_error
    [sent] = graph.sent
    assert sent.via == "draft"
    assert {a.name: a.data for a in sent.attachments} == {"export.bin": big, "cover.pdf": small}
    puts = graph.uploads
    assert [(p.start, p.end) for p in puts] == [
        (s, min(s + 3_276_800, len(big)) - 1) for s in range(0, len(big), 3_276_800)
    ]
    assert not any(p.had_authorization for p in puts) and not graph.upload_violations
    assert all(p.total == len(big) for p in puts)


async def test_a_large_message_without_the_setting_fails_naming_it(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    [pk] = await deliver(mg, note(attachments=[Attachment("big.bin", "application/octet-stream", b"x" * 4_000_000)]))
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "failed"
    assert "graph.large_attachments" in (detail.summary.last_error or "")
    assert "Mail.ReadWrite" in (detail.summary.last_error or "")
    assert not graph.sent and (await mg.resolve("acme")).broken_reason is None


async def test_send_as_sets_from(idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate) -> None:
    await mg.servers.set("global", {**graph_doc(idp, graph, allow_delegate=True), "from_policy": "any"})
    [pk] = await deliver(mg, note(from_="billing@contoso.example"))
    assert await status(mg, pk) == "sent"
    [sent] = graph.sent
    assert sent.from_ == "billing@contoso.example" and sent.sender in (None, "billing@contoso.example")


async def test_send_on_behalf_sets_from_and_sender(idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate) -> None:
    await mg.servers.set("global", {**graph_doc(idp, graph, allow_delegate=True, delegate_as="on_behalf"),
                                    "from_policy": "any"})  # fmt: skip
    pks = await deliver(mg, note(from_="ceo@contoso.example"), note(from_="ceo@contoso.example", bcc="x@example.org"))
    assert [await status(mg, pk) for pk in pks] == ["sent", "sent"], (await mg.queue.get(pks[0])).summary.last_error
    assert sorted((s.via, s.from_, s.sender) for s in graph.sent) == [
        ("json", "ceo@contoso.example", MAILBOX), ("mime", "ceo@contoso.example", MAILBOX)]  # fmt: skip


async def test_another_sender_without_allow_delegate_is_refused(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", {**graph_doc(idp, graph), "from_policy": "any"})
    [pk] = await deliver(mg, note(from_="ceo@contoso.example"))
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "failed" and "graph.allow_delegate" in (detail.summary.last_error or "")
    assert not graph.requests


def test_a_from_address_other_than_the_mailbox_needs_allow_delegate(
    idp: FakeIdentityProvider, graph: FakeGraph
) -> None:
    with pytest.raises(SettingsError, match="allow_delegate"):
        parse_server(graph_doc(idp, graph, from_address="billing@contoso.example"))


async def test_send_as_denied_fails_the_message_with_the_fix(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", {**graph_doc(idp, graph, allow_delegate=True), "from_policy": "any"})
    [pk] = await deliver(mg, note(from_="someone.else@contoso.example"))
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "failed"
    assert "ErrorSendAsDenied" in (detail.summary.last_error or "")
    assert "Send As" in (detail.summary.last_error or "")
    assert (await mg.resolve("acme")).broken_reason is None  # the message, not the server


async def test_throttling_honours_retry_after_then_succeeds(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    graph.throttle_next(1, status=429, retry_after=2)
    [pk] = await deliver(mg, note())
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred" and detail.attempts[-1]["code"] == 429
    due = detail.summary.due_at
    started = datetime.fromisoformat(detail.attempts[-1]["started_at"])
    assert due is not None and (due - started).total_seconds() >= 2
    await asyncio.sleep(2.1)
    await mg.run_worker(until_idle=True)
    assert await status(mg, pk) == "sent" and len(graph.sent) == 1


async def test_service_unavailable_is_transient(idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    graph.throttle_next(1, status=503, retry_after=None)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    assert (await mg.resolve("acme")).broken_reason is None


async def test_at_most_four_requests_per_mailbox(idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    graph.delay = 0.1
    pks = await deliver(mg, *(note(to=f"u{i}@example.org") for i in range(20)))
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 20
    assert graph.max_in_flight[MAILBOX] == 4 and graph.concurrency_violations == 0
    assert len(idp.token_requests) == 1


async def test_a_revoked_secret_marks_the_server_broken(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    await mg.servers.set("global", graph_doc(idp, graph))
    idp.revoke_secret(APP)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and "AADSTS7000215" in reason and SECRET not in reason
    assert not graph.requests


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param("no-mail-send", "ErrorAccessDenied", id="access-denied"),
        pytest.param("on-premises", "MailboxNotEnabledForRESTAPI", id="not-rest-enabled"),
    ],
)
async def test_permission_and_mailbox_refusals_mark_the_server_broken(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate, setup: str, expected: str
) -> None:
    doc = graph_doc(idp, graph)
    if setup == "no-mail-send":
        idp.add_app("readonly-app", "ro-secret", roles=("User.Read.All",))
        doc["graph"] |= {"client_id": "readonly-app", "client_secret": "ro-secret"}
    else:
        graph.add_mailbox("onprem@contoso.example", rest_enabled=False)
        doc["graph"]["mailbox"] = doc["from_address"] = "onprem@contoso.example"
    await mg.servers.set("global", doc)
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "deferred"
    reason = (await mg.resolve("acme")).broken_reason
    assert reason is not None and expected in reason and "Fix:" in reason


async def send_raw(idp: FakeIdentityProvider, graph: FakeGraph, raw: bytes) -> Any:
    """The one recipient's result of sending pre-built MIME to a@example.org straight through a
    GraphTransport of graph_doc."""
    from mailgate.message import Envelope
    from mailgate.oauth import TokenCache, graph_token_source
    from mailgate.transports.graph import GraphTransport

    server = parse_server(graph_doc(idp, graph))
    cache = TokenCache()
    try:
        transport = GraphTransport(server, cache.handle(graph_token_source(server)), cache.http)
        delivery = await transport.send(Envelope(MAILBOX, ("a@example.org",)), raw)
    finally:
        await cache.aclose()
    [result] = delivery.results
    return result


async def test_invalid_recipients_fail_the_message_not_the_server(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    # A pre-built message whose headers name no recipient: Graph has nobody to send to.
    raw = b"From: notifications@contoso.example\r\nSubject: x\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"
    result = await send_raw(idp, graph, raw)
    assert result.outcome == "permanent" and result.code == 400 and "ErrorInvalidRecipients" in result.text


async def test_an_access_token_graph_echoes_is_not_repeated(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    graph.refuse_next(400, "ErrorInvalidRecipients", "Request with Bearer {token} has no valid recipient.")
    raw = b"From: notifications@contoso.example\r\nTo: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    result = await send_raw(idp, graph, raw)
    assert idp.issued and result.outcome == "permanent" and "has no valid recipient" in result.text
    assert not [token for token in idp.issued if token[:40] in result.text], result.text  # not even cut short
    assert "[redacted]" in result.text


async def test_a_token_graph_refuses_is_renewed_once_then_the_server_is_broken(
    idp: FakeIdentityProvider, graph: FakeGraph, mg: Mailgate
) -> None:
    from mailgate.message import Envelope
    from mailgate.oauth import AccessToken, TokenCache, graph_token_source
    from mailgate.transports.graph import GraphError, GraphTransport

    server = parse_server(graph_doc(idp, graph))
    cache = TokenCache()
    handle = cache.handle(graph_token_source(server))
    refused: list[AccessToken | None] = []

    class Forged:  # the first token is one Graph never saw; the renewed one is real
        async def __call__(self) -> AccessToken:
            return AccessToken("forged.jwt.token", 9e9, 9e9) if not refused else await handle()

        def invalidate(self, token: AccessToken | None = None) -> None:
            refused.append(token)

    try:
        transport = GraphTransport(server, Forged(), cache.http)
        delivery = await transport.send(Envelope(MAILBOX, ("alice@example.org",)), server.fill_in(note()))
        assert delivery.all_accepted and len(refused) == 1 and len(graph.sent) == 1

        class AlwaysForged(Forged):
            async def __call__(self) -> AccessToken:
                return AccessToken("forged.jwt.token", 9e9, 9e9)

        with pytest.raises(GraphError) as e:
            await GraphTransport(server, AlwaysForged(), cache.http).send(
                Envelope(MAILBOX, ("alice@example.org",)), server.fill_in(note())
            )
        assert e.value.code == 401 and not e.value.transient and "InvalidAuthenticationToken" in e.value.message
    finally:
        await cache.aclose()
