#!/usr/bin/env python3
"""Fairness: 100 tenants, each with its own mail server, one of them black-holed. Goal: the other
99 keep at least 90 % of the throughput they get when no server is black-holed.

  python bench/fairness.py [--db sqlite|postgresql] [--rounds 2] [--per-tenant 200] [--pool-size N]
                           [--timeout S] [--max-seconds 300] [--log-dir DIR]

Every tenant (t000 … t099) may use its own server, and has one: its own server row, so its own
connection pool in the worker, all with the same connection settings. All point at one Postfix
smtp-sink on 127.0.0.1 that this script starts (and stops) — except, in the black-holed case,
t000's, which points at a listener on 127.0.0.1 that accepts connections and never sends a byte
(it closes them only when the run ends, or when the client gives up).

Each run has a fresh database (SQLite in a temporary directory, or a fresh schema on
$MAILGATE_BENCH_POSTGRES_URL). M messages per tenant (the ~1 KB message of durable.py) are
submitted before the worker starts, with Mailgate.submit_many per tenant in chunks of --chunk, the
tenants in a shuffled order per chunk round (the same order, from --seed, in every run), so each
tenant's messages are spread through the queue as they would be when all tenants are busy. Then
ONE `mailgate worker` process delivers them, as in production; its stderr is captured.

The clock runs from the worker's first attempt (the attempt log) until the last message of the 99
good tenants (t001 … t099) is sent (its `sent_at`), or until --max-seconds after the worker
started. Good-tenant throughput = their sent messages / that time. In the baseline case t000's
server is the sink too, and its messages are left out of the count in the same way. Every 0.5 s
the good tenants' sent count is polled, so that a stall shows. Runs are interleaved (baseline and
black-holed alternate, the first case alternating by round); one JSON line per run, then a
summary: the median good-tenant msgs/s of each case and their ratio.

Loopback only; bounded by --tenants × --per-tenant messages and --max-seconds per run; the sink,
the worker and the black hole are stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", ROOT.parent / "shared" / "bench-peers"))
sys.path[:0] = [str(ROOT / "src"), str(PEERS)]

import _common as c  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from durable import database, drop_schema  # noqa: E402
from mailgate import Mailgate, Message  # noqa: E402
from mailgate.config import Config  # noqa: E402
from mailgate.db.models import AttemptRow, MessageRow  # noqa: E402
from mailgate.settings.document import ConnectionSettings  # noqa: E402

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
HOST = "127.0.0.1"
BAD = "t000"
POLL = 0.5  # seconds between polls of the good tenants' sent count
STALL = 2.0  # no good message sent for this long (seconds) counts as a stall
BASELINE, BLACK_HOLED = "baseline", "black-holed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port}")


@contextlib.contextmanager
def smtp_sink(port: int, max_connections: int, idle_timeout: int) -> Iterator[subprocess.Popen[bytes]]:
    """Postfix's smtp-sink on 127.0.0.1:port. `-m`: it serves at most that many connections at once
    and leaves the others unanswered in the kernel's queue (default 256: fewer than 100 pools open),
    `-t`: it drops a connection that sent nothing for that long (default 100 s: less than a run)."""
    exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [exe, *user, "-m", str(max_connections), "-t", str(idle_timeout), f"{HOST}:{port}", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BlackHole:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte. Closes a connection only when
    the client does, or in `close()`."""

    def __init__(self) -> None:
        self.accepted = 0
        self.most_open = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._hold, HOST, 0, backlog=1000)
        return int(self._server.sockets[0].getsockname()[1])

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._open.add(writer)
        self.most_open = max(self.most_open, len(self._open))
        try:
            while await reader.read(65536):  # whatever the client says is dropped
                pass
        except ConnectionError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._open):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None


@dataclass
class Tally:
    """One poll of the outbox: the good tenants' messages and the bad one's, by status."""

    good: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)


async def tally(mg: Mailgate) -> Tally:
    M = MessageRow
    t = Tally()
    async with mg.db.sessions() as s:
        for tenant, status, n in await s.execute(
            select(M.tenant_id, M.status, func.count()).group_by(M.tenant_id, M.status)
        ):
            (t.bad if tenant == BAD else t.good)[status] += n
    return t


def tenant_ids(n: int) -> list[str]:
    return [f"t{i:03d}" for i in range(n)]


