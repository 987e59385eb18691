"""Nothing lost: a worker process killed with SIGKILL in the middle of delivering 2,000 messages.

Another worker takes over once the dead one's leases run out. Every message arrives; the only
duplicates are messages the dead worker held at the kill, and their attempt log says they may have
been delivered before. On PostgreSQL two workers run at once from the start, and none delivers a
message the other did (apart from those same in-flight ones).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from conftest import TEST_KEY
from mailgate import Mailgate, Message
from mailgate.db.models import AttemptRow, MessageRow
from smtp_servers import RecordingServer, ServerConfig, serve_in_thread

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
COUNT = 2000


def start_worker(database_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MAILGATE_DATABASE_URL": database_url,
        "MAILGATE_SECRET_KEYS": TEST_KEY,
        "MAILGATE_LEASE": "2",
        "MAILGATE_POLL_INTERVAL": "0.1",
        "MAILGATE_BATCH_SIZE": "50",
        "MAILGATE_CONCURRENCY": "20",
    }
    with log.open("ab") as out:
        return subprocess.Popen([MAILGATE, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)


async def prepare(database_url: str, server: RecordingServer) -> set[str]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        await mg.tenants.add("acme")
        await mg.servers.set("global", {
            "from_address": "no-reply@example.com",
            "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "connection": {"pool_size": 5, "protocol_timeout": 10},
        })  # fmt: skip
        for start in range(0, COUNT, 500):
            batch = [Message(to=f"r{i}@example.org", subject=f"m{i}", text="x") for i in range(start, start + 500)]
            await mg.submit_many("acme", batch)
        async with mg.db.sessions() as s:
            return set((await s.scalars(select(MessageRow.message_id))).all())


async def in_flight_of(database_url: str, pid: int) -> set[str]:
    """Messages whose lease the (dead) worker with this pid still holds."""
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg, mg.db.sessions() as s:
        query = select(MessageRow.message_id, MessageRow.lease_owner).where(MessageRow.status == "sending")
        rows = await s.execute(query)
        return {mid for mid, owner in rows if owner and f":{pid}:" in owner}


async def finished(database_url: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg, mg.db.sessions() as s:
        stats = (await mg.queue.stats())["by_status"]
        notes: dict[str, list[str]] = {}
        query = select(MessageRow.message_id, AttemptRow.note).join(AttemptRow).where(AttemptRow.note.is_not(None))
        for mid, note in await s.execute(query):
            notes.setdefault(mid, []).append(note)
        return stats, notes


def received_ids(server: RecordingServer) -> Counter[str]:
    return Counter(str(m.parsed()["Message-ID"]) for m in list(server.messages))


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_loses_nothing(database_url: str, tmp_path: Path) -> None:
    postgres = database_url.startswith("postgresql")
    with serve_in_thread(ServerConfig(pipelining=True)) as server:
        submitted = asyncio.run(prepare(database_url, server))
        assert len(submitted) == COUNT
        victim = start_worker(database_url, tmp_path / "victim.log")
        others = [start_worker(database_url, tmp_path / "partner.log")] if postgres else []
        try:
            wait_for(lambda: len(server.messages) >= 300, 60, "the first deliveries")
            # Kill it while it provably holds claimed messages.
            wait_for(lambda: asyncio.run(in_flight_of(database_url, victim.pid)), 60, "the victim holding leases")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            in_flight = asyncio.run(in_flight_of(database_url, victim.pid))
            others.append(start_worker(database_url, tmp_path / "successor.log"))
            wait_for(lambda: len(set(received_ids(server))) >= COUNT, 120, "every message")
            wait_for(lambda: asyncio.run(finished(database_url))[0]["sent"] == COUNT, 60, "every message recorded")
        finally:
            for p in [victim, *others]:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in others:
                assert p.wait(30) == 0, (tmp_path / "successor.log").read_text()[-2000:]
        counts = received_ids(server)
    stats, notes = asyncio.run(finished(database_url))

    assert set(counts) == submitted  # every message arrived, none lost
    assert stats["sent"] == COUNT and stats["sending"] == 0 and stats["queued"] == 0
    duplicates = {mid for mid, n in counts.items() if n > 1}
    print(f"in flight at the kill: {len(in_flight)}, delivered twice: {len(duplicates)}")
    assert duplicates <= in_flight, f"delivered twice but not in flight at the kill: {duplicates - in_flight}"
    assert all(n <= 2 for n in counts.values())
    for mid in in_flight:  # the log says what may have happened to each of them
        assert any("took over from worker" in note and "may have delivered" in note for note in notes.get(mid, []))
    assert in_flight, "the kill caught no message in flight: " + (tmp_path / "victim.log").read_text()[-3000:]
