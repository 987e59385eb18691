#!/usr/bin/env python3
"""HTTP submit under load: C concurrent clients POSTing /v1/messages to `mailgate serve` for D
seconds on 127.0.0.1 — throughput, p50/p99 latency, zero errors, every accepted message in the
outbox.

  python bench/http_load.py                               # SQLite, 200 clients, 30 s
  python bench/http_load.py --db both --clients 200 --duration 30
  python bench/http_load.py --worker                      # a worker in the server too (needs smtp-sink)

For each database (SQLite in a temporary directory; PostgreSQL, $MAILGATE_BENCH_POSTGRES_URL or
the local server, in a fresh schema dropped afterwards; `--db both` skips it when unreachable):

1. Set-up through the CLI, as an operator does it, with --database-url and a fresh
   MAILGATE_SECRET_KEYS: `tenants add acme`, `servers set global` (an SMTP document; nothing
   connects to it without --worker), `tokens create --role sender --tenant acme`.
2. `mailgate serve --no-worker` (with --worker: `mailgate serve`, delivering into Postfix's
   smtp-sink, started here on a free port) on 127.0.0.1, a free port; wait for /readyz. Ten
   requests warm it up (sequential, not timed; counted in the outbox before the load starts).
3. The load: wrk (C, epoll; `apt-get install wrk`) with --clients keep-alive connections, each
   POSTing as soon as its previous answer arrived (closed loop) for --duration seconds. Every
   request is {"to": ["user<thread>-<n>@example.com"], "subject": …, "text": …} (a new recipient
   each time, so the address is validated each time) with the sender token. The Lua script
   (written next to the database) counts every status code and keeps the id of every 202 answer;
   wrk's own figures give the latency percentiles (from its request write to the last byte of
   the answer, per connection) and the socket errors. wrk's --timeout is 60 s, so a slow answer
   is measured, not dropped.
4. Checks, after the server was stopped (SIGTERM: requests under way are answered): no status
   other than 202 and no socket error; the outbox (`mailgate queue stats --json`, all statuses)
   grew by at least the number of 202 answers and by at most that plus --clients (wrk stops with
   up to one request per connection in flight: the server may store it, nobody reads the answer);
   the 202 ids are distinct and every one is a row of `messages` (read directly from the
   database); without --worker every new message is `queued`. The server must exit 0 and log no
   error (no line with Traceback, ERROR or Error).

Reported: accepted msgs/s (202 answers over wrk's measured duration), latency p50/p90/p99/max,
the server process's CPU during the load (its main thread, the event loop, apart from the
others: aiosqlite's, the thread pool's) and peak RSS (VmHWM), the load generator's own CPU (wrk's
rusage) to show it is not the limit, and the CPU everything else on the machine used meanwhile
(/proc/stat; PostgreSQL's server processes count there), to show whether it was quiet.
Prints a short summary and one JSON line per database; exits 1 when a check fails, 2 when
something needed is missing. Loopback only; bounded by --duration; the server, the sink,
temporary directories and schemas are removed even on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HOST = "127.0.0.1"
TENANT = "acme"
WARMUP = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_INSTALL = "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), or https://github.com/wg/wrk"

# The load script. setup() runs in wrk's main Lua state once per thread, before that thread's
# init(); every thread has its own Lua state, so done() (main state again) gathers the threads'
# counters with thread:get, which copies tables across states.
LUA = r"""
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  ids = {}
  n = 0
  prefix = '{"to": ["user' .. tid .. '-'
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("HTTP_LOAD_TOKEN")
end

