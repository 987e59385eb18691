"""Delivery events: written with the outcome they tell of (sent, deferred, failed) and with a mail
server marked broken or mended; read in order by pollers through GET /v1/events?after=, each role
within its tenant; removed after their retention. Real aiosmtpd peers; SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select, update

from conftest import TEST_KEY
from mailgate import Mailgate, Message
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.db.models import EventRow, MessageRow, now
from smtp_servers import ServerConfig, serve

FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, lease=30,
              tenant_networks="loopback")  # fmt: skip


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="tester", config=FAST) as opened:
        await opened.tenants.add("acme", may_use_own_server=True)
        await opened.tenants.add("globex")
        yield opened


def doc(server: Any, **changes: Any) -> dict[str, Any]:
    return {"from_address": "no-reply@example.com", "smtp": {"host": server.host, "port": server.port,
            "security": "none"}, "connection": {"connect_timeout": 5, "protocol_timeout": 2}, **changes}  # fmt: skip


def note(to: str = "alice@example.org") -> Message:
    return Message(to=to, subject="Your invoice", text="Secret body text 1234")


async def poll(mg: Mailgate, tenant: str | None, after: int = 0) -> list[dict[str, Any]]:
    return [e.to_dict() for e in await mg.events.list(tenant, after=after)]


async def test_a_delivered_message_makes_one_message_sent_event(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", doc(server))
        pk = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        await server.wait_for_messages(1)
    events = await poll(mg, "acme")
    assert [e["type"] for e in events] == ["message.sent"]
    event = events[0]
    assert event["tenant"] == "acme" and event["timestamp"].endswith("Z")
    assert event["data"] == {
        "message": {"id": pk}, "status": "sent", "attempt": 1, "outcome": "accepted", "code": 250,
        "enhanced": "2.0.0", "server": "global", "recipients": {"accepted": 1},
    }  # fmt: skip
    # Nothing of the message itself: no recipient, subject or body.
    text = str(event)
    assert "alice" not in text and "invoice" not in text and "Secret body" not in text
    assert await poll(mg, "globex") == []


async def test_a_4xx_makes_deferred_then_sent_and_a_5xx_failed(mg: Mailgate) -> None:
    replies = iter(["451 4.3.0 Try again later"])
    cfg = ServerConfig(
        data_reply=lambda m: next(replies, None),
        rcpt_reply=lambda a, i: "550 5.1.1 User unknown" if a.startswith("nobody") else None,
    )
    async with serve(cfg) as server:
        await mg.servers.set("global", doc(server))
        first = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        async with mg.db.write() as s:  # the retry is due now
            await s.execute(update(MessageRow).where(MessageRow.status == "deferred").values(due_at=now()))
        await mg.run_worker(until_idle=True)
        second = await mg.submit("acme", note("nobody@example.org"))
        await mg.run_worker(until_idle=True)
    events = await poll(mg, "acme")
    assert [(e["type"], e["data"]["message"]["id"]) for e in events] == [
        ("message.deferred", first), ("message.sent", first), ("message.failed", second)]  # fmt: skip
    deferred, _, failed = (e["data"] for e in events)
    assert deferred["code"] == 451 and deferred["enhanced"] == "4.3.0" and deferred["next_attempt_at"].endswith("Z")
    assert deferred["recipients"] == {"pending": 1}
    assert failed["code"] == 550 and failed["recipients"] == {"failed": 1} and failed["status"] == "failed"
    # Ids only grow, so `after` pages without repeating or skipping.
    assert [e["id"] for e in await poll(mg, "acme", after=events[0]["id"])] == [events[1]["id"], events[2]["id"]]


async def test_a_waiting_message_that_was_not_tried_makes_no_event(mg: Mailgate, database_url: str) -> None:
    # Sending disabled with hold_when_disabled: the message is held, not tried — nothing to tell.
    held = dataclasses.replace(FAST, hold_when_disabled=True)
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, config=held) as other:
        await other.submit("acme", note())
        await other.run_worker(until_idle=True)
    assert await poll(mg, "acme") == []


async def test_broken_and_recovered_servers_make_events_for_the_tenants_they_serve(mg: Mailgate) -> None:
    cfg = ServerConfig(auth=frozenset({"PLAIN"}), auth_require_tls=False, password="right-pa55")
    wrong = {"method": "password", "username": "user@example.com", "password": "wrong"}
    async with serve(cfg) as server:
        await mg.servers.set("global", doc(server, auth=wrong))
        await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        assert (await mg.resolve("acme")).broken_reason is not None
        await mg.servers.set("global", doc(server, auth={**wrong, "password": "right-pa55"}))
        await mg.run_worker(until_idle=True)
        await server.wait_for_messages(1)
    acme = await poll(mg, "acme")
    assert [e["type"] for e in acme] == ["server.broken", "message.deferred", "server.recovered", "message.sent"]
    broken = acme[0]["data"]
    # The global server's reason is the operator's (its host, its account): tenants are told it broke.
    assert broken == {"server": "global", "kind": "smtp"}
    assert [e["type"] for e in await poll(mg, "globex")] == ["server.broken", "server.recovered"]


async def test_a_tenants_own_broken_server_tells_only_that_tenant_and_why(mg: Mailgate) -> None:
    cfg = ServerConfig(auth=frozenset({"PLAIN"}), auth_require_tls=False, password="right-pa55")
    wrong = {"method": "password", "username": "user@example.com", "password": "wrong"}
    async with serve(ServerConfig()) as glob, serve(cfg) as own:
        await mg.servers.set("global", doc(glob))
        await mg.servers.set("acme", doc(own, auth=wrong))
        await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        await mg.servers.enable("acme")  # enabling mends it too
    events = await poll(mg, "acme")
    assert [e["type"] for e in events] == ["server.broken", "message.deferred", "server.recovered"]
    assert events[0]["data"]["server"] == "tenant" and "535" in events[0]["data"]["reason"]
    assert "wrong" not in str(events)  # never the password
    assert await poll(mg, "globex") == []


async def test_events_and_outcomes_commit_together(mg: Mailgate) -> None:
    """An outcome the database refuses to write leaves no event behind (same transaction)."""
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", doc(server))
        pk = await mg.submit("acme", note())
        claimed = await mg.queue.claim("w1", 10)
        from mailgate.outbox.store import Outcome

        o = Outcome(pk, now(), 5, "accepted", "250 OK", "sent", None, recipients={0: ("accepted", 250, None, "OK")},
                    attempts_before=claimed[0].attempts)  # fmt: skip
        await mg.queue.record("another-worker", [o])  # not the lease owner: nothing recorded
        async with mg.db.sessions() as s:
            assert await s.scalar(select(func.count()).select_from(EventRow)) == 0
        await mg.queue.record("w1", [o])
    assert [e["type"] for e in await poll(mg, "acme")] == ["message.sent"]


async def test_old_events_are_removed_after_the_retention(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", doc(server))
        await mg.submit("acme", note())
        await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
    async with mg.db.write() as s:
        first = await s.scalar(select(func.min(EventRow.id)))
        await s.execute(update(EventRow).where(EventRow.id == first).values(created_at=now() - timedelta(days=31)))
    assert await mg.events.purge() == 1
    assert len(await poll(mg, "acme")) == 1


async def test_removing_a_tenant_removes_its_events(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", doc(server))
        await mg.submit("globex", note())
        await mg.run_worker(until_idle=True)
    assert len(await poll(mg, "globex")) == 1
    await mg.tenants.remove("globex")
    assert await poll(mg, "globex") == []


# ---- GET /v1/events -----------------------------------------------------------------------------


async def test_pollers_page_through_their_own_tenants_events(mg: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", doc(server))
        for _ in range(3):
            await mg.submit("acme", note())
        await mg.submit("globex", note())
        await mg.run_worker(until_idle=True)
    sender, _ = await mg.api_tokens.create("sender", "acme")
    admin, _ = await mg.api_tokens.create("system-admin")
    transport = httpx2.ASGITransport(app=create_app(mg))
    async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
        auth = {"Authorization": f"Bearer {sender}"}
        page = (await client.get("/v1/events", params={"limit": 2}, headers=auth)).json()
        assert [e["type"] for e in page["events"]] == ["message.sent"] * 2
        assert {e["tenant"] for e in page["events"]} == {"acme"}
        rest = (await client.get("/v1/events", params={"after": page["next"]}, headers=auth)).json()
        assert len(rest["events"]) == 1 and rest["events"][0]["id"] > page["next"]
        empty = (await client.get("/v1/events", params={"after": rest["next"]}, headers=auth)).json()
        assert empty == {"events": [], "next": rest["next"]}
        # Another tenant's events don't exist for acme's token; a system admin reads any tenant.
        assert (await client.get("/v1/events", params={"tenant": "globex"}, headers=auth)).status_code == 404
        theirs = await client.get("/v1/events", params={"tenant": "globex"},
                                  headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
        assert [e["tenant"] for e in theirs.json()["events"]] == ["globex"]
        assert (await client.get("/v1/events")).status_code == 401
        assert (await client.get("/v1/events", params={"limit": 501}, headers=auth)).status_code == 422
        assert (await client.get("/v1/events", params={"after": -1}, headers=auth)).status_code == 422
