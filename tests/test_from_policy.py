"""The sender policy (issue 19): per server `from_policy` fixed | domains | any, fixed by default
on the global server (no tenant sends From ceo@bank.example through the operator's mailbox), any
on a tenant's own. Real aiosmtpd servers; the API in process; the CLI as a process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from conftest import TEST_KEY
from mailgate import Mailgate, Message, MessageError
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.settings.document import parse_server
from mailgate.web.forms import from_document, to_document
from smtp_servers import RecordingServer, ServerConfig, serve, serve_in_thread

FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, tenant_networks="loopback")
SENDER = "no-reply@operator.example"
MAILGATE = str(Path(sys.executable).with_name("mailgate"))


def server_doc(server: RecordingServer, **changes: Any) -> dict[str, Any]:
    return {"from_address": SENDER, "from_name": "Operator",
            "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}, **changes}  # fmt: skip


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=FAST) as opened:
        await opened.tenants.add("acme", may_use_own_server=True)
        yield opened


async def deliver(mg: Mailgate, server: RecordingServer, message: Message) -> tuple[Any, dict[str, Any]]:
    """Submit for acme, run the worker, and return what the server got and the message's record."""
    pk = await mg.submit("acme", message)
    await mg.run_worker(until_idle=True)
    [received] = await asyncio.wait_for(server.wait_for_messages(1), 5)
    return received, (await mg.queue.get(pk)).to_dict()


def ceo(**kw: Any) -> Message:
    return Message(from_="The CEO <ceo@bank.example>", to="alice@example.org", subject="Wire", text="now", **kw)


# ---- the document's rules ----------------------------------------------------------------------


def test_the_scope_chooses_the_default_and_a_set_policy_wins() -> None:
    doc = parse_server({"from_address": SENDER, "smtp": {"host": "smtp.example.com"}})
    assert doc.effective_from_policy(is_global=True) == "fixed"
    assert doc.effective_from_policy(is_global=False) == "any"
    chosen = parse_server({"from_address": SENDER, "smtp": {"host": "smtp.example.com"}, "from_policy": "any"})
    assert chosen.effective_from_policy(is_global=True) == "any"


def test_fixed_rewrites_the_from_and_keeps_the_messages_own_reply_to() -> None:
    doc = parse_server({"from_address": SENDER, "from_name": "Operator", "reply_to": "help@operator.example",
                        "smtp": {"host": "smtp.example.com"}})  # fmt: skip
    rewritten = doc.fill_in(ceo(), policy="fixed")
    assert (rewritten.sender().address, rewritten.sender().name) == (SENDER, "Operator")
    assert [a.address for a in rewritten.reply_to] == ["ceo@bank.example"]  # the original From, not the server's
    own = doc.fill_in(ceo(reply_to="desk@bank.example"), policy="fixed")
    assert own.sender().address == SENDER and [a.address for a in own.reply_to] == ["desk@bank.example"]
    already = doc.fill_in(Message(from_="Alerts <NO-REPLY@operator.example>", to="a@example.org"), policy="fixed")
    assert already.sender().name == "Alerts" and [a.address for a in already.reply_to] == ["help@operator.example"]
    left_out = doc.fill_in(Message(to="a@example.org"), policy="fixed")
    assert left_out.sender().address == SENDER and [a.address for a in left_out.reply_to] == ["help@operator.example"]
    assert doc.fill_in(ceo(), policy="any").sender().address == "ceo@bank.example"
    assert doc.fill_in(ceo()).sender().address == SENDER  # no scope given: the stricter, fixed


def test_domains_allows_its_domains_and_the_servers_own_address_only() -> None:
    doc = parse_server({"from_address": SENDER, "smtp": {"host": "smtp.example.com"}, "from_policy": "domains",
                        "from_domains": ["Bank.Example", "bücher.example"]})  # fmt: skip
    allowed = ["ceo@bank.example", "CEO@BANK.EXAMPLE", "shop@bücher.example", "shop@xn--bcher-kva.example", SENDER]
    for address in allowed:
        assert doc.from_refusal(Message(from_=address, to="a@example.org"), policy="domains") is None, address
    for address in ["ceo@mail.bank.example", "ceo@bank.example.evil.example", "x@other.example"]:
        why = doc.from_refusal(Message(from_=address, to="a@example.org"), policy="domains")
        assert why is not None and "bank.example, bücher.example" in why, address
    outside = Message(from_="x@other.example", to="a@example.org")
    assert doc.fill_in(outside, policy="domains").sender().address == SENDER
    assert doc.fill_in(ceo(), policy="domains").sender().address == "ceo@bank.example"


# ---- through the worker ------------------------------------------------------------------------


async def test_the_global_server_sends_every_message_from_its_own_address(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        received, record = await deliver(mg, server, ceo())
    parsed = received.parsed()
    assert parsed["From"] == f"Operator <{SENDER}>" and parsed["Reply-To"] == "The CEO <ceo@bank.example>"
    assert received.mail_from == SENDER  # the envelope sender is the server's too
    assert record["status"] == "sent"


async def test_under_fixed_the_envelope_sender_is_the_servers_envelope_from(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server, envelope_from="bounces@operator.example"))
        received, _ = await deliver(mg, server, ceo())
    assert received.mail_from == "bounces@operator.example" and received.parsed()["From"].endswith(f"<{SENDER}>")


