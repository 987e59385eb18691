"""The worker outlives what one message, one tenant or a bug in it holds (issue 18, item 4): a
message that can't be built fails alone and the others of its batch are sent; a sender that
fails gives back the messages it held (deferred, never left `sending`) and the other lanes keep
being served; a message whose conclusion fails waits instead of staying `sending`. Real aiosmtpd
servers; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from conftest import TEST_KEY
from mailgate import Mailgate, Message
from smtp_servers import ServerConfig, serve
from test_lanes import tenants_with_own_servers
from test_outbox import FAST, Opener, note, open_mg, rename, server_doc, status, wait_until

__all__ = ["open_mg"]  # the fixture

SECRET = "Quarterly plan for Zoë"  # what no attempt log may quote


async def poisoned(mg: Mailgate, tenant: str, change: Callable[[dict[str, Any]], None], **kw: Any) -> int:
    """A message submitted as any, then its stored body changed behind mailgate's back to carry
    what a submit refuses (a lone surrogate: stored by an older version, or written into the
    database). The body is JSON, where "\\ud800" survives as an escape."""
    pk = await mg.submit(tenant, note(**kw))
    async with mg.db.sessions() as s:
        body = json.loads(await s.scalar(text(f"SELECT CAST(content AS {'TEXT' if mg.db.is_sqlite else 'text'}) "
                                              "FROM message_bodies WHERE message_pk = :pk"), {"pk": pk}))  # fmt: skip
    change(body)
    update = "UPDATE message_bodies SET content = {} WHERE message_pk = :pk"
    async with mg.db.engine.begin() as conn:
        await conn.execute(text(update.format(":c" if mg.db.is_sqlite else "CAST(:c AS json)")),
                           {"c": json.dumps(body), "pk": pk})  # fmt: skip
    return pk


def subject(value: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.update(subject=value)


async def test_a_message_that_cant_be_built_fails_alone_and_the_others_are_sent(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.tenants.add("a")
        await mg.tenants.add("b")
        # One batch on one lane (one server): the bad message among good ones of its own and another tenant.
        good_a = await mg.submit("a", note(subject="a fine"))
        bad = await poisoned(mg, "a", subject(SECRET + " \ud800"), subject=SECRET)
        good_b = await mg.submit_many("b", [note(subject=f"b {i}", to=f"b{i}@example.org") for i in range(5)])
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            await wait_until(lambda: _settled(mg, [good_a, bad, *good_b]), timeout=10)
            assert not worker.done()
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert sorted(str(m.parsed()["Subject"]) for m in server.messages) == ["a fine", *(f"b {i}" for i in range(5))]
    assert [await status(mg, pk) for pk in [good_a, *good_b]] == ["sent"] * 6
    detail = (await mg.queue.get(bad)).to_dict()
    assert detail["status"] == "failed"
    [attempt] = detail["attempt_log"]
    assert attempt["outcome"] == "error"
    assert attempt["text"] == (
        "mailgate could not build the message: its subject holds U+D800, which can't be encoded as UTF-8: "
        "surrogates not allowed (UnicodeEncodeError); it was not sent"
    )
    assert detail["last_error"] == attempt["text"]
    assert [(r["status"], r["text"]) for r in detail["recipient_outcomes"]] == [("failed", attempt["text"])]
    assert "Quarterly" not in json.dumps(detail["attempt_log"])


async def test_a_message_that_cant_be_built_can_be_cancelled_or_retried(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.tenants.add("a")
        first = await poisoned(mg, "a", subject("x \ud800"))
        second = await poisoned(mg, "a", subject("y \udfff"), to="bob@example.org")
        assert (await mg.queue.cancel(first)).status == "cancelled"
        await mg.run_worker(until_idle=True)
        assert await status(mg, second) == "failed"
        assert (await mg.queue.retry(second)).status == "queued"
        await mg.run_worker(until_idle=True)
    detail = (await mg.queue.get(second)).to_dict()
    assert detail["status"] == "failed" and [a["number"] for a in detail["attempt_log"]] == [1, 2]
    assert "U+DFFF" in detail["last_error"]
    assert await status(mg, first) == "cancelled"
    assert server.messages == []


async def test_a_recipient_name_that_cant_be_built_fails_alone_in_a_pipelined_batch(open_mg: Opener) -> None:
    mg = await open_mg()
    async with serve(ServerConfig(pipelining=True)) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.tenants.add("a")
        first = await mg.submit("a", note(subject="first", to="first@example.org"))

        def name(body: dict[str, Any]) -> None:
            body["to"][0][1] = "Bob \ud83d"  # a display name: [address, name, ascii address, ascii domain]

        bad = await poisoned(mg, "a", name, to="Bob <bob@example.org>")
        last = await mg.submit("a", note(subject="last", to="last@example.org"))
        await mg.run_worker(until_idle=True)
    assert [await status(mg, pk) for pk in (first, bad, last)] == ["sent", "failed", "sent"]
    assert "its to[0][1] holds U+D83D" in str((await mg.queue.get(bad)).summary.last_error)
    assert sorted(str(m.parsed()["Subject"]) for m in server.messages) == ["first", "last"]


async def test_a_stored_message_that_cant_be_read_fails_alone(open_mg: Opener) -> None:
    """A body this version can't make a message of (here: its date is gone) used to fail every
    claim that met it — the worker stopped, and took the others of the batch with it."""
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.tenants.add("a")
        first = await mg.submit("a", note(subject="first", to="first@example.org"))
        bad = await poisoned(mg, "a", lambda body: body.pop("date"), subject=SECRET)
        last = await mg.submit("a", note(subject="last", to="last@example.org"))
        await mg.run_worker(until_idle=True)
    assert [await status(mg, pk) for pk in (first, bad, last)] == ["sent", "failed", "sent"]
    [attempt] = (await mg.queue.get(bad)).to_dict()["attempt_log"]
    assert (attempt["outcome"], attempt["text"]) == (
        "error",
        "mailgate could not read the stored message (KeyError); it was not sent",
    )
    assert sorted(str(m.parsed()["Subject"]) for m in server.messages) == ["first", "last"]


async def test_a_subject_the_database_cant_store_is_kept_readable(tmp_path: Path) -> None:
    """SQLite: the outbox's own submit, given a message built without validation, stored a lone
    surrogate in the subject column as bytes no reader can decode: every read of that tenant's
    messages failed (the API's list and get, queue cancel). The column keeps what can be stored."""
    async with Mailgate.open(f"sqlite:///{tmp_path}/mailgate.db", secret_keys=TEST_KEY, config=FAST) as mg:
        await mg.tenants.add("a")
        data = Message(from_="sender@example.com", to="alice@example.org", subject="x", text="t").to_dict()
        [pk] = await mg.queue.submit("a", [Message.from_dict({**data, "subject": SECRET + " \ud800"})], [None],
                                     "queued")  # fmt: skip
        [listed] = await mg.queue.list_messages(tenant_id="a")
        assert listed.id == pk and listed.subject == SECRET + " \ufffd"
        assert (await mg.queue.cancel(pk)).status == "cancelled"


async def test_an_outcome_with_text_no_database_stores_is_written_and_reads_back(open_mg: Opener) -> None:
    """What a server says goes into the attempt log: a reply may carry NUL or a lone surrogate
    (PostgreSQL refuses both; SQLite's JSON functions store bytes nobody can read back). Written,
    those are U+FFFD — else every write of the group failed, and the worker, taking that for a
    database that is away, stopped sending for good."""
    from mailgate.db.models import now
    from mailgate.outbox.store import Outcome

    mg = await open_mg()
    await mg.servers.set("global", {"from_address": "no-reply@example.com", "smtp": {"host": "smtp.example.com"}})
    await mg.tenants.add("a")
    pk = await mg.submit("a", note())
    [claimed] = await mg.queue.claim("w1", 10)
    assert claimed.pk == pk
    said = "550 5.1.1 no\x00such \ud800user"
    outcome = Outcome(pk, now(), 3, "permanent", said, "failed", None, recipients={0: ("failed", 550, "5.1.1", said)},
                      results=[{"recipient": "a@example.org", "text": said}], note=said, last_error=said)  # fmt: skip
    await mg.queue.record("w1", [outcome])
    detail = (await mg.queue.get(pk)).to_dict()
    readable = "550 5.1.1 no\ufffdsuch \ufffduser"
    assert detail["status"] == "failed" and detail["last_error"] == readable
    [attempt] = detail["attempt_log"]
    assert (attempt["text"], attempt["note"], attempt["results"][0]["text"]) == (readable,) * 3
    assert detail["recipient_outcomes"][0]["text"] == readable


async def test_a_tenant_whose_stored_settings_cant_be_read_waits_alone(open_mg: Opener) -> None:
    """A stored document this version refuses (written by an older one, or in the database by
    hand): that tenant's messages are held with the reason (a save releases them), the other
    tenants' are sent, the worker runs on."""
    mg = await open_mg()
    async with serve(ServerConfig()) as server:
        await mg.servers.set("global", server_doc(server))
        await mg.tenants.add("a", may_use_own_server=True)
        await mg.tenants.add("b")
        await mg.servers.set("a", server_doc(server))
        waiting = await mg.submit("a", note(subject="a"))
        sent = await mg.submit("b", note(subject="b"))
        async with mg.db.engine.begin() as conn:
            document = (await mg.servers.get("a")).document  # type: ignore[union-attr]
            document["smtp"]["port"] = 0
            cast = ":d" if mg.db.is_sqlite else "CAST(:d AS json)"
            await conn.execute(text(f"UPDATE mail_servers SET document = {cast} WHERE scope = 'a'"),
                               {"d": json.dumps(document)})  # fmt: skip
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            await wait_until(lambda: _settled(mg, [sent]))
            await wait_until(lambda: _all(mg, [waiting], "held"))  # until the settings are saved again
            assert not worker.done()
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert [str(m.parsed()["Subject"]) for m in server.messages] == ["b"]
    last_error = str((await mg.queue.get(waiting)).summary.last_error)
    assert "the stored settings of a's own mail server do not load in this version of mailgate (smtp.port" in \
        last_error and last_error.endswith(": save them again")  # fmt: skip


async def test_a_failing_sender_gives_its_messages_back_and_other_lanes_keep_going(
    open_mg: Opener, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Something unexpected below the transport (here: the event loop's connect raising what it
    never should, for one server only): every message the failing senders held is deferred with
    the reason, never left `sending`; another tenant's server keeps sending through the same
    worker with as few senders as lanes; once the fault is gone, everything goes."""
    mg = await open_mg(dataclasses.replace(FAST, concurrency=2))
    async with serve(ServerConfig()) as broken, serve(ServerConfig()) as fine:
        await tenants_with_own_servers(mg, {"a": broken, "b": fine})
        await mg.servers.set("global", server_doc(fine))
        loop = asyncio.get_running_loop()
        connect = loop.create_connection

        what = "a bug below the transport, quoting what it failed on"  # data at run time, as a secret would be

        def faulty(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
            if port == broken.port:
                raise RuntimeError(what)
            return connect(factory, host, port, **kw)

        monkeypatch.setattr(loop, "create_connection", faulty)
        a = await mg.submit_many("a", [note(subject=f"a {i}", to=f"a{i}@example.org") for i in range(12)])
        b = await mg.submit_many("b", [note(subject=f"b {i}", to=f"b{i}@example.org") for i in range(12)])
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            await fine.wait_for_messages(12, timeout=10)
            await wait_until(lambda: _tried(mg, a), timeout=10)  # every one of a's failed at least once
            monkeypatch.undo()
            await wait_until(lambda: _all(mg, a + b, "sent"), timeout=15)
            assert not worker.done()
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert len(broken.messages) == 12 and len(fine.messages) == 12
    first = (await mg.queue.get(a[0])).to_dict()["attempt_log"][0]
    assert first["outcome"] == "error"
    assert first["text"] == "mailgate failed while handling the message (RuntimeError; the log has the details)"
    assert "may have reached the server" in first["note"]
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("a sender of mail server")]
    # Its type and where it was raised; never its text, which may quote a secret or a message.
    assert failures and all("RuntimeError, raised at:" in f and "in faulty" in f for f in failures), failures
    leaked = [r.getMessage() for r in caplog.records if what in r.getMessage() or r.exc_info]
    assert not leaked, leaked


async def test_messages_whose_conclusion_fails_wait_instead_of_staying_sending(open_mg: Opener) -> None:
    """The server refuses the password for good, and marking it broken fails (the audit log's
    table is away): the messages wait as deferred — tried again later — instead of staying
    `sending` under leases the worker renews for ever."""
    mg = await open_mg()
    async with serve(ServerConfig(auth={"PLAIN"}, auth_require_tls=False)) as server:
        wrong = {"method": "password", "username": server.config.username, "password": "wrong"}
        await mg.servers.set("global", server_doc(server, auth=wrong))
        await mg.tenants.add("a")
        pks = await mg.submit_many("a", [note(subject=f"n {i}", to=f"n{i}@example.org") for i in range(3)])
        await rename(mg, "audit_log", "audit_log_away")
        try:
            await mg.run_worker(until_idle=True)
        finally:
            await rename(mg, "audit_log_away", "audit_log")
    for pk in pks:
        detail = (await mg.queue.get(pk)).to_dict()
        assert detail["status"] == "deferred"
        [attempt] = detail["attempt_log"]
        assert attempt["outcome"] == "error" and attempt["text"].startswith(
            "mailgate failed while handling the message"
        )
    assert (await mg.servers.health("global")).broken_reason is None  # not marked: it is tried again later


async def _settled(mg: Mailgate, pks: list[int]) -> bool:
    return all([await status(mg, pk) in ("sent", "failed") for pk in pks])


async def _all(mg: Mailgate, pks: list[int], wanted: str) -> bool:
    return all([await status(mg, pk) == wanted for pk in pks])


async def _tried(mg: Mailgate, pks: list[int]) -> bool:
    return all([(await mg.queue.get(pk)).summary.attempts >= 1 for pk in pks])