def server_document(port: int, a: argparse.Namespace) -> dict[str, Any]:
    connection: dict[str, Any] = {}
    if a.pool_size is not None:
        connection["pool_size"] = a.pool_size
    if a.timeout is not None:
        connection["connect_timeout"] = connection["protocol_timeout"] = a.timeout
    return {
        "from_address": c.SENDER,
        "smtp": {"host": HOST, "port": port, "security": "none", "helo_name": c.LOCAL_HOSTNAME},
        "connection": connection,
    }


async def prepare(mg: Mailgate, a: argparse.Namespace, sink_port: int, bad_port: int) -> float:
    """Tenants, their servers (and a global one, without which nobody may send), the messages.
    Returns the seconds the submits took."""
    tenants = tenant_ids(a.tenants)
    await mg.servers.set("global", server_document(sink_port, a))
    for tenant in tenants:
        await mg.tenants.add(tenant, may_use_own_server=True)
        await mg.servers.set(tenant, server_document(bad_port if tenant == BAD else sink_port, a))
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    for start in range(0, a.per_tenant, a.chunk):
        for tenant in rng.sample(tenants, len(tenants)):
            base = int(tenant[1:]) * a.per_tenant
            batch = [
                Message(to=c.rcpt(base + i), subject=f"bench message {base + i}", text=c.BODY)
                for i in range(start, min(start + a.chunk, a.per_tenant))
            ]
            await mg.submit_many(tenant, batch)
    return time.perf_counter() - t0


def stalls(series: list[tuple[float, int]], since: float, done: bool) -> list[tuple[float, float]]:
    """(start, length) of every stretch after `since` of at least STALL seconds in which the good
    tenants' sent count did not grow (a trailing one too, unless they were all sent)."""
    found = []
    points = [(t, n) for t, n in series if t >= since]
    if not points:
        return []
    start_t, start_n = points[0]
    for t, n in points[1:]:
        if n != start_n:
            if t - start_t >= STALL:
                found.append((start_t, t - start_t))
            start_t, start_n = t, n
    if not done and points[-1][0] - start_t >= STALL:
        found.append((start_t, points[-1][0] - start_t))
    return [(round(s, 1), round(length, 1)) for s, length in found]


def summarize_log(path: Path) -> dict[str, Any]:
    """The worker's log, its lines counted after numbers and names are made alike."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    shapes = Counter(shape(re.sub(r"worker \S+", "worker W", line)) for line in lines)
    return {
        "lines": len(lines),
        "kinds": [{"n": n, "line": shape} for shape, n in shapes.most_common(12)],
        "last": [line[:300] for line in lines[-3:]],
    }


def shape(text: str | None) -> str:
    """A log line or error text with its numbers made alike, so that like ones can be counted."""
    return re.sub(r"\d+(\.\d+)?", "#", text or "")[:300]


async def bad_tenant_report(mg: Mailgate, started: datetime, ended: datetime) -> dict[str, Any]:
    """What happened to t000's messages: their attempts (how each kind ended, how long it took,
    how many started before the measurement ended) and their messages' last errors."""
    M, A = MessageRow, AttemptRow
    kinds: dict[tuple[str, str], list[tuple[float, int]]] = {}
    async with mg.db.sessions() as s:
        query = select(A.outcome, A.text, A.started_at, A.duration_ms).join(M, A.message_pk == M.id)
        for outcome, text, at, ms in await s.execute(query.where(M.tenant_id == BAD)):
            kinds.setdefault((outcome, shape(text)), []).append(((at - started).total_seconds(), ms))
        errors = Counter(shape(e) for e in await s.scalars(select(M.last_error).where(M.tenant_id == BAD)))
    measured = (ended - started).total_seconds()
    return {
        "attempts": [
            {
                "outcome": outcome,
                "text": text,
                "n": len(xs),
                "started_before_end": sum(1 for at, _ in xs if at < measured),
                "first_started_s": round(min(at for at, _ in xs), 1),  # after the worker started
                # the attempt's duration: from a sender taking the message, so a wait for a
                # connection of the pool is part of it
                "avg_ms": round(statistics.mean(ms for _, ms in xs)),
                "max_ms": max(ms for _, ms in xs),
            }
            for (outcome, text), xs in sorted(kinds.items(), key=lambda kv: -len(kv[1]))
        ],
        "last_errors": [{"n": n, "error": e} for e, n in errors.most_common(5)],
    }


async def first_attempt_and_done(mg: Mailgate) -> tuple[datetime | None, list[datetime]]:
    """When the worker's first attempt started; when each good tenant's last message was sent."""
    M = MessageRow
    async with mg.db.sessions() as s:
        first = await s.scalar(select(func.min(AttemptRow.started_at)))
        done = await s.execute(
            select(M.tenant_id, func.max(M.sent_at)).where(M.status == "sent", M.tenant_id != BAD).group_by(M.tenant_id)
        )
        return first, [at for _, at in done if at is not None]