async def test_a_tenants_own_server_sends_the_messages_own_from_by_default(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as own, serve(ServerConfig()) as global_server:
        await mg.servers.set("global", server_doc(global_server))
        await mg.servers.set("acme", server_doc(own))
        received, _ = await deliver(mg, own, ceo())
    assert received.parsed()["From"] == "The CEO <ceo@bank.example>" and received.mail_from == "ceo@bank.example"
    assert received.parsed()["Reply-To"] is None


async def test_domains_refuses_a_from_outside_them_at_submit(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server, from_policy="domains", from_domains=["acme.example"]))
        with pytest.raises(MessageError) as e:
            await mg.submit("acme", ceo())
        [(field, why)] = e.value.problems
        assert field == "from" and "ceo@bank.example" in why and "acme.example" in why
        received, record = await deliver(mg, server, Message(from_="hr@acme.example", to="a@example.org"))
    assert received.mail_from == "hr@acme.example" and record["status"] == "sent"


async def test_a_from_the_policy_stopped_allowing_after_the_submit_goes_as_under_fixed(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server, from_policy="domains", from_domains=["bank.example"]))
        pk = await mg.submit("acme", ceo())
        await mg.servers.set("global", server_doc(server, from_policy="domains", from_domains=["acme.example"]))
        await mg.run_worker(until_idle=True)
        [received] = await asyncio.wait_for(server.wait_for_messages(1), 5)
    assert received.parsed()["From"] == f"Operator <{SENDER}>" and received.mail_from == SENDER
    assert received.parsed()["Reply-To"] == "The CEO <ceo@bank.example>"
    [attempt] = (await mg.queue.get(pk)).to_dict()["attempt_log"]
    assert f"sent from {SENDER} instead" in attempt["note"] and "ceo@bank.example is not in" in attempt["note"]


# ---- the API, the CLI, the test e-mail and the admin form --------------------------------------


async def test_the_api_refuses_with_422_naming_from_and_the_domains(mg: Mailgate) -> None:
    await mg.servers.set("global", {"from_address": SENDER, "smtp": {"host": "127.0.0.1", "security": "none"},
                                    "from_policy": "domains", "from_domains": ["acme.example"]})  # fmt: skip
    token, _ = await mg.api_tokens.create("sender", "acme")
    transport = httpx2.ASGITransport(app=create_app(mg))
    async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
        reply = await client.post("/v1/messages", headers={"Authorization": f"Bearer {token}"},
                                  json={"from": "ceo@bank.example", "to": ["a@example.org"], "text": "hi"})  # fmt: skip
    assert reply.status_code == 422, reply.text
    [problem] = reply.json()["problems"]
    assert problem["field"] == "from" and "acme.example" in problem["problem"]


def test_the_cli_refuses_a_from_outside_the_domains_with_exit_2(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig()) as server:
        doc = tmp_path / "server.json"
        doc.write_text(json.dumps(server_doc(server, from_policy="domains", from_domains=["acme.example"])))
        out = subprocess.run([MAILGATE, "send", "--server", str(doc), "--from", "ceo@bank.example", "--to",
                              "a@example.org", "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert server.messages == []
    assert out.returncode == 2, out.stderr
    assert "acme.example" in out.stdout and '"from"' in out.stdout


async def test_the_test_email_shows_the_policy(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.servers.set("acme", server_doc(server, from_policy="domains", from_domains=["acme.example"]))
        shown = []
        for scope in ("global", "acme"):
            report = (await mg.test_server(scope, "admin@acme.example", dry_run=True)).to_dict()
            shown.append(report["steps"][0]["details"])
    assert shown[0]["from_policy"] == "fixed (the global server's default)" and "from_domains" not in shown[0]
    assert (shown[1]["from_policy"], shown[1]["from_domains"]) == ("domains", ["acme.example"])


def test_the_admin_form_reads_and_writes_the_policy_and_its_domains() -> None:
    form = {"from_address": SENDER, "kind": "smtp", "smtp.host": "smtp.example.com", "auth.method": "none",
            "from_policy": "domains", "from_domains": "acme.example, Mail.Acme.example\r\nshop.example"}  # fmt: skip
    doc, shown = to_document(form)
    assert not shown.problems
    assert doc["from_policy"] == "domains"
    assert doc["from_domains"] == ["acme.example", "Mail.Acme.example", "shop.example"]
    stored = parse_server(doc).model_dump(mode="json")
    again = from_document(stored)
    assert again.value("from_domains") == "acme.example, mail.acme.example, shop.example"
    default, _ = to_document({**form, "from_policy": ""})
    assert "from_policy" not in default and "from_domains" not in default  # the scope's default; no domains
