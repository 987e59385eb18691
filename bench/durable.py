#!/usr/bin/env python3
"""Durable end to end: submit N messages in batches while worker processes deliver them into a
sink, from the first submit until every message is recorded as sent.

  python bench/durable.py --db sqlite --workers 1 --port 2525 [--count 20000] [--batch 500]
  python bench/durable.py --db postgresql --workers 2 --port 2525   # $MAILGATE_BENCH_POSTGRES_URL

The submitter is this process (Mailgate.submit_many, one transaction per batch); the workers are
`mailgate worker` processes, as they run in production, started before the first submit. Each
message is like the peers' (_common.py): 1000-byte text body, one recipient, built per message
with validation. Prints one JSON line. Loopback only; bounded by --count and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", ROOT.parent / "shared" / "bench-peers"))
sys.path[:0] = [str(ROOT / "src"), str(PEERS)]

import _common as c  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from mailgate import Mailgate, Message  # noqa: E402

MAILGATE = str(Path(sys.executable).with_name("mailgate"))


def database(kind: str, scratch: Path) -> tuple[str, str | None]:
    """(URL, PostgreSQL schema to drop afterwards)."""
    if kind == "sqlite":
        return f"sqlite:///{scratch}/bench.db", None
    import psycopg

    base = os.environ.get("MAILGATE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    schema = f"mailgate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options=-csearch_path%3D{schema}", schema


def drop_schema(schema: str) -> None:
    import psycopg

    base = os.environ.get("MAILGATE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def run(a: argparse.Namespace, url: str, env: dict[str, str]) -> dict[str, object]:
    key = env["MAILGATE_SECRET_KEYS"]
    async with Mailgate.open(url, secret_keys=key) as mg:
        await mg.tenants.add("bench")
        await mg.servers.set("global", {
            "from_address": c.SENDER,
            "smtp": {"host": a.host, "port": a.port, "security": "none", "helo_name": c.LOCAL_HOSTNAME},
            "connection": {"pool_size": 10, "protocol_timeout": 30},
        })  # fmt: skip
        workers = [
            subprocess.Popen([MAILGATE, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(a.workers)
        ]
        try:
            await asyncio.sleep(1.0)  # let the workers start (imports) before the clock starts
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for start in range(0, a.count, a.batch):
                batch = [
                    Message(to=c.rcpt(i), subject=f"bench message {i}", text=c.BODY)
                    for i in range(start, min(start + a.batch, a.count))
                ]
                await mg.submit_many("bench", batch)
            submitted = time.perf_counter() - t0
            submit_cpu = time.process_time() - cpu0
            deadline = t0 + a.max_seconds
            sent = 0
            while time.perf_counter() < deadline:
                stats = (await mg.queue.stats())["by_status"]
                sent = stats["sent"]
                if sent + stats["failed"] >= a.count:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - t0
            failed = (await mg.queue.stats())["by_status"]["failed"]
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            errors = [w.communicate(timeout=60)[1].decode()[-500:] for w in workers]
    return {
        "peer": f"mailgate durable ({a.db}, {a.workers} worker{'s' if a.workers > 1 else ''})",
        "mode": "compose",
        "requested": a.count,
        "sent": sent,
        "failed": failed,
        "elapsed_s": round(elapsed, 3),
        "cpu_s": round(submit_cpu, 3),  # the submitter's; the workers are other processes
        "msgs_per_s": round(sent / elapsed, 1),
        "submit_s": round(submitted, 3),
        "submit_msgs_per_s": round(a.count / submitted, 1),
        "worker_errors": [e for e in errors if "Traceback" in e],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--max-seconds", type=float, default=300)
    a = p.parse_args()
    c.loopback_only(a.host)
    if not (1 <= a.count <= 200_000 and 1 <= a.workers <= 8 and 1 <= a.batch <= 10_000):
        sys.exit("--count in 1..200000, --workers in 1..8, --batch in 1..10000")
    with tempfile.TemporaryDirectory() as scratch:
        url, schema = database(a.db, Path(scratch))
        env = {**os.environ, "MAILGATE_DATABASE_URL": url, "MAILGATE_SECRET_KEYS": Fernet.generate_key().decode()}
        try:
            result = asyncio.run(run(a, url, env))
        finally:
            if schema:
                drop_schema(schema)
    print(json.dumps(result), flush=True)
    return 0 if result["sent"] == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
