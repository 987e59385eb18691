"""Four small fixes from a review: a batch item that is not a JSON object is answered alone; a
Message-ID mailgate made follows the From into the server's domain when the server sends as its
own address; an attachment keeps its charset (API, Django, `mailgate send --attach`, the SMTP
ingress); `mailgate serve --demo` says how to send through its SMTP ingress. Real peers only."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_KEY
from mailgate import Mailgate, Message
from mailgate.config import Config
from mailgate.settings.document import parse_server
from smtp_servers import RecordingServer, ServerConfig, serve
from test_batch import URL, api, count, message

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
SENDER = "no-reply@operator.example"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05)


# ---- 1. a batch item that is not a JSON object -------------------------------------------------------


async def test_a_batch_item_that_is_not_an_object_is_answered_alone_and_the_others_are_stored(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        body = {"messages": [message(0), 42, "a message", None, [message(4)], True, message(6)]}
        reply = await http.post(URL, json=body, headers=sender)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r.get("status") for r in results] == ["queued", None, None, None, None, None, "queued"]
        for i, kind in [(1, "a number"), (2, "a string"), (3, "null"), (4, "an array"), (5, "a boolean")]:
            assert results[i] == {"error": {
                "status": 422, "code": "invalid_input", "message": "the message is not valid",
                "problems": [{"field": f"messages[{i}]", "problem": f"is {kind}, not a JSON object (a message)"}],
            }}, results[i]  # fmt: skip
        # Shaped as the error of an object that is not a valid message.
        bad = (await http.post(URL, json={"messages": [message(9, colour="red")]}, headers=sender)).json()["results"][0]
        assert bad["error"].keys() == results[1]["error"].keys()
        assert bad["error"]["message"] == results[1]["error"]["message"]
        assert await count(mg) == 2


# ---- 2. mailgate's Message-ID follows a rewritten From ---------------------------------------------


def _split(message_id: str) -> tuple[str, str]:
    unique, _, domain = message_id.strip("<>").rpartition("@")
    return unique, domain


def ceo(**kw: Any) -> Message:
    return Message(from_="The CEO <ceo@bank.example>", to="alice@example.org", subject="Wire", text="now", **kw)


def server_doc(server: RecordingServer, **changes: Any) -> dict[str, Any]:
    return {"from_address": SENDER, "from_name": "Operator",
            "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}, **changes}  # fmt: skip


@pytest.fixture
async def fast(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=FAST) as opened:
        await opened.tenants.add("acme")
        yield opened


async def drain(mg: Mailgate) -> None:
    for _ in range(40):
        await mg.run_worker(until_idle=True)
        by = (await mg.queue.stats())["by_status"]
        if not by["queued"] + by["deferred"] + by["sending"]:
            return
        await asyncio.sleep(0.06)


def test_fill_in_moves_the_made_message_id_to_the_servers_domain_and_keeps_a_given_one() -> None:
    doc = parse_server({"from_address": SENDER, "smtp": {"host": "smtp.example.com"}})
    made = ceo()
    assert made.message_id is not None and _split(made.message_id)[1] == "bank.example"
    sent = doc.fill_in(made, policy="fixed")
    assert sent.message_id == doc.fill_in(made, policy="fixed").message_id  # the same at every attempt
    assert _split(sent.message_id or "") == (_split(made.message_id)[0], "operator.example")
    assert doc.fill_in(made, policy="any").message_id == made.message_id  # its own From: its own domain
    given = ceo(message_id="<wire.7@bank.example>")
    assert doc.fill_in(given, policy="fixed").message_id == "<wire.7@bank.example>"
    stored = Message.from_dict(json.loads(json.dumps(made.to_dict())))  # as the outbox keeps it
    assert doc.fill_in(stored, policy="fixed").message_id == sent.message_id


async def test_the_global_server_sends_mailgates_message_id_in_its_own_domain_on_every_attempt(
    fast: Mailgate,
) -> None:
    replies = iter(["451 4.3.0 Try again later"])
    async with serve(ServerConfig(data_reply=lambda m: next(replies, None))) as server:
        await fast.servers.set("global", server_doc(server))  # the global server: fixed by default
        made = ceo()
        pk = await fast.submit("acme", made)
        await drain(fast)
        first, second = await asyncio.wait_for(server.wait_for_messages(2), 5)
    record = (await fast.queue.get(pk)).to_dict()
    assert record["status"] == "sent" and record["attempts"] == 2
    ids = [m.parsed()["Message-ID"] for m in (first, second)]
    assert ids[0] == ids[1] == record["message_id"], (ids, record["message_id"])
    assert _split(ids[0]) == (_split(made.message_id or "")[0], "operator.example")
    assert first.parsed()["From"] == f"Operator <{SENDER}>"


async def test_a_from_the_domains_stopped_allowing_takes_the_message_id_along(fast: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await fast.servers.set("global", server_doc(server, from_policy="domains", from_domains=["bank.example"]))
        pk = await fast.submit("acme", ceo())
        await fast.submit("acme", ceo(message_id="<wire.7@bank.example>"))
        stored = (await fast.queue.get(pk)).to_dict()["message_id"]
        assert _split(stored)[1] == "bank.example"  # its own From is allowed at the submit
        await fast.servers.set("global", server_doc(server, from_policy="domains", from_domains=["acme.example"]))
        await drain(fast)
        received = await asyncio.wait_for(server.wait_for_messages(2), 5)
    assert {m.parsed()["From"] for m in received} == {f"Operator <{SENDER}>"}
    # mailgate's own follows the From; the sender's own is sent as given.
    unique = _split(stored)[0]
    assert {m.parsed()["Message-ID"] for m in received} == {f"<{unique}@operator.example>", "<wire.7@bank.example>"}
