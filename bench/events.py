"""What delivery events add to recording outcomes: `Outbox.record()` of groups of sent messages,
with the events (and their webhook fan-out) written in the same transaction, and without them.

    PYTHONPATH=src python bench/events.py [--url postgresql+psycopg://…] [--webhooks 2]

Prints µs of wall time per outcome for each, best of the rounds (the worker records in groups of
up to 200: `_Recorder.MAX_GROUP`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cryptography.fernet import Fernet

import mailgate.outbox.store as store
from mailgate import Mailgate, Message
from mailgate.config import Config
from mailgate.db.models import now
from mailgate.outbox.store import Outcome

GROUP = 200


async def _round(mg: Mailgate, worker: str) -> float:
    await mg.submit_many("acme", [Message(to="a@example.org", subject="s", text="t")] * GROUP)
    claimed = await mg.queue.claim(worker, GROUP)
    outcomes = [Outcome(c.pk, now(), 5, "accepted", "250 OK", "sent", None,
                        recipients={0: ("accepted", 250, "2.0.0", "OK")}, server_scope="global",
                        attempts_before=c.attempts) for c in claimed]  # fmt: skip
    started = time.perf_counter()
    await mg.queue.record(worker, outcomes)
    return (time.perf_counter() - started) / len(outcomes) * 1e6


@contextlib.contextmanager
def _own_schema(url: str) -> Iterator[str]:
    """On PostgreSQL, a new schema of this run's own (dropped afterwards): never the database's
    public schema, which others may use."""
    if not url.startswith("postgresql"):
        yield url
        return
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    schema = f"bench_events_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def main(url: str | None, rounds: int, webhooks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, _own_schema(url or f"sqlite:///{tmp}/bench.db") as url:
        config = Config(tenant_networks="loopback")
        async with Mailgate.open(url, secret_keys=Fernet.generate_key().decode(), config=config) as mg:
            await mg.tenants.add("acme")
            await mg.servers.set("global", {"from_address": "a@example.com", "smtp": {"host": "127.0.0.1"}})
            for i in range(webhooks):
                await mg.webhooks.create("acme", f"https://127.0.0.1:9/hook{i}")
            with_events: list[float] = []
            without: list[float] = []
            real = store.record_message_events

            async def none(*args: Any) -> None:
                return None

            for _ in range(rounds):
                with_events.append(await _round(mg, "w"))
                store.record_message_events = none  # type: ignore[assignment]
                try:
                    without.append(await _round(mg, "w"))
                finally:
                    store.record_message_events = real
    print(f"{url.split('://')[0]}, groups of {GROUP}, {webhooks} webhook(s), {rounds} rounds: µs per outcome")
    print(f"  without events: best {min(without):.1f}  median {statistics.median(without):.1f}")
    print(f"  with events:    best {min(with_events):.1f}  median {statistics.median(with_events):.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--webhooks", type=int, default=0)
    a = p.parse_args()
    asyncio.run(main(a.url, a.rounds, a.webhooks))
