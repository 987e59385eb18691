#!/usr/bin/env python3
"""Scale: the worker's claim time, memory and throughput with a small and a huge outbox.

  python bench/scale.py                                   # SQLite and PostgreSQL, 1,000 and 1,000,000
  python bench/scale.py --db sqlite --sizes 1000,100000 --claims 50 --worker-seconds 20

Goal measured: with 1,000,000 queued messages, the worker's claim time and memory stay within
10 % of what they are with 1,000; worker RSS under 150 MB.

For each database (SQLite in a temporary directory; PostgreSQL, $MAILGATE_BENCH_POSTGRES_URL or
the local server, in a fresh schema dropped afterwards) and each size N:

1. Fill. `Mailgate.open` creates the database; a tenant and a global server pointing at a local
   smtp-sink are added. Three messages go in through `Mailgate.submit_many` (1000-byte text, one
   recipient, like the peers'; a fixed date and a Message-ID in mailgate's own format, so that
   they differ only in their number). Which tables submit wrote is found by counting the rows of
   every table before and after; the rest of the N messages are copied from the stored rows of
   message 0, replacing only the per-message strings (recipient, subject, Message-ID) and moving
   the timestamps 1 µs earlier per message (so due_at is distinct and ordered): SQLite with
   `executemany` of the raw stored values (timestamps formatted by the column type's own bind
   processor), PostgreSQL with `INSERT … SELECT … FROM generate_series`. Before filling, the
   same copy is made for messages 1 and 2 and compared with what submit stored for them, column
   by column: the bulk rows are what submit would have written. PostgreSQL then gets
   `VACUUM ANALYZE` (what autovacuum does after a bulk load anyway, done now so the plans do not
   depend on its timing); SQLite gets nothing, as mailgate never runs ANALYZE.
2. Claims. All sizes of one database are filled side by side first; then `Mailgate.queue` (the
   Outbox the service and the worker use) `.claim("bench-claim", 200)` runs on each in turn, one
   claim per outbox per round (the order reversed every other round), 3 untimed warm-up rounds
   then --claims timed ones: this machine's other load (2 cores, shared) then falls on every size
   alike. After each claim the claimed messages are given back with `Outbox.release` (untimed),
   which makes them due again at once. So every claim, for every N, runs against exactly N due
   messages and takes a full batch; this is chosen over filling "N + what the claims take"
   because that would leave N + 10,000 due, not N, in the small case. Released messages move to
   the end of the due order, so the claims on the big outbox walk through fresh rows. Reported:
   median and p90 of the whole claim, and of its statements (UPDATE … RETURNING, the bodies'
   SELECT, the recipients' SELECT, as timed between SQLAlchemy's cursor events; "rest" is row
   fetching, commit and building the Message objects). One more claim, untimed, is captured and
   its statements shown by EXPLAIN QUERY PLAN (SQLite) or EXPLAIN ANALYZE in a rolled-back
   transaction (PostgreSQL, the UPDATE; plain EXPLAIN for the two SELECTs), with whether the
   UPDATE reads ix_messages_due.
3. Worker. For each size in turn (the other outboxes idle), a real `mailgate worker` process
   delivers into smtp-sink for --worker-seconds while this process samples its VmRSS every 0.2 s
   (and VmHWM just before SIGTERM; the JSON has the largest sample of each second). The outbox
   is held at N: every 0.1 s this process puts the messages the worker has sent back in the
   queue (status queued, due now, recipients pending), so the small outbox never runs dry and
   both sizes run the same work; the same recycling runs for every N. Deliveries are counted
   from the attempt log (one row per attempt; `queue stats` counts only what is sent *now*);
   msgs/s is the rate from the first recorded attempt to SIGTERM, without the worker's start-up.
   The worker keeps up to two batches claimed ahead, so a small outbox can run dry between two
   recyclings; the worker then waits MAILGATE_POLL_INTERVAL (default 1 s) before it claims
   again, which lowers msgs/s for the small size only. The worker inherits this environment:
   MAILGATE_POLL_INTERVAL=0.1 takes that out (it changes nothing while messages are due).

Prints one JSON line per (database, size), then a markdown table of the smallest against the
largest size. Loopback only; bounded by --sizes, --claims and --worker-seconds; smtp-sink,
the worker, temporary directories and schemas are removed even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", ROOT.parent / "shared" / "bench-peers"))
sys.path[:0] = [str(ROOT / "src"), str(PEERS)]

import _common as c  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import JSON, Dialect, Table, event, func, select, update  # noqa: E402

from mailgate import Mailgate, Message  # noqa: E402
from mailgate.db.models import (  # noqa: E402
    AttemptRow,
    Base,
    MessageRecipient,
    MessageRow,
    UTCDateTime,
    now,
)

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
SMTP_SINK = "/usr/sbin/smtp-sink"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DOMAIN = "example.test"
TEMPLATES = 3  # messages submitted for real: 0 is copied, 1..2 check the copy
WARMUP_CLAIMS = 3
CLAIMER = "bench-claim"
# The per-message strings of message n: (prefix, digits, format, suffix). The same on both sides:
# Python formats them, PostgreSQL builds them with lpad().
TOKENS = (("rcpt", 8, "d", "@"), ("bench message ", 8, "d", ""), (".", 16, "x", "@"))
STAMP = f"{time.time_ns():x}"  # the time part of every Message-ID in this run


def token(spec: tuple[str, int, str, str], n: int) -> str:
    prefix, width, fmt, suffix = spec
    return f"{prefix}{n:0{width}{fmt}}{suffix}"


def bench_message(n: int, date: datetime) -> Message:
    return Message(
        to=f"rcpt{n:08d}@{DOMAIN}",
        subject=f"bench message {n:08d}",
        text=c.BODY,
        message_id=f"<{STAMP}.{n:016x}@{DOMAIN}>",  # mailgate's format (message.new_message_id)
        date=date,
    )


# ---- databases ----------------------------------------------------------------------------------


def pg_base() -> str:
    return os.environ.get("MAILGATE_BENCH_POSTGRES_URL", PG_DEFAULT)


def pg_conninfo() -> str:
    return pg_base().replace("postgresql+psycopg://", "postgresql://")


def pg_connect(schema: str | None = None) -> Any:
    import psycopg

    if schema:
        return psycopg.connect(pg_conninfo(), autocommit=True, options=f"-csearch_path={schema}")
    return psycopg.connect(pg_conninfo(), autocommit=True)


@contextlib.contextmanager
def database(kind: str, scratch: Path) -> Iterator[tuple[str, str | None]]:
    """(URL, PostgreSQL schema); the schema is dropped at the end, even on error."""
    if kind == "sqlite":
        yield f"sqlite:///{scratch}/scale.db", None
        return
    schema = f"mailgate_scale_{uuid.uuid4().hex[:8]}"
    with pg_connect() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{pg_base()}?options=-csearch_path%3D{schema}", schema
    finally:
        with pg_connect() as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def key_column(table: Table) -> str:
    return "id" if table.name == "messages" else "message_pk"


def order_by(table: Table) -> str:
    return ", ".join(col.name for col in table.primary_key.columns)


# ---- filling ------------------------------------------------------------------------------------


async def row_counts(mg: Mailgate) -> dict[str, int]:
    async with mg.db.sessions() as s:
        return {
            t.name: int(await s.scalar(select(func.count()).select_from(t)) or 0) for t in Base.metadata.tables.values()
        }


async def submit_templates(mg: Mailgate) -> tuple[list[Table], int]:
    """Submit messages 0..TEMPLATES-1 for real; returns the tables submit wrote and message 0's id."""
    date = now().replace(microsecond=0)
    before = await row_counts(mg)
    ids = await mg.submit_many("bench", [bench_message(n, date) for n in range(TEMPLATES)])
    after = await row_counts(mg)
    written = {name for name in after if after[name] != before[name]}
    known = {"messages", "message_bodies", "message_recipients"}
    if written != known:
        raise SystemExit(f"submit wrote {sorted(written)}; this bench copies {sorted(known)}: update it")
    if ids != list(range(ids[0], ids[0] + TEMPLATES)):
        raise SystemExit(f"submit_many returned ids {ids}, not consecutive")
    tables = [Base.metadata.tables[name] for name in ("messages", "message_bodies", "message_recipients")]
    return tables, ids[0]