async def stop_worker(proc: subprocess.Popen[bytes], hole: BlackHole | None, grace: float) -> int:
    """SIGTERM, then (so that sends stuck in the black hole end at once) close the black hole; kill
    the worker if it is still there after its stop grace and a margin."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    if hole is not None:
        await hole.close()
    deadline = time.monotonic() + grace + 30
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    return await asyncio.to_thread(proc.wait)


async def run(a: argparse.Namespace, case: str, round_: int, sink_port: int, url: str, scratch: Path) -> dict[str, Any]:
    key = Fernet.generate_key().decode()
    # The worker runs the same mailgate as this script (ROOT/src), also from an exported tree.
    path = os.pathsep.join(x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if x)
    # The tenants' servers (the sink, the black hole) are on 127.0.0.1, which the destination
    # policy lets tenants reach only when the operator says so.
    env = {**os.environ, "PYTHONPATH": path, "MAILGATE_DATABASE_URL": url, "MAILGATE_SECRET_KEYS": key,
           "MAILGATE_TENANT_NETWORKS": "loopback"}  # fmt: skip
    config = Config.from_env(env)
    good_total = (a.tenants - 1) * a.per_tenant
    hole = BlackHole() if case == BLACK_HOLED else None
    log_path = scratch / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        bad_port = await hole.start() if hole is not None else sink_port
        async with Mailgate.open(url, secret_keys=key, config=config) as mg:
            submit_s = await prepare(mg, a, sink_port, bad_port)
            with log_path.open("wb") as log:
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                worker = subprocess.Popen([MAILGATE, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
            series: list[tuple[float, int]] = []
            deadline = t0 + a.max_seconds
            while True:
                now_t = time.perf_counter()
                counts = await tally(mg)
                series.append((round(now_t - t0, 2), counts.good["sent"]))
                if counts.good["sent"] >= good_total or now_t >= deadline or worker.poll() is not None:
                    break
                await asyncio.sleep(max(0.0, min(POLL - (time.perf_counter() - now_t), deadline - now_t)))
            ended = datetime.now(UTC)
            at_end = counts
            first, done_at = await first_attempt_and_done(mg)
            exit_status = await stop_worker(worker, hole, config.stop_grace)
            worker = None
            after_stop = await tally(mg)
            bad = await bad_tenant_report(mg, started, ended)
    finally:
        if worker is not None:
            await stop_worker(worker, hole, config.stop_grace)
        if hole is not None:
            await hole.close()
    completed = at_end.good["sent"] >= good_total
    start = first or started
    end = max(done_at) if completed and done_at else ended
    elapsed = (end - start).total_seconds()
    first_s = (start - started).total_seconds()
    done_s = sorted((t - start).total_seconds() for t in done_at)
    found = stalls(series, first_s, completed)
    if a.log_dir:
        Path(a.log_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, Path(a.log_dir) / f"fairness-{case}-round{round_}.log")
    defaults = ConnectionSettings()
    result: dict[str, Any] = {
        "case": case,
        "round": round_,
        "db": a.db,
        "tenants": a.tenants,
        "per_tenant": a.per_tenant,
        "good_messages": good_total,
        "good_sent": at_end.good["sent"],
        "completed": completed,
        "elapsed_s": round(elapsed, 3),
        "good_msgs_per_s": round(at_end.good["sent"] / elapsed, 1) if elapsed > 0 else None,
        "submit_s": round(submit_s, 2),
        "first_attempt_after_s": round(first_s, 2),  # after the worker process was started
        "good_by_status": dict(at_end.good),
        "tenant_done_s": {  # when each good tenant had all its messages sent, from the first attempt
            "first": round(done_s[0], 2) if done_s else None,
            "median": round(statistics.median(done_s), 2) if done_s else None,
            "last": round(done_s[-1], 2) if done_s else None,
            "tenants_done": len(done_s),
        },
        "stalls": {
            "longest_s": max((length for _, length in found), default=0.0),
            "total_s": round(sum(length for _, length in found), 1),
            "count": len(found),
            "first": found[:10],  # (start s after the worker started, length s)
        },
        "bad_tenant": {
            "tenant": BAD,
            "server": "black hole" if case == BLACK_HOLED else "smtp-sink",
            "by_status": dict(at_end.bad),  # when the measurement ended
            "by_status_after_stop": dict(after_stop.bad),  # the black hole closed, the worker stopped
            # attempts, counted after the stop (sends under way then are among them)
            **({"connections_accepted": hole.accepted, "most_open_at_once": hole.most_open} if hole else {}),
            **bad,
        },
        "connection": {
            "pool_size": a.pool_size or defaults.pool_size,
            "pool_size_source": "--pool-size" if a.pool_size else "default",
            "connect_timeout": a.timeout or defaults.connect_timeout,
            "protocol_timeout": a.timeout or defaults.protocol_timeout,
            "timeouts_source": "--timeout" if a.timeout else "default",
        },
        "worker": {
            "concurrency": config.concurrency,
            "batch_size": config.batch_size,
            "retry_base": config.retry_base,
            "lease": config.lease,
            "exit_status": exit_status,
            "log": summarize_log(log_path),
        },
        "progress": series,  # (s after the worker started, good messages sent), every 0.5 s
    }
    return result


def run_case(a: argparse.Namespace, case: str, round_: int, sink_port: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mailgate-fairness-") as scratch:
        url, schema = database(a.db, Path(scratch))
        try:
            return asyncio.run(run(a, case, round_, sink_port, url, Path(scratch)))
        finally:
            if schema:
                drop_schema(schema)


def summary(results: list[dict[str, Any]]) -> list[str]:
    rates = {
        case: [r["good_msgs_per_s"] for r in results if r["case"] == case and r["good_msgs_per_s"]]
        for case in (BASELINE, BLACK_HOLED)
    }
    out = [f"summary: good tenants' throughput (t001…t{results[0]['tenants'] - 1:03d}), msgs/s"]
    for case, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        median = f"{statistics.median(values):,.0f}" if values else "—"
        stalled = [r["stalls"]["longest_s"] for r in results if r["case"] == case]
        done = sum(1 for r in results if r["case"] == case and r["completed"])
        out.append(
            f"  {case:<12} median {median:>7}   runs: {runs}   completed {done}/{len(stalled)}"
            f"   longest stall per run: {', '.join(f'{s:g} s' for s in stalled)}"
        )
    if rates[BASELINE] and rates[BLACK_HOLED]:
        ratio = statistics.median(rates[BLACK_HOLED]) / statistics.median(rates[BASELINE])
        out.append(f"  ratio black-holed / baseline: {ratio:.2f} (goal ≥ 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--tenants", type=int, default=100, help="tenants, t000 the black-holed one (default 100)")
    p.add_argument("--per-tenant", type=int, default=200, help="messages per tenant (default 200)")
    p.add_argument("--chunk", type=int, default=20, help="messages per submit_many (default 20)")
    p.add_argument("--seed", type=int, default=1, help="the tenants' submit order (default 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pool-size", type=int, help="connections per server (default: the settings' default)")
    p.add_argument("--timeout", type=float, help="connect and protocol timeout of every server (default: defaults)")
    p.add_argument("--sink-port", type=int, default=0, help="port for the smtp-sink started here (0: a free one)")
    p.add_argument("--max-seconds", type=float, default=300, help="per run, from the worker's start (default 300)")
    p.add_argument("--log-dir", help="keep each run's worker log (stderr and stdout) here")
    a = p.parse_args()
    if not (2 <= a.tenants <= 200 and 1 <= a.per_tenant <= 2000 and a.tenants * a.per_tenant <= 200_000):
        sys.exit("--tenants in 2..200, --per-tenant in 1..2000, at most 200,000 messages")
    if not (1 <= a.chunk <= 2000 and 1 <= a.rounds <= 10 and 0 < a.max_seconds <= 1800):
        sys.exit("--chunk in 1..2000, --rounds in 1..10, --max-seconds in (0, 1800]")
    if a.pool_size is not None and not 1 <= a.pool_size <= 100:
        sys.exit("--pool-size in 1..100")
    if a.timeout is not None and not 0 < a.timeout <= 600:
        sys.exit("--timeout in (0, 600]")
    pool_size = a.pool_size or ConnectionSettings().pool_size
    sink_port = a.sink_port or free_port()
    results = []
    with smtp_sink(sink_port, a.tenants * pool_size + 100, int(a.max_seconds) + 120):
        for round_ in range(1, a.rounds + 1):
            cases = (BASELINE, BLACK_HOLED) if round_ % 2 else (BLACK_HOLED, BASELINE)
            for case in cases:
                result = run_case(a, case, round_, sink_port)
                results.append(result)
                print(json.dumps(result), flush=True)
    print("\n".join(summary(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
