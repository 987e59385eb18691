"""The outbox and the worker: submit, idempotency, held messages, claims and leases, retries that
follow the rules, broken servers, graceful stop, the operator's queue. Real aiosmtpd servers;
every test runs on SQLite and on PostgreSQL (see conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from conftest import TEST_KEY
from mailgate import Attachment, Mailgate, Message, MessageError, NotFound, SendingDisabled
from mailgate.config import Config
from mailgate.db.models import MessageRow, now
from mailgate.errors import Conflict
from mailgate.outbox.retry import retry_delay
from mailgate.outbox.worker import PIPELINE
from smtp_servers import ReceivedMessage, RecordingServer, ServerConfig, scripted, serve

# Tenants' own servers listen on 127.0.0.1 here too: loopback is allowed them (conftest.py).
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, lease=30,
              tenant_networks="loopback")  # fmt: skip
PASSWORD = "worker-pa55word"

Opener = Callable[..., Any]


@pytest.fixture
async def open_mg(database_url: str) -> AsyncIterator[Opener]:
    opened: list[Mailgate] = []

    async def opener(config: Config = FAST) -> Mailgate:
        mg = await Mailgate.open(database_url, secret_keys=TEST_KEY, actor="tester", config=config)
        opened.append(mg)
        return mg

    yield opener
    for mg in opened:
        await mg.aclose()


def server_doc(server: RecordingServer | Any, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "from_address": "no-reply@example.com",
        "from_name": "Example",
        "smtp": {"host": server.host, "port": server.port, "security": "none"},
        "connection": {"connect_timeout": 5, "protocol_timeout": 2, "pool_size": 3},
    }
    doc.update(changes)
    return doc


async def setup(mg: Mailgate, server: RecordingServer | Any, **changes: Any) -> None:
    await mg.tenants.add("acme")
    await mg.servers.set("global", server_doc(server, **changes))


def note(text: str = "hello", to: Any = "alice@example.org", **kw: Any) -> Message:
    return Message(to=to, subject=kw.pop("subject", "Access review"), text=text, **kw)


async def drain(mg: Mailgate, rounds: int = 20) -> None:
    """Run the worker until nothing is due, several times, for retries due shortly."""
    for _ in range(rounds):
        await mg.run_worker(until_idle=True)
        stats = await mg.queue.stats()
        waiting = stats["by_status"]["queued"] + stats["by_status"]["deferred"] + stats["by_status"]["sending"]
        if not waiting:
            return
        await asyncio.sleep(0.06)


async def status(mg: Mailgate, pk: int) -> str:
    return (await mg.queue.get(pk)).summary.status


# ---- submit ------------------------------------------------------------------------------------


async def test_submit_stores_the_message_and_returns_its_id(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note(to=["a@example.org", "b@example.org"], bcc="c@example.org"))
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "queued" and detail["attempts"] == 0
    assert [r["recipient"] for r in detail["recipient_outcomes"]] == ["a@example.org", "b@example.org", "c@example.org"]
    assert {r["status"] for r in detail["recipient_outcomes"]} == {"pending"}
    assert detail["message_id"].endswith("@example.com>")  # the resolved server's domain


async def test_the_same_idempotency_key_returns_the_first_message(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        await mg.tenants.add("beta")
        first = await mg.submit("acme", note("one"), idempotency_key="invite-42")
        again = await mg.submit("acme", note("two"), idempotency_key="invite-42")
        other_tenant = await mg.submit("beta", note("three"), idempotency_key="invite-42")
        concurrent = await asyncio.gather(*(mg.submit("acme", note(), idempotency_key="race") for _ in range(5)))
    assert again == first
    assert other_tenant != first
    assert len(set(concurrent)) == 1
    assert len(await mg.queue.list_messages()) == 3


async def test_submit_is_refused_when_sending_is_disabled(open_mg: Opener) -> None:
    mg = await open_mg()
    await mg.tenants.add("acme")
    with pytest.raises(SendingDisabled, match="global mail server is not set"):
        await mg.submit("acme", note())
    with pytest.raises(NotFound, match="no tenant 'nobody'"):
        await mg.submit("nobody", note())
    assert await mg.queue.list_messages() == []


async def test_held_messages_are_delivered_once_sending_is_enabled(open_mg: Opener) -> None:
    mg = await open_mg(Config(hold_when_disabled=True, poll_interval=0.05))
    async with serve(ServerConfig()) as server:
        await mg.tenants.add("acme")
        pk = await mg.submit("acme", note())
        assert await status(mg, pk) == "held"
        await mg.run_worker(until_idle=True)
        assert server.messages == [] and await status(mg, pk) == "held"
        await mg.servers.set("global", server_doc(server))
        await drain(mg)
        (received,) = await server.wait_for_messages(1)
    assert await status(mg, pk) == "sent"
    assert received.rcpt_tos == ["alice@example.org"]


async def test_submit_many_in_one_go(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig(pipelining=True)) as server:
        await setup(mg, server)
        ids = await mg.submit_many("acme", [note(f"n{i}", to=f"r{i}@example.org") for i in range(30)])
        await drain(mg)
        received = await server.wait_for_messages(30)
    assert len(set(ids)) == 30
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(f"r{i}@example.org" for i in range(30))


async def test_the_sender_comes_from_the_server_used_at_delivery(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server, reply_to="replies@example.com")
        await mg.submit("acme", note())
        await mg.servers.set("global", server_doc(server, from_address="changed@example.com", from_name="Changed"))
        await drain(mg)
        (received,) = await server.wait_for_messages(1)
    parsed = received.parsed()
    assert received.mail_from == "changed@example.com"
    assert str(parsed["From"]) == "Changed <changed@example.com>"
    assert parsed["Reply-To"] is None  # the server that delivered has no reply_to


async def test_a_message_with_attachments_survives_the_outbox(open_mg: Opener) -> None:
    data = bytes(range(256)) * 100
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        attachment = Attachment("r.bin", "application/octet-stream", data)
        await mg.submit("acme", note(html="<p>hi</p>", attachments=[attachment]))
        await drain(mg)
        (received,) = await server.wait_for_messages(1)
    (attachment,) = received.parsed().iter_attachments()
    assert attachment.get_payload(decode=True) == data


# ---- the worker --------------------------------------------------------------------------------


async def test_delivery_records_the_attempt(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        await drain(mg)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "sent" and detail["attempts"] == 1
    (attempt,) = detail["attempt_log"]
    assert attempt["outcome"] == "accepted" and attempt["code"] == 250
    assert attempt["server"]["scope"] == "global" and attempt["server"]["version"] == 1
    assert attempt["server"]["address"] == f"127.0.0.1:{server.port}"
    assert attempt["duration_ms"] >= 0
    assert detail["recipient_outcomes"][0]["text"].startswith("Ok: queued as")


async def test_a_4xx_is_retried_until_it_succeeds(open_mg: Opener) -> None:
    replies = iter(["451 4.3.0 Try again later", "451 4.3.0 Try again later"])
    mg = await open_mg()
    async with serve(ServerConfig(data_reply=lambda m: next(replies, None))) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        first = (await mg.queue.get(pk)).to_dict()
        await drain(mg)
    assert first["status"] == "deferred" and first["next_attempt_at"] is not None
    assert first["last_error"] == "451 4.3.0 Try again later"
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "sent" and detail["attempts"] == 3
    assert [a["outcome"] for a in detail["attempt_log"]] == ["transient", "transient", "accepted"]


async def test_a_5xx_fails_the_recipient_at_once(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig(rcpt_reply=lambda a, i: "550 5.1.1 User unknown")) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        await drain(mg)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "failed" and detail["attempts"] == 1
    assert detail["recipient_outcomes"][0] == {
        "recipient": "alice@example.org", "status": "failed", "code": 550, "enhanced": "5.1.1", "text": "User unknown",
    }  # fmt: skip


async def test_mixed_recipients_and_accepted_ones_are_never_sent_again(open_mg: Opener) -> None:
    seen: dict[str, int] = {}

    def rcpt(address: str, index: int) -> str | None:
        seen[address] = seen.get(address, 0) + 1
        if address.startswith("gone"):
            return "550 5.1.1 User unknown"
        if address.startswith("busy") and seen[address] == 1:
            return "450 4.2.1 Mailbox busy"
        return None

    mg = await open_mg()
    async with serve(ServerConfig(rcpt_reply=rcpt)) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note(to=["ok@example.org", "gone@example.org", "busy@example.org"]))
        await mg.run_worker(until_idle=True)
        # Deferred for busy@ — on a loaded machine the (fast) retry may already have run as well.
        first = (await mg.queue.get(pk)).to_dict()["attempt_log"][0]
        assert first["outcome"] == "mixed", first
        await drain(mg)
        received = await server.wait_for_messages(2)
    assert [r.rcpt_tos for r in received] == [["ok@example.org"], ["busy@example.org"]]
    assert seen == {"ok@example.org": 1, "gone@example.org": 1, "busy@example.org": 2}
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "sent"
    assert [r["status"] for r in detail["recipient_outcomes"]] == ["accepted", "failed", "accepted"]
    assert detail["recipients"] == {"pending": 0, "accepted": 2, "failed": 1}


async def test_a_connection_dropped_after_data_is_retried_and_noted(open_mg: Opener) -> None:
    mg = await open_mg()
    async with scripted("drop-after-data") as dropping:
        await setup(mg, dropping)
        pk = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "deferred"
    (attempt,) = detail["attempt_log"]
    assert attempt["outcome"] == "transient"
    assert "may have accepted" in attempt["note"]
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))  # saving wakes the waiting message
        await drain(mg)
        await server.wait_for_messages(1)
    assert await status(mg, pk) == "sent"


async def test_a_server_that_goes_silent_times_out_and_is_retried(open_mg: Opener) -> None:
    mg = await open_mg()
    async with scripted("silent-after-ehlo") as silent:
        await setup(mg, silent)
        pk = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "deferred"
    assert "did not answer within 2 s" in detail["last_error"]


async def test_broken_credentials_wait_then_fixed_settings_deliver(open_mg: Opener) -> None:
    cfg = ServerConfig(security="none", auth=frozenset({"PLAIN"}), auth_require_tls=False, password=PASSWORD)
    mg = await open_mg()
    async with serve(cfg) as server:
        wrong = {"method": "password", "username": "user@example.com", "password": "wrong"}
        await setup(mg, server, smtp={"host": server.host, "port": server.port, "security": "none"}, auth=wrong)
        pks = [await mg.submit("acme", note(to=f"r{i}@example.org")) for i in range(3)]
        await mg.run_worker(until_idle=True)
        shown = await mg.servers.get("global")
        resolution = await mg.resolve("acme")
        assert resolution.broken_reason is not None and "535" in resolution.broken_reason
        # The catalogue's words, the same the test e-mail uses: the cause and the fix.
        assert "refused the user name and password" in resolution.broken_reason
        assert "Fix: Check the user name and password" in resolution.broken_reason
        logins = len(server.auth_attempts)
        for pk in pks:
            detail = (await mg.queue.get(pk)).to_dict()
            assert detail["status"] == "deferred" and "refused us for good" in detail["last_error"]
        # Waiting, not hammering: the next round makes no new login attempt.
        async with mg.db.write() as s:
            await s.execute(update(MessageRow).values(due_at=now()))
        await mg.run_worker(until_idle=True)
        assert len(server.auth_attempts) == logins
        # Saving new settings clears the mark and the messages go at once.
        await mg.servers.set("global", server_doc(server, auth={**wrong, "password": PASSWORD}))
        assert (await mg.resolve("acme")).broken_reason is None
        await drain(mg)
        await server.wait_for_messages(3)
    assert shown is not None
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 3
    assert "server.broken" in [e.action for e in await mg.audit_log()]


async def test_a_tenants_server_the_destination_policy_refuses_is_never_connected(open_mg: Opener) -> None:
    # Saved while the operator let tenants reach loopback (as if a name resolved elsewhere then),
    # sent under the default policy: a tenant's own server may not point at loopback; the global
    # server may. The worker checks again when it connects.
    setup_mg = await open_mg(FAST)
    mg = await open_mg(dataclasses.replace(FAST, tenant_networks=""))
    async with serve(ServerConfig()) as server:
        await setup_mg.servers.set("global", server_doc(server))
        await setup_mg.tenants.add("own", may_use_own_server=True)
        await setup_mg.tenants.add("shared")
        await setup_mg.servers.set("own", server_doc(server))
        refused = await mg.submit("own", note(subject="own"))
        sent = await mg.submit("shared", note(subject="shared"))
        await mg.run_worker(until_idle=True)
    assert [str(m.parsed()["Subject"]) for m in server.messages] == ["shared"]
    assert server.connection_count == 1  # the global server's connection only
    assert await status(mg, sent) == "sent" and await status(mg, refused) == "deferred"
    reason = (await mg.servers.health("own")).broken_reason
    assert reason is not None and "127.0.0.1 is a loopback address" in reason


async def test_transient_failures_stop_at_the_maximum_age(open_mg: Opener) -> None:
    # max_age leaves room for a retry even when a loaded machine takes a while over the first try.
    mg = await open_mg(Config(retry_base=0.05, retry_max_delay=0.1, max_age=3.0, poll_interval=0.05))
    async with serve(ServerConfig(data_reply=lambda m: "451 4.3.0 Try again later")) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        await drain(mg, rounds=200)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "failed"
    assert detail["recipient_outcomes"][0]["status"] == "failed"
    assert "gave up: still failing after" in detail["recipient_outcomes"][0]["text"]
    assert detail["attempts"] >= 2


async def test_a_removed_tenants_messages_fail_with_the_reason(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        await mg.tenants.remove("acme")
        await drain(mg)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "failed" and detail["recipient_outcomes"][0]["text"] == "the tenant was removed"
    # A new tenant with the same id would see those messages as its own: refused while they remain.
    with pytest.raises(Conflict, match="earlier tenant 'acme'"):
        await mg.tenants.add("acme")


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    config = Config(retry_base=10, retry_factor=2, retry_max_delay=100)
    rng = random.Random(1)
    for failures, ceiling in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (50, 100), (5000, 100)]:
        delays = [retry_delay(failures, config, rng=rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not all the same
    assert retry_delay(1, config, retry_after=500, rng=rng) == 500  # a floor, even above max_delay
    assert retry_delay(4, config, retry_after=1, rng=rng) >= 40


# ---- claims, leases, stopping ------------------------------------------------------------------


async def test_two_workers_never_claim_the_same_message(open_mg: Opener) -> None:
    mg = await open_mg(Config(batch_size=10))
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        await mg.submit_many("acme", [note(to=f"r{i}@example.org") for i in range(100)])
    claims = await asyncio.gather(*(mg.queue.claim(f"worker-{i}", 10) for i in range(12)))
    taken = [c.pk for batch in claims for c in batch]
    assert len(taken) == 100 and len(set(taken)) == 100


async def test_an_expired_lease_is_taken_over_and_the_log_says_so(open_mg: Opener) -> None:
    mg = await open_mg(Config(lease=0.2, poll_interval=0.05))
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note())
        (held,) = await mg.queue.claim("dead-worker", 10)  # it claims, then dies without a word
        assert held.pk == pk
        assert await mg.queue.claim("other", 10) == []  # the lease holds...
        await asyncio.sleep(0.3)  # ...until it runs out
        await drain(mg)
        await server.wait_for_messages(1)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "sent"
    assert "took over from worker dead-worker, whose lease ran out" in detail["attempt_log"][0]["note"]


async def test_a_stopped_worker_finishes_what_it_sends_and_gives_back_the_rest(open_mg: Opener) -> None:
    stop = asyncio.Event()

    def stop_after_first(message: ReceivedMessage) -> str | None:
        stop.set()  # SIGTERM arrives while the first message is being sent
        return None

    mg = await open_mg(Config(concurrency=1, batch_size=10, poll_interval=0.05))
    async with serve(ServerConfig(data_reply=stop_after_first)) as server:
        await setup(mg, server)
        pks = await mg.submit_many("acme", [note(to=f"r{i}@example.org") for i in range(10)])
        stats = await mg.run_worker(stop)
        # The sender had taken the first PIPELINE messages onto its connection: it finishes
        # those; the rest are given back untried.
        assert (stats.sent, stats.released) == (PIPELINE, 10 - PIPELINE)
        statuses = [await status(mg, pk) for pk in pks]
        assert statuses.count("sent") == PIPELINE and statuses.count("queued") == 10 - PIPELINE
        async with mg.db.sessions() as s:
            leases = select(MessageRow.lease_owner).where(MessageRow.lease_owner.is_not(None))
            assert (await s.scalars(leases)).all() == []
        await drain(mg)
        await server.wait_for_messages(10)
    assert [await status(mg, pk) for pk in pks] == ["sent"] * 10


async def test_a_worker_keeps_waiting_until_stopped(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        stop = asyncio.Event()
        task = asyncio.create_task(mg.run_worker(stop))
        await asyncio.sleep(0.1)
        pk = await mg.submit("acme", note())  # arrives while the worker polls
        await server.wait_for_messages(1)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await status(mg, pk) == "sent"


# ---- the operator's queue ----------------------------------------------------------------------


async def test_list_show_cancel_retry_and_stats(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig(rcpt_reply=lambda a, i: "550 5.1.1 User unknown" if "bad" in a else None)) as server:
        await setup(mg, server)
        await mg.tenants.add("beta")
        good = await mg.submit("acme", note(to="good@example.org"))
        bad = await mg.submit("acme", note(to="bad@example.org"))
        other = await mg.submit("beta", note(to="good@example.org"))
        waiting = await mg.submit("acme", note(to="good@example.org"))
        cancelled = await mg.queue.cancel(waiting)
        assert cancelled.status == "cancelled"
        await drain(mg)
        assert [m.id for m in await mg.queue.list_messages(tenant_id="acme")] == [waiting, bad, good]
        assert [m.id for m in await mg.queue.list_messages(status="failed")] == [bad]
        assert [m.id for m in await mg.queue.list_messages(tenant_id="beta")] == [other]
        stats = await mg.queue.stats()
        assert stats["by_status"]["sent"] == 2 and stats["by_status"]["failed"] == 1
        assert stats["by_status"]["cancelled"] == 1 and stats["due_now"] == 0
        with pytest.raises(Conflict, match="only waiting messages"):
            await mg.queue.cancel(good)
        with pytest.raises(Conflict, match="every recipient"):
            await mg.queue.retry(good)
        with pytest.raises(NotFound):
            await mg.queue.get(999_999)
        with pytest.raises(NotFound):
            await mg.queue.get(good, tenant_id="beta")  # another tenant's message does not exist
        retried = await mg.queue.retry(bad)
        assert retried.status == "queued" and retried.recipients["pending"] == 1
        assert await mg.queue.retry_failed() == []  # nothing failed any more
        await mg.queue.retry(waiting)  # a cancelled message can be sent after all
        await drain(mg)
    assert await status(mg, waiting) == "sent"
    assert await status(mg, bad) == "failed"


async def test_old_bodies_then_old_log_lines_are_purged(open_mg: Opener) -> None:
    mg = await open_mg(Config(retention_body=3600, retention_log=7200))
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        data = b"x" * 1000
        pk = await mg.submit("acme", note(attachments=[Attachment("a.txt", "text/plain", data)]))
        fresh = await mg.submit("acme", note())
        await drain(mg)
    assert await mg.queue.purge() == (0, 0)
    async with mg.db.write() as s:
        await s.execute(update(MessageRow).where(MessageRow.id == pk).values(sent_at=now() - timedelta(hours=1.5)))
    assert await mg.queue.purge() == (1, 0)
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["body_purged"] and detail["status"] == "sent" and detail["attempt_log"]
    with pytest.raises(Conflict, match="purged"):
        await mg.queue.retry(pk)
    async with mg.db.write() as s:
        await s.execute(update(MessageRow).where(MessageRow.id == pk).values(updated_at=now() - timedelta(hours=3)))
    assert await mg.queue.purge() == (0, 1)
    with pytest.raises(NotFound):
        await mg.queue.get(pk)
    assert (await mg.queue.get(fresh)).summary.status == "sent"


async def test_an_invalid_idempotency_key_is_refused(open_mg: Opener) -> None:
    mg = await open_mg()
    await mg.tenants.add("acme")
    for key in ("x" * 300, "", "a\x00b", "line\nbreak", "lone \ud800"):  # no database stores the last two as text
        with pytest.raises(MessageError, match="idempotency_key"):
            await mg.submit("acme", note(), idempotency_key=key)


# ---- the database goes away for a while --------------------------------------------------------


async def rename(mg: Mailgate, table: str, to: str) -> None:
    """Make a table vanish (or come back), as if that part of the database were unreachable."""
    from sqlalchemy import text

    async with mg.db.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {table} RENAME TO {to}"))


async def wait_until(predicate: Callable[[], Any], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_outcomes_that_cant_be_written_are_kept_and_nothing_is_sent_twice(open_mg: Opener) -> None:
    count = 200
    mg = await open_mg(Config(poll_interval=0.05, batch_size=5, concurrency=2))
    async with serve(ServerConfig(pipelining=True)) as server:
        await setup(mg, server)
        pks = await mg.submit_many("acme", [note(to=f"r{i}@example.org") for i in range(count)])
        await rename(mg, "attempts", "attempts_away")  # outcomes can't be written
        stop = asyncio.Event()
        w = mg.new_worker()
        worker = asyncio.create_task(w.run(stop))
        await server.wait_for_messages(1)

        # Sending pauses once the first write failed: what was claimed goes (on a slow machine
        # that takes a while), nothing more is claimed.
        async def paused() -> bool:  # everything claimed was sent, and for 0.3 s nothing more
            before = len(server.messages)
            await asyncio.sleep(0.3)
            return before == len(server.messages) == w.stats.claimed

        await wait_until(paused, timeout=15)
        assert len(server.messages) < count / 2 and not worker.done()
        await rename(mg, "attempts_away", "attempts")
        await wait_until(lambda: _all_sent(mg, pks), timeout=30)
        stop.set()
        await asyncio.wait_for(worker, 10)
    ids = [str(m.parsed()["Message-ID"]) for m in server.messages]
    assert len(ids) == count and len(set(ids)) == count  # every message once
    async with mg.db.sessions() as s:
        from sqlalchemy import func

        from mailgate.db.models import AttemptRow

        assert await s.scalar(select(func.count()).select_from(AttemptRow)) == count  # one attempt each


async def test_a_worker_outlives_claims_that_fail(open_mg: Opener) -> None:
    mg = await open_mg(Config(poll_interval=0.05))
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        pks = await mg.submit_many("acme", [note(to=f"r{i}@example.org") for i in range(5)])
        await rename(mg, "message_bodies", "message_bodies_away")  # every claim fails
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        await asyncio.sleep(0.5)
        assert not worker.done() and server.messages == []
        assert (await mg.queue.stats())["by_status"]["queued"] == 5  # the failed claims took nothing
        await rename(mg, "message_bodies_away", "message_bodies")
        await wait_until(lambda: _all_sent(mg, pks))
        stop.set()
        await asyncio.wait_for(worker, 10)
    assert len(server.messages) == 5


async def _all_sent(mg: Mailgate, pks: list[int]) -> bool:
    return all([(await mg.queue.get(pk)).summary.status == "sent" for pk in pks])


async def test_submit_many_keeps_each_message_with_its_own_id(open_mg: Opener) -> None:
    # The rows come back from a multi-row INSERT … RETURNING in no promised order: ids are matched
    # by Message-ID, and a batch that repeats one takes the order-keeping statement.
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        fresh = [note(subject=f"fresh {i}", to=f"f{i}@example.org") for i in range(30)]
        twins = [note(subject=f"twin {i}", to=f"t{i}@example.org", message_id="<same@example.com>") for i in range(3)]
        for batch in (fresh, twins):
            pks = await mg.submit_many("acme", batch)
            for pk, m in zip(pks, batch, strict=True):
                detail = (await mg.queue.get(pk)).to_dict()
                assert detail["subject"] == m.subject
                assert [r["recipient"] for r in detail["recipient_outcomes"]] == [m.recipients[0].address]


async def test_a_refused_recipient_is_explained_in_the_attempt_log(open_mg: Opener) -> None:
    mg = await open_mg()
    config = ServerConfig(rcpt_reply=lambda rcpt, i: "550 5.1.1 User unknown" if rcpt.startswith("gone") else None)
    async with serve(config) as server:
        await setup(mg, server)
        pk = await mg.submit("acme", note(to=["gone@example.org", "here@example.org"]))
        await mg.run_worker(until_idle=True)
    [attempt] = (await mg.queue.get(pk)).to_dict()["attempt_log"]
    assert attempt["outcome"] == "mixed"
    assert "The recipient's address does not exist (5.1.1). Fix: Correct the recipient." in attempt["note"]


async def test_two_outcomes_of_one_message_in_one_group_leave_it_as_the_later_one_says(open_mg: Opener) -> None:
    """A group of outcomes may hold two attempts of one message (its lease ran out while outcomes
    could not be written, and the same worker took it again): both attempts are kept, and the
    message and its recipients end as the later attempt left them, on both databases."""
    from mailgate.outbox.store import Outcome

    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        [pk] = await mg.submit_many("acme", [note(to=["a@example.org", "b@example.org"])])
    [claimed] = await mg.queue.claim("w1", 10)
    assert claimed.pk == pk
    at = now()
    first = Outcome(pk, at, 5, "transient", "451 4.3.0 busy", "deferred", at + timedelta(minutes=5),
                    recipients={0: ("pending", 451, "4.3.0", "busy"), 1: ("pending", 451, "4.3.0", "busy")},
                    last_error="451 4.3.0 busy")  # fmt: skip
    second = Outcome(pk, at, 7, "accepted", "250 2.0.0 ok", "sent", None, attempts_before=1,
                     recipients={0: ("accepted", 250, "2.0.0", "ok"), 1: ("accepted", 250, "2.0.0", "ok")})  # fmt: skip
    await mg.queue.record("w1", [first, second])
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "sent" and detail.summary.attempts == 2 and detail.summary.last_error is None
    assert [r["status"] for r in detail.recipients] == ["accepted", "accepted"]
    assert [(a["number"], a["outcome"]) for a in detail.attempts] == [(1, "transient"), (2, "accepted")]
    assert detail.summary.due_at is None
    # A worker whose lease is gone writes nothing.
    await mg.queue.record("w2", [first])
    assert (await mg.queue.get(pk)).summary.status == "sent" and len((await mg.queue.get(pk)).attempts) == 2


def _same_boundaries(mime: bytes) -> bytes:
    """A composed message with its MIME boundaries (random each time) named alike."""
    import re

    for boundary in set(re.findall(rb'boundary="([^"]+)"', mime)):
        mime = mime.replace(boundary, b"BOUNDARY")
    return mime


TRICKY = 'Grüße, "quoted" \\ back\\slash\ttab\r\nnew line 😀 \u2028 </script> \' $[0] %s {"a": 1}'
ONE_LINE = TRICKY.replace("\r\n", " ").replace("\u2028", " ")


async def test_every_character_survives_the_outbox_and_the_attempt_log(open_mg: Opener) -> None:
    """The rows go to the database as JSON arrays (SQLite) or arrays (PostgreSQL) and come back
    exactly: the claimed message composes to the same bytes, and what an attempt recorded —
    texts, per-recipient results, times — reads back as written."""
    from mailgate.outbox.store import Outcome

    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await setup(mg, server)
        sent = Message(from_=f'"{ONE_LINE[:20]}" <sender@example.com>', to=["Zoë <zoe@exämple.org>", "bob@example.org"],
                       cc=["carol@example.org"], subject=ONE_LINE, text=TRICKY, html=f"<p>{TRICKY}</p>",
                       headers={"X-Review": ONE_LINE})  # fmt: skip
        [pk] = await mg.submit_many("acme", [sent])
    [claimed] = await mg.queue.claim("w1", 10)
    assert claimed.pk == pk and claimed.attempts == 0 and claimed.accepted_before == 0
    assert claimed.pending == [(0, "zoe@xn--exmple-cua.org"), (1, "bob@example.org"), (2, "carol@example.org")]
    assert claimed.message.to_dict() == sent.to_dict()
    assert _same_boundaries(claimed.message.compose()) == _same_boundaries(sent.compose())
    at = now().replace(microsecond=0)  # a whole second: written with its six zeros all the same
    results = [{"recipient": "zoe@xn--exmple-cua.org", "outcome": "accepted", "code": 250, "text": TRICKY}]
    outcome = Outcome(pk, at, 12, "mixed", TRICKY, "deferred", at + timedelta(hours=1), note=TRICKY,
                      recipients={0: ("accepted", 250, "2.0.0", TRICKY), 1: ("failed", 550, "5.1.1", "no such user"),
                                  2: ("pending", 451, None, "later")},
                      results=results, code=451, enhanced="4.3.0", server_scope="global", server_id=1,
                      server_version=2, server="127.0.0.1:25", last_error=TRICKY)  # fmt: skip
    await mg.queue.record("w1", [outcome])
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred" and detail.summary.last_error == TRICKY
    assert detail.summary.due_at == at + timedelta(hours=1) and detail.summary.attempts == 1
    assert [(r["status"], r["code"], r["enhanced"], r["text"]) for r in detail.recipients] == [
        ("accepted", 250, "2.0.0", TRICKY), ("failed", 550, "5.1.1", "no such user"), ("pending", 451, None, "later"),
    ]  # fmt: skip
    [attempt] = detail.attempts
    assert attempt == {
        "number": 1, "started_at": at.isoformat(), "duration_ms": 12, "worker": "w1",
        "server": {"scope": "global", "id": 1, "version": 2, "address": "127.0.0.1:25"},
        "outcome": "mixed", "code": 451, "enhanced": "4.3.0", "text": TRICKY, "results": results, "note": TRICKY,
    }  # fmt: skip
    # The deferred message is due again at its time, not before: stored times compare rightly.
    assert await mg.queue.claim("w1", 10) == []


async def test_sqlite_times_are_written_as_sqlalchemy_writes_them(tmp_path: Any) -> None:
    """The JSON paths write times themselves; a claim compares them as text with the ones
    SQLAlchemy writes, so both must be the same text for the same instant."""
    from datetime import UTC, datetime, timezone

    from sqlalchemy import text

    from mailgate.outbox.store import sqlite_time

    async with Mailgate.open(f"sqlite:///{tmp_path}/t.db", secret_keys=TEST_KEY, actor="tester") as mg:
        await mg.tenants.add("acme")
        await mg.servers.set("global", {"from_address": "a@example.com", "smtp": {"host": "127.0.0.1", "port": 25}})
        [pk] = await mg.submit_many("acme", [note()])
        plus_two = timezone(timedelta(hours=2))
        for instant in (datetime(2026, 12, 3, 12, 0, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=plus_two),
                        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):  # fmt: skip
            async with mg.db.write() as s:
                await s.execute(update(MessageRow).where(MessageRow.id == pk).values(due_at=instant))
            async with mg.db.sessions() as s:
                stored = await s.scalar(text("SELECT due_at FROM messages WHERE id = :pk"), {"pk": pk})
            assert stored == sqlite_time(instant)
        with pytest.raises(ValueError, match="naive"):
            sqlite_time(datetime(2026, 12, 3))