@dataclass
class SqliteCopier:
    """Rows of message n copied from message 0's stored (raw) values."""

    table: Table
    columns: list[str]
    template: list[tuple[Any, ...]]  # message 0's rows in this table
    key: int  # index of the message key column
    varying: list[int]  # columns holding per-message strings
    stamps: list[int]  # timestamp columns
    parse: Callable[[Any], datetime]
    fmt: Callable[[datetime], Any]

    @classmethod
    def load(cls, con: sqlite3.Connection, table: Table, first_id: int, dialect: Dialect) -> SqliteCopier:
        columns = [col.name for col in table.columns]
        key = key_column(table)
        query = f"SELECT {', '.join(columns)} FROM {table.name} WHERE {key} = ? ORDER BY {order_by(table)}"
        template = con.execute(query, (first_id,)).fetchall()
        zero = [token(t, 0) for t in TOKENS]
        # The column type's own processors: what mailgate stores, and how it reads it back.
        stamp_type = UTCDateTime().dialect_impl(dialect)
        read = stamp_type.result_processor(dialect, None)
        bind = stamp_type.bind_processor(dialect)
        assert read is not None and bind is not None

        def parse(raw: Any) -> datetime:
            value: datetime | None = read(raw)
            assert value is not None
            return value

        stamps = [i for i, col in enumerate(table.columns) if isinstance(col.type, UTCDateTime)]
        varying = [i for i in range(len(columns)) if any(isinstance(r[i], str) and any(z in r[i] for z in zero)
                                                          for r in template)]  # fmt: skip
        copier = cls(table, columns, template, columns.index(key), varying, stamps, parse, bind)
        for row in template:  # the timestamps must come back exactly as stored
            for i in stamps:
                if row[i] is not None and bind(parse(row[i])) != row[i]:
                    raise SystemExit(f"{table.name}.{columns[i]}: {row[i]!r} does not round-trip")
        return copier

    def rows(self, ns: range, first_id: int, shift_end: int | None) -> Iterator[tuple[Any, ...]]:
        """Rows of messages `ns`; timestamps (shift_end - n) µs earlier (None: unchanged)."""
        zero = [token(t, 0) for t in TOKENS]
        parsed = {row[i]: self.parse(row[i]) for row in self.template for i in self.stamps if row[i] is not None}
        for n in ns:
            new = [token(t, n) for t in TOKENS]
            shift = timedelta(microseconds=shift_end - n) if shift_end is not None else timedelta(0)
            stamps: dict[Any, Any] = {}
            for row in self.template:
                out = list(row)
                out[self.key] = first_id + n
                for i in self.varying:
                    value = row[i]
                    for old, repl in zip(zero, new, strict=True):
                        value = value.replace(old, repl)
                    out[i] = value
                for i in self.stamps:
                    raw = row[i]
                    if raw is not None:
                        if raw not in stamps:
                            stamps[raw] = self.fmt(parsed[raw] - shift)
                        out[i] = stamps[raw]
                yield tuple(out)