function request()
  n = n + 1
  local body = prefix .. n .. '@example.com"], "subject": "load ' .. n
    .. '", "text": "Hello from the HTTP load benchmark."}'
  return wrk.format(nil, "/v1/messages", nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 202 then
    ids[#ids + 1] = string.match(body, '"id":%s*(%d+)') or "?"
  end
end

function done(summary, latency, requests)
  local statuses, f = {}, io.open(os.getenv("HTTP_LOAD_IDS"), "w")
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do statuses[k] = (statuses[k] or 0) + v end
    local ids = t:get("ids")
    for i = 1, #ids do f:write(ids[i], "\n") end
  end
  f:close()
  local parts = {}
  for k, v in pairs(statuses) do parts[#parts + 1] = string.format('"%d": %d', k, v) end
  local e = summary.errors
  local out = io.open(os.getenv("HTTP_LOAD_OUT"), "w")
  out:write(string.format('{"duration_us": %d, "requests": %d, "bytes": %d, "statuses": {%s}, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
    .. '"latency_us": {"min": %d, "mean": %.1f, "stdev": %.1f, "max": %d, '
    .. '"p50": %d, "p90": %d, "p99": %d, "p99.9": %d}}\n',
    summary.duration, summary.requests, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
  out:close()
end
"""


class Failed(Exception):
    """Set-up went wrong (exit 2)."""


# ---- processes and /proc ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the threads of `pid`: the main thread (the event loop) and the others added
    up (aiosqlite's connection threads, the default executor's; Python names them all alike)."""
    out = {"main": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out["main" if task.name == str(pid) else "other threads"] += cpu_seconds(str(task / "stat"))
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise Failed(f"no {field} in /proc/{pid}/status")


def cli(url: str, env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([MAILGATE, "--database-url", url, *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise Failed(f"mailgate {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


def http(method: str, url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop(proc: subprocess.Popen[Any], timeout: float = 60) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


# ---- databases ----------------------------------------------------------------------------------


def pg_conninfo() -> str:
    return os.environ.get("MAILGATE_BENCH_POSTGRES_URL", PG_DEFAULT).replace("postgresql+psycopg://", "postgresql://")


def pg_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(pg_conninfo(), connect_timeout=3).close()
        return True
    except Exception:  # any failure: not reachable
        return False


@contextlib.contextmanager
def database(kind: str, scratch: Path) -> Iterator[tuple[str, str | None]]:
    """(URL, PostgreSQL schema); the schema is dropped at the end, even on error."""
    if kind == "sqlite":
        yield f"sqlite:///{scratch}/http_load.db", None
        return
    import psycopg

    schema = f"mailgate_http_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        base = os.environ.get("MAILGATE_BENCH_POSTGRES_URL", PG_DEFAULT)
        yield f"{base}?options=-csearch_path%3D{schema}", schema
    finally:
        with psycopg.connect(pg_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def stored_ids(url: str, schema: str | None) -> set[int]:
    """Every message id in the outbox, read directly (the server is stopped by then)."""
    if schema is None:
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as con:
            return {row[0] for row in con.execute("SELECT id FROM messages")}
    import psycopg

    with psycopg.connect(pg_conninfo(), options=f"-csearch_path={schema}") as conn:
        return {row[0] for row in conn.execute("SELECT id FROM messages")}


def outbox(url: str, env: dict[str, str], cwd: Path) -> dict[str, int]:
    stats: dict[str, int] = json.loads(cli(url, env, cwd, "queue", "stats", "--json"))["by_status"]
    return stats


# ---- one run ------------------------------------------------------------------------------------


@contextlib.contextmanager
def smtp_sink(scratch: Path) -> Iterator[int]:
    found = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise Failed("--worker needs Postfix's smtp-sink: bash ../shared/bench-peers/setup.sh (Debian's postfix "
                     "package, not started), or `apt-get install --no-install-recommends postfix`")  # fmt: skip
    port = free_port()
    with open(scratch / "smtp-sink.log", "wb") as log:
        sink = subprocess.Popen([found, "-c", "-u", "nobody", f"{HOST}:{port}", "1000"], stdout=log, stderr=log)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                break
            time.sleep(0.05)
        else:
            raise Failed(f"smtp-sink did not listen on {port}")
        yield port
    finally:
        stop(sink, 10)


def run_one(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailgate-http-")))
        url, schema = stack.enter_context(database(kind, scratch))
        # mailgate's defaults, not whatever MAILGATE_… this shell has (a database URL, a config file…).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
        env["MAILGATE_SECRET_KEYS"] = Fernet.generate_key().decode()
        sink_port = stack.enter_context(smtp_sink(scratch)) if a.worker else 9  # discard: never dialled

        cli(url, env, scratch, "tenants", "add", TENANT)
        document = {"from_address": "bench@example.com",
                    "smtp": {"host": HOST, "port": sink_port, "security": "none", "helo_name": "bench.example.com"},
                    "connection": {"pool_size": 10, "protocol_timeout": 30}}  # fmt: skip
        (scratch / "server.json").write_text(json.dumps(document))
        cli(url, env, scratch, "servers", "set", "global", "--file", str(scratch / "server.json"))
        token = cli(url, env, scratch, "tokens", "create", "--role", "sender", "--tenant", TENANT).split()[0]

        port = free_port()
        base = f"http://{HOST}:{port}"
        log = stack.enter_context(open(scratch / "serve.log", "w+b"))
        argv = [MAILGATE, "--database-url", url, "serve", "--host", HOST, "--port", str(port)]
        server = subprocess.Popen([*argv] if a.worker else [*argv, "--no-worker"], env=env, cwd=scratch,
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        stack.callback(stop, server)
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise Failed(f"mailgate serve exited {server.returncode}:\n{log.read().decode(errors='replace')}")
            with contextlib.suppress(OSError):
                if http("GET", base + "/readyz")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise Failed("mailgate serve not ready within 60 s")
            time.sleep(0.1)
        for i in range(WARMUP):
            body = json.dumps({"to": [f"warmup{i}@example.com"], "subject": "warm-up", "text": "Hello."}).encode()
            status, answer = http("POST", base + "/v1/messages", token, body)
            if status != 202:
                raise Failed(f"warm-up request: {status} {answer[:300]!r}")
        before = outbox(url, env, scratch)

        (scratch / "load.lua").write_text(LUA)
        wrk_env = {**os.environ, "HTTP_LOAD_TOKEN": token, "HTTP_LOAD_IDS": str(scratch / "ids.txt"),
                   "HTTP_LOAD_OUT": str(scratch / "wrk.json")}  # fmt: skip
        wrk_cmd = ["wrk", "-t", str(a.threads), "-c", str(a.clients), "-d", f"{a.duration}s", "--timeout", "60s",
                   "--latency", "-s", str(scratch / "load.lua"), base + "/v1/messages"]  # fmt: skip
        cpu0, threads0 = cpu_seconds(f"/proc/{server.pid}/stat"), thread_cpu(server.pid)
        busy0 = machine_busy()
        t0 = time.monotonic()
        with open(scratch / "wrk.out", "w+b") as wrk_out:
            wrk = subprocess.Popen(wrk_cmd, env=wrk_env, stdout=wrk_out, stderr=subprocess.STDOUT)
            try:
                _, wait_status, usage = os.wait4(wrk.pid, 0)
            except BaseException:
                wrk.kill()
                wrk.wait()
                raise
            wrk.returncode = os.waitstatus_to_exitcode(wait_status)
            wall = time.monotonic() - t0
            if server.poll() is not None:
                raise Failed(f"mailgate serve exited {server.returncode} during the load (log: {log.name})")
            cpu1, threads1 = cpu_seconds(f"/proc/{server.pid}/stat"), thread_cpu(server.pid)
            busy = machine_busy() - busy0
            hwm_kb, rss_kb = status_kb(server.pid, "VmHWM"), status_kb(server.pid, "VmRSS")
            wrk_out.seek(0)
            wrk_text = wrk_out.read().decode(errors="replace")
        if wrk.returncode != 0 or not (scratch / "wrk.json").exists():
            raise Failed(f"wrk exited {wrk.returncode}:\n{wrk_text}")
        w = json.loads((scratch / "wrk.json").read_text())
        server_exit = stop(server)
        log.seek(0)
        logged = [line for line in log.read().decode(errors="replace").splitlines()
                  if "Traceback" in line or "ERROR" in line or "Error" in line]  # fmt: skip
        after = outbox(url, env, scratch)
        ids_text = (scratch / "ids.txt").read_text().split()
        in_db = stored_ids(url, schema)

        statuses = {int(k): v for k, v in w["statuses"].items()}
        accepted = statuses.get(202, 0)
        ids = {int(i) for i in ids_text if i.isdigit()}
        stored = sum(after.values()) - sum(before.values())
        errors = {k: v for k, v in w["errors"].items() if k != "status"}
        by_thread = {name: round(threads1.get(name, 0.0) - threads0.get(name, 0.0), 2) for name in threads1}
        seconds = w["duration_us"] / 1e6
        server_cpu = cpu1 - cpu0
        wrk_cpu = usage.ru_utime + usage.ru_stime
        problems = []
        if set(statuses) - {202}:
            problems.append(f"answers other than 202: {statuses}")
        if any(errors.values()):
            problems.append(f"socket errors: {errors}")
        if len(ids_text) != accepted or len(ids) != accepted:
            problems.append(f"{accepted} answers 202 but {len(ids)} distinct ids in them ({len(ids_text)} read)")
        missing = ids - in_db
        if missing:
            problems.append(f"{len(missing)} accepted ids not in the outbox, e.g. {sorted(missing)[:5]}")
        if not accepted <= stored <= accepted + a.clients:
            problems.append(f"the outbox grew by {stored}, not {accepted} (+ at most {a.clients} in flight)")
        if not a.worker and after.get("queued", 0) != sum(after.values()):
            problems.append(f"not every message is queued: {after}")
        if logged:
            problems.append(f"the server logged {len(logged)} error lines, e.g. {logged[0][:200]!r}")
        if server_exit != 0:
            problems.append(f"mailgate serve exited {server_exit}")
        if accepted == 0:
            problems.append("nothing accepted")
        return {
            "db": kind,
            "worker": a.worker,
            "clients": a.clients,
            "wrk_threads": a.threads,
            "duration_s": round(seconds, 3),
            "accepted": accepted,
            "msgs_per_s": round(accepted / seconds, 1),
            "latency_ms": {k: round(v / 1000, 2) for k, v in w["latency_us"].items()},
            "statuses": statuses,
            "socket_errors": errors,
            "outbox_new": stored,
            "in_flight_at_stop": stored - accepted,
            "accepted_ids_missing": len(missing),
            "outbox_after": after,
            "server_cpu_s": round(server_cpu, 2),
            "server_cores": round(server_cpu / wall, 2),
            "server_cpu_ms_per_msg": round(1000 * server_cpu / max(accepted, 1), 3),
            "server_cpu_by_thread_s": by_thread,
            "server_peak_rss_mb": round(hwm_kb / 1024, 1),
            "server_rss_mb": round(rss_kb / 1024, 1),
            "server_exit": server_exit,
            "wrk_cpu_s": round(wrk_cpu, 2),
            "wrk_cores": round(wrk_cpu / wall, 3),
            "others_cores": round(max(0.0, busy - server_cpu - wrk_cpu) / wall, 2),
            "problems": problems,
            "ok": not problems,
        }
    raise AssertionError("unreachable")


def summary(r: dict[str, Any]) -> str:
    lat, err, missing = r["latency_ms"], r["socket_errors"], r["accepted_ids_missing"]
    other = sum(v for k, v in r["statuses"].items() if k != 202)
    threads = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r["server_cpu_by_thread_s"].items(), key=lambda kv: -kv[1])
                        if v >= 0.05)  # fmt: skip
    db = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[r["db"]]
    lines = [
        f"== HTTP submit, {db}, {r['clients']} clients, {r['duration_s']:.1f} s, wrk -t{r['wrk_threads']}, "
        f"mailgate serve {'with a worker' if r['worker'] else '--no-worker'}",
        f"accepted (202):  {r['accepted']:,} = {r['msgs_per_s']:,.1f} msgs/s",
        f"latency:         p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"max {lat['max']:.1f} ms",
        f"errors:          {other} answers other than 202; socket errors connect {err['connect']}, read {err['read']}, "
        f"write {err['write']}, timeout {err['timeout']}",
        f"outbox:          +{r['outbox_new']:,} ({r['accepted']:,} answered 202, {r['in_flight_at_stop']} in flight "
        f"when wrk stopped); " + (f"{missing} ids of 202 answers NOT in it" if missing else "every 202 id found"),
        f"server:          CPU {r['server_cpu_s']:.1f} s ({r['server_cores']:.2f} cores, "
        f"{r['server_cpu_ms_per_msg']:.3f} ms/msg; {threads}); peak RSS {r['server_peak_rss_mb']:.1f} MB",
        f"load generator:  wrk CPU {r['wrk_cpu_s']:.2f} s ({r['wrk_cores']:.3f} cores); everything else on the "
        f"machine (PostgreSQL's server included): {r['others_cores']:.2f} cores ({os.cpu_count()} in all)",
    ]
    if r["problems"]:
        lines.append("FAILED: " + "; ".join(r["problems"]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    p.add_argument("--clients", type=int, default=200, help="concurrent keep-alive connections (default 200)")
    p.add_argument("--duration", type=int, default=30, help="seconds of load (default 30)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: wrk is not the limit)")
    p.add_argument("--worker", action="store_true", help="run the server with its worker, delivering to smtp-sink")
    a = p.parse_args()
    if not 1 <= a.clients <= 10_000 or not 1 <= a.duration <= 3600 or not 1 <= a.threads <= min(64, a.clients):
        p.error("--clients 1-10000, --duration 1-3600 s, --threads 1-64 and at most --clients")
    if shutil.which("wrk") is None:
        print(WRK_INSTALL, file=sys.stderr)
        return 2
    if not Path(MAILGATE).exists():
        print(f"{MAILGATE} not found: run this with the project's .venv/bin/python", file=sys.stderr)
        return 2
    kinds = ["sqlite", "postgresql"] if a.db == "both" else [a.db]
    if "postgresql" in kinds and not pg_reachable():
        if a.db == "postgresql":
            print(f"PostgreSQL unreachable at {pg_conninfo()}", file=sys.stderr)
            return 2
        print(f"== PostgreSQL unreachable at {pg_conninfo()}: skipped", file=sys.stderr)
        kinds.remove("postgresql")
    ok = True
    for kind in kinds:
        try:
            r = run_one(kind, a)
        except Failed as e:
            print(f"{kind}: {e}", file=sys.stderr)
            return 2
        print(summary(r), flush=True)
        print(json.dumps(r), flush=True)
        ok = ok and r["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