def fill_sqlite(path: Path, tables: list[Table], first_id: int, size: int, dialect: Dialect) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=OFF")  # this connection only: a bulk load, redone on a crash
        for table in tables:
            copier = SqliteCopier.load(con, table, first_id, dialect)
            key = copier.columns[copier.key]
            names = ", ".join(copier.columns)
            query = f"SELECT {names} FROM {table.name} WHERE {key} BETWEEN ? AND ? ORDER BY {order_by(table)}"
            stored = con.execute(query, (first_id + 1, first_id + TEMPLATES - 1)).fetchall()
            copied = list(copier.rows(range(1, TEMPLATES), first_id, None))
            if stored != copied:
                raise SystemExit(f"{table.name}: the copy differs from what submit stored:\n{stored}\n{copied}")
            insert = f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' * len(copier.columns))})"
            rows = copier.rows(range(TEMPLATES, size), first_id, size)
            while chunk := list(itertools.islice(rows, 100_000)):
                con.execute("BEGIN")
                con.executemany(insert, chunk)
                con.execute("COMMIT")
    finally:
        con.close()


def pg_select(table: Table, varying: set[str]) -> str:
    """SELECT of the rows of messages lo..hi copied from message 0's (`t`, id %(tid)s)."""
    key = key_column(table)
    exprs = []
    for col in table.columns:
        if col.name == key:
            exprs.append(f"t.{key} + g AS {key}")
        elif isinstance(col.type, UTCDateTime):
            exprs.append(f"t.{col.name} - (%(end)s - g) * %(scale)s * interval '1 microsecond' AS {col.name}")
        elif col.name in varying:
            is_json = isinstance(col.type, JSON)
            expr = f"t.{col.name}::text" if is_json else f"t.{col.name}"
            for prefix, width, fmt, suffix in TOKENS:
                digits = "to_hex(g)" if fmt == "x" else "g::text"
                new = f"'{prefix}' || lpad({digits}, {width}, '0') || '{suffix}'"
                expr = f"replace({expr}, '{token((prefix, width, fmt, suffix), 0)}', {new})"
            exprs.append(f"({expr})::json AS {col.name}" if is_json else f"{expr} AS {col.name}")
        else:
            exprs.append(f"t.{col.name}")
    return (f"SELECT {', '.join(exprs)} FROM {table.name} t, generate_series(%(lo)s::bigint, %(hi)s::bigint) g "
            f"WHERE t.{key} = %(tid)s")  # fmt: skip


def fill_postgresql(schema: str, tables: list[Table], first_id: int, size: int) -> None:
    zero = [token(t, 0) for t in TOKENS]
    with pg_connect(schema) as conn:
        for table in tables:
            key, names = key_column(table), [col.name for col in table.columns]
            as_text = ", ".join(f"{n}::text" for n in names)
            template = conn.execute(f"SELECT {as_text} FROM {table.name} WHERE {key} = %s", (first_id,)).fetchall()
            varying = {n for i, n in enumerate(names) if any(r[i] and any(z in r[i] for z in zero) for r in template)}
            query = pg_select(table, varying)
            params = {"tid": first_id, "lo": 1, "hi": TEMPLATES - 1, "end": size, "scale": 0}
            copied = conn.execute(f"SELECT {as_text} FROM ({query}) q ORDER BY {order_by(table)}", params).fetchall()
            stored = conn.execute(
                f"SELECT {as_text} FROM {table.name} WHERE {key} BETWEEN %s AND %s ORDER BY {order_by(table)}",
                (first_id + 1, first_id + TEMPLATES - 1),
            ).fetchall()
            if stored != copied:
                raise SystemExit(f"{table.name}: the copy differs from what submit stored:\n{stored}\n{copied}")
            params = {**params, "lo": TEMPLATES, "hi": size - 1, "scale": 1}
            conn.execute(f"INSERT INTO {table.name} ({', '.join(names)}) {query}", params)
        conn.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), (SELECT max(id) FROM messages))")
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table.name}")


def database_size(url: str, schema: str | None) -> int:
    if schema is None:
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    with pg_connect() as conn:
        row = conn.execute(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,),
        ).fetchone()
        return int(row[0] or 0)


# ---- claims -------------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


STATEMENTS = {"UPDATE MESSAGES": "update", "SELECT MESSAGE_BODIES": "bodies", "SELECT MESSAGE_RECIPIENTS": "recipients"}


def statement_name(statement: str) -> str | None:
    """Which of a claim's statements this is: update, bodies, recipients (None: another)."""
    found = re.match(r"\s*(UPDATE|SELECT)\b.*?(?:^|\s)(?:UPDATE|FROM)\s+(\w+)", statement, re.I | re.S)
    return STATEMENTS.get(f"{found[1]} {found[2]}".upper()) if found else None


class ClaimTimer:
    """Times `Outbox.claim` on one outbox: the whole claim and each of its statements (ms)."""

    def __init__(self, mg: Mailgate) -> None:
        self.mg = mg
        self.captured: list[tuple[str, Any]] = []
        self.times: dict[str, list[float]] = {name: [] for name in ("claim", *STATEMENTS.values(), "rest")}
        self._capture = False
        self._started: dict[int, float] = {}
        self._spent: dict[str, float] = {}  # the current claim's time per statement

    def _before(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        self._started[id(cursor)] = time.perf_counter()
        if self._capture:
            self.captured.append((statement, params))

    def _after(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        t0 = self._started.pop(id(cursor), None)
        if t0 is not None and (name := statement_name(statement)):
            self._spent[name] = self._spent.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        engine = self.mg.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        try:
            yield
        finally:
            event.remove(engine, "before_cursor_execute", self._before)
            event.remove(engine, "after_cursor_execute", self._after)

    async def claim(self, batch: int, *, timed: bool, capture: bool = False) -> None:
        """One claim of `batch`, then its messages given back (untimed): due again at once."""
        self._capture = capture
        self._spent.clear()
        t0 = time.perf_counter()
        got = await self.mg.queue.claim(CLAIMER, batch)
        elapsed = (time.perf_counter() - t0) * 1000
        self._capture = False
        if len(got) != batch:
            raise SystemExit(f"a claim took {len(got)} messages, not {batch}")
        if timed:
            self.times["claim"].append(elapsed)
            for name in STATEMENTS.values():
                self.times[name].append(self._spent.get(name, 0.0))
            self.times["rest"].append(elapsed - sum(self._spent.values()))
        if await self.mg.queue.release(CLAIMER, [m.pk for m in got]) != batch:
            raise SystemExit("release gave back fewer messages than were claimed")

    async def report(self) -> dict[str, Any]:
        plans = await explain(self.mg, self.captured)
        out: dict[str, Any] = {}
        for name, values in self.times.items():
            prefix = "claim" if name == "claim" else f"claim_{name}"
            out[f"{prefix}_ms_median"] = round(statistics.median(values), 2)
            out[f"{prefix}_ms_p90"] = round(percentile(values, 90), 2)
        out["claim_uses_due_index"] = any("ix_messages_due" in line for line in plans.get("update", []))
        out["plans"] = plans
        return out


async def measure_claims(mgs: list[Mailgate], count: int, batch: int) -> list[dict[str, Any]]:
    """Claims on every outbox, interleaved (one each per round, the order reversed every other
    round), so that the machine's other load falls on every size alike."""
    timers = [ClaimTimer(mg) for mg in mgs]
    with contextlib.ExitStack() as stack:
        for timer in timers:
            stack.enter_context(timer.listening())
        for i in range(WARMUP_CLAIMS + count + 1):
            for timer in timers if i % 2 == 0 else reversed(timers):
                # The last claim, untimed, is the one explained: its time sees N - batch due messages.
                last = i == WARMUP_CLAIMS + count
                await timer.claim(batch, timed=i >= WARMUP_CLAIMS and not last, capture=last)
    return [await timer.report() for timer in timers]


async def explain(mg: Mailgate, statements: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """The plans of a claim's statements: UPDATE … RETURNING, then the bodies and recipients."""
    plans: dict[str, list[str]] = {}
    async with mg.db.engine.connect() as conn:
        for statement, params in statements:
            name = statement_name(statement)
            if name is None:
                continue
            if mg.db.is_sqlite:
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                plans[name] = [str(r[-1])[:160] for r in rows]  # (id, parent, notused, detail)
            else:
                trans = await conn.begin()
                try:  # ANALYZE runs the UPDATE: rolled back
                    options = "ANALYZE, BUFFERS, TIMING OFF, COSTS OFF" if name == "update" else "COSTS OFF"
                    rows = await conn.exec_driver_sql(f"EXPLAIN ({options}) {statement}", params)
                    plans[name] = [str(r[0])[:160] for r in rows]
                finally:
                    await trans.rollback()
    return plans


# ---- the worker ---------------------------------------------------------------------------------


def proc_status(pid: int, field: str) -> int | None:
    """A /proc/PID/status field (kB for sizes; None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


async def recycle(mg: Mailgate) -> None:
    """Put sent messages back in the queue, due now, every recipient pending again."""
    M, R = MessageRow, MessageRecipient
    at = now()
    async with mg.db.write() as s:
        # The ids first (locked on PostgreSQL): the worker records more sent messages meanwhile.
        ids = list((await s.scalars(select(M.id).where(M.status == "sent").with_for_update())).all())
        if not ids:
            return
        await s.execute(
            update(R).where(R.message_pk.in_(ids)).values(status="pending", code=None, enhanced=None, text=None)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        await s.execute(
            update(M).where(M.id.in_(ids)).values(status="queued", due_at=at, updated_at=at, sent_at=None)
            .execution_options(synchronize_session=False)
        )  # fmt: skip


async def attempts_so_far(mg: Mailgate) -> int:
    async with mg.db.sessions() as s:
        return int(await s.scalar(select(func.max(AttemptRow.id))) or 0)


async def run_worker(mg: Mailgate, env: dict[str, str], seconds: float, log_path: Path) -> dict[str, Any]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([MAILGATE, "worker"], env=env, stdout=log, stderr=log)
    rss: list[int] = []
    per_second: dict[int, int] = {}  # the largest VmRSS sample in each second, kB
    first: tuple[float, int] | None = None
    last = (0.0, 0)
    hwm = threads = None
    parts: dict[str, int | None] = {}
    try:
        t0 = time.monotonic()
        for tick in itertools.count():  # every 0.1 s: recycle; 0.2 s: RSS; 1 s: attempts so far
            if (elapsed := time.monotonic() - t0) >= seconds:
                break
            if proc.poll() is not None:
                tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                raise SystemExit(f"the worker exited after {elapsed:.1f} s (code {proc.returncode}):\n{tail}")
            if tick % 2 == 0 and (kb := proc_status(proc.pid, "VmRSS")) is not None:
                rss.append(kb)
                per_second[int(elapsed)] = max(kb, per_second.get(int(elapsed), 0))
            if tick % 10 == 0:
                last = (elapsed, await attempts_so_far(mg))
                if first is None and last[1] > 0:
                    first = last
            await recycle(mg)
            await asyncio.sleep(max(0.0, t0 + (tick + 1) * 0.1 - time.monotonic()))
        last = (time.monotonic() - t0, await attempts_so_far(mg))
        hwm = proc_status(proc.pid, "VmHWM")
        threads = proc_status(proc.pid, "Threads")  # aiosqlite: one thread per open connection
        parts = {f: proc_status(proc.pid, f) for f in ("RssAnon", "RssFile", "RssShmem")}
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    async with mg.db.sessions() as s:
        outcomes = {
            o: n for o, n in await s.execute(select(AttemptRow.outcome, func.count()).group_by(AttemptRow.outcome))
        }
    stats = await mg.queue.stats()
    rate = (last[1] - first[1]) / (last[0] - first[0]) if first and last[0] > first[0] else 0.0
    return {
        "worker_seconds": seconds,
        "worker_poll_interval": float(env.get("MAILGATE_POLL_INTERVAL", 1)),
        "worker_exit": code,
        "worker_rss_peak_mb": round(max(rss) / 1024, 1) if rss else None,
        "worker_rss_median_mb": round(statistics.median(rss) / 1024, 1) if rss else None,
        "worker_vmhwm_mb": round(hwm / 1024, 1) if hwm else None,
        "worker_threads_end": threads,
        "worker_rss_end_mb": {f.removeprefix("Rss").lower(): round(kb / 1024, 1) for f, kb in parts.items() if kb},
        "worker_rss_mb_each_second": [round(kb / 1024) for _, kb in sorted(per_second.items())],
        "worker_attempts": outcomes,
        "worker_msgs_per_s": round(rate, 1),
        "worker_first_attempt_s": round(first[0], 1) if first else None,
        "queue_by_status_after": {k: v for k, v in stats["by_status"].items() if v},
    }


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class Filled:
    """One filled database of the run."""

    size: int
    mg: Mailgate
    url: str
    schema: str | None
    scratch: Path
    env: dict[str, str]
    fill_s: float


async def open_outbox(
    stack: contextlib.AsyncExitStack, a: argparse.Namespace, kind: str, size: int, port: int, tmp: Path
) -> Filled:
    """A fresh database with `size` due messages; closed and removed when `stack` unwinds."""
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=tmp)))
    url, schema = stack.enter_context(database(kind, scratch))
    key = Fernet.generate_key().decode()
    mg = await stack.enter_async_context(Mailgate.open(url, secret_keys=key))
    await mg.tenants.add("bench")
    await mg.servers.set("global", {
        "from_address": c.SENDER,
        "smtp": {"host": a.host, "port": port, "security": "none", "helo_name": c.LOCAL_HOSTNAME},
        "connection": {"pool_size": 10, "protocol_timeout": 30},
    })  # fmt: skip
    t0 = time.perf_counter()
    tables, first_id = await submit_templates(mg)
    if schema is None:
        await asyncio.to_thread(fill_sqlite, scratch / "scale.db", tables, first_id, size, mg.db.engine.dialect)
    else:
        await asyncio.to_thread(fill_postgresql, schema, tables, first_id, size)
    fill_s = time.perf_counter() - t0
    due = (await mg.queue.stats())["due_now"]
    if due != size:
        raise SystemExit(f"{due} messages due after filling, not {size}")
    print(f"# {kind} {size:,}: filled in {fill_s:.1f} s", file=sys.stderr, flush=True)
    env = {**os.environ, "MAILGATE_DATABASE_URL": url, "MAILGATE_SECRET_KEYS": key}
    return Filled(size, mg, url, schema, scratch, env, fill_s)


async def run_db(a: argparse.Namespace, kind: str, sizes: list[int], port: int, tmp: Path) -> list[dict[str, Any]]:
    """Every size of one database: filled side by side, claims interleaved, then one worker each."""
    results = []
    async with contextlib.AsyncExitStack() as stack:
        outboxes = [await open_outbox(stack, a, kind, size, port, tmp) for size in sizes]
        claims = await measure_claims([o.mg for o in outboxes], a.claims, a.batch)
        for o, claim in zip(outboxes, claims, strict=True):
            print(f"# {kind} {o.size:,}: claim median {claim['claim_ms_median']} ms", file=sys.stderr, flush=True)
        for o, claim in zip(outboxes, claims, strict=True):
            log = o.scratch / "worker.log"
            worker = await run_worker(o.mg, o.env, a.worker_seconds, log)
            worker["worker_log_kb"] = round(log.stat().st_size / 1024)
            tail = log.read_bytes()[-2000:].decode(errors="replace")
            size_mb = await asyncio.to_thread(database_size, o.url, o.schema) / 1e6
            result = {
                "db": kind,
                "size": o.size,
                "code": code_version(),
                "fill_s": round(o.fill_s, 2),
                "fill_msgs_per_s": round(o.size / o.fill_s),
                "db_mb": round(size_mb),
                "batch": a.batch,
                "claims": a.claims,
                **claim,
                **worker,
                "worker_errors": tail if "Traceback" in tail else "",
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


# ---- smtp-sink ----------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def smtp_sink(host: str, port: int, log: IO[bytes]) -> Iterator[int]:
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise SystemExit(f"port {port} is already in use")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([SMTP_SINK, "-c", *user, f"{host}:{port}", "1000"], stdout=log, stderr=log)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    break
            time.sleep(0.05)
        else:
            raise SystemExit(f"smtp-sink did not listen on {host}:{port}")
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- report -------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    out = []
    for kind in dict.fromkeys(r["db"] for r in results):
        rows = sorted((r for r in results if r["db"] == kind), key=lambda r: r["size"])
        if len(rows) < 2:
            continue
        small, big = rows[0], rows[-1]
        out += [
            f"\n{kind}: {small['size']:,} vs {big['size']:,} queued messages\n",
            f"| metric | {small['size']:,} | {big['size']:,} | ratio |",
            "|---|---:|---:|---:|",
        ]
        for label, field in (
            ("fill s", "fill_s"),
            ("claim of 200, median ms", "claim_ms_median"),
            ("claim of 200, p90 ms", "claim_ms_p90"),
            ("… its UPDATE, median ms", "claim_update_ms_median"),
            ("… its bodies SELECT, median ms", "claim_bodies_ms_median"),
            ("… its recipients SELECT, median ms", "claim_recipients_ms_median"),
            ("… the rest (row fetches, commit, Message objects), median ms", "claim_rest_ms_median"),
            ("worker peak RSS MB (VmHWM)", "worker_vmhwm_mb"),
            ("worker msgs/s", "worker_msgs_per_s"),
        ):
            x, y = small[field], big[field]
            ratio = f"{y / x:.2f}" if x and y is not None else "—"
            out.append(f"| {label} | {x if x is None else f'{x:,}'} | {y if y is None else f'{y:,}'} | {ratio} |")
        out.append(f"| claim UPDATE uses ix_messages_due | {small['claim_uses_due_index']} | "
                   f"{big['claim_uses_due_index']} | |")  # fmt: skip
        claim = big["claim_ms_median"] <= 1.10 * small["claim_ms_median"]
        rss = (big["worker_vmhwm_mb"] or 0) <= 1.10 * (small["worker_vmhwm_mb"] or 0)
        under = max(r["worker_vmhwm_mb"] or 1e9 for r in rows) < 150
        verdict = {True: "met", False: "NOT met"}
        out.append(f"\nGoal: claim median within 10 %: {verdict[claim]}; worker RSS within 10 %: {verdict[rss]}; "
                   f"worker RSS under 150 MB: {verdict[under]}")  # fmt: skip
    return "\n".join(out)


def code_version() -> str:
    """The commit measured, with "-dirty" when the working tree has changes."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite,postgresql", help="sqlite, postgresql, or both comma-separated")
    p.add_argument("--sizes", default="1000,1000000", help="queued messages, comma-separated")
    p.add_argument("--claims", type=int, default=50, help="timed claims per run")
    p.add_argument("--batch", type=int, default=200, help="messages per claim (the worker's default)")
    p.add_argument("--worker-seconds", type=float, default=20)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="smtp-sink's port (0: a free one)")
    a = p.parse_args()
    c.loopback_only(a.host)
    kinds = a.db.split(",")
    sizes = [int(s) for s in a.sizes.split(",")]
    if not set(kinds) <= {"sqlite", "postgresql"}:
        sys.exit("--db: sqlite, postgresql")
    if not all(TEMPLATES + 1 <= s <= 2_000_000 for s in sizes):
        sys.exit(f"--sizes in {TEMPLATES + 1}..2000000")
    if not (1 <= a.claims <= 1000 and 1 <= a.batch <= 1000 and 1 <= a.worker_seconds <= 300):
        sys.exit("--claims in 1..1000, --batch in 1..1000, --worker-seconds in 1..300")
    if any(s < a.batch for s in sizes):
        sys.exit("every size must hold at least one batch")
    results = []
    with tempfile.TemporaryDirectory(prefix="mailgate-scale-") as tmp:
        port = a.port or free_port(a.host)
        with open(Path(tmp) / "smtp-sink.log", "wb") as sink_log, smtp_sink(a.host, port, sink_log):
            for kind in kinds:
                results += asyncio.run(run_db(a, kind, sizes, port, Path(tmp)))
    print(table(results), flush=True)
    return 0 if all(r["worker_exit"] == 0 and not r["worker_errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
