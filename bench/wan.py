#!/usr/bin/env python3
"""WAN: messages/s over ONE connection when every server reply arrives --delay-ms (50) late.

  .venv/bin/python bench/wan.py [--count 200] [--rounds 3] [--delay-ms 50] [--mode raw|compose|both]

Issue 6's goal: with 50 ms added to every server reply, mailgate sends at least 1.8x the messages
per second per connection of aiosmtplib, in the same run.

Set-up, all on 127.0.0.1: Postfix's `smtp-sink` (started and stopped here, on a free port, as
../shared/bench-peers/run_all.sh starts it), and in front of it a delaying TCP proxy in this
process: every chunk the sink sends is handed to the client --delay-ms after the proxy read it,
in order, each chunk on its own clock (one arriving 1 ms after another leaves 1 ms after it);
client bytes go to the sink at once. The senders are separate processes, one connection each,
through the proxy, with the peers' message (../shared/bench-peers/_common.py: ~1.26 KB, one
recipient), pre-built (raw) or built per send (compose):
- aiosmtplib: ../shared/bench-peers/peer_c_aiosmtplib.py --conns 1, with the peers' venv
  ($SCRATCH/venv, SCRATCH=/tmp/perfbase);
- mailgate: bench/mailgate_peer.py --conns 1 (SMTPClient.send; with --mailgate-batch N,
  send_many of N messages, as the worker sends: one round trip per message), with this interpreter.
Rounds interleave them (aiosmtplib, mailgate, aiosmtplib, mailgate, …). Each client times
itself from its first connect to its QUIT, so both rates include the session's own round trips.

Expectation, with RTT = the delay (loopback and CPU add well under 1 ms per exchange):
- aiosmtplib does not pipeline: MAIL, RCPT, DATA, then body + dot = 4 round trips per message;
- mailgate pipelines against a server that offers PIPELINING (smtp-sink does): MAIL + RCPT + DATA
  in one write, then body + dot = 2 round trips per message;
- both add 3 per session (greeting, EHLO, QUIT), so N messages take (4N + 3) vs (2N + 3) RTTs:
  ~1.99x for N = 200 (2x as N grows), about 5 msgs/s vs 10 msgs/s at 50 ms.
The proxy counts the round trips it sees: a "turn" is a burst of server data that follows client
data (the greeting counts as the first); round_trips_per_msg = (turns - 3) / messages sent.

Prints one JSON line per run and a final JSON summary (medians, min-max, the ratio mailgate /
aiosmtplib per mode, the RTT model's ratio). Loopback only; bounded by --count, --rounds,
--run-timeout per client run and --max-seconds in all; the sink and every client process started
here are stopped here, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", ROOT.parent / "shared" / "bench-peers"))
SCRATCH = Path(os.environ.get("SCRATCH", "/tmp/perfbase"))
SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SESSION_TURNS = 3  # greeting, EHLO, QUIT
_COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")
_RESOLUTION = time.get_clock_info("monotonic").resolution


# ---- the delaying proxy ------------------------------------------------------------------------


@dataclass
class ConnStats:
    """What the proxy saw on one client connection."""

    client_chunks: int = 0
    client_bytes: int = 0
    server_chunks: int = 0
    server_bytes: int = 0
    turns: int = 0  # bursts of server data that follow client data: round trips
    delays: list[float] = field(default_factory=list)  # per chunk: handed on - read, seconds


class _Side(asyncio.Protocol):
    def __init__(self, conn: _Conn, server: bool) -> None:
        self.conn = conn
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.made(self.server, transport)

    def data_received(self, data: bytes) -> None:
        if self.server:
            self.conn.from_server(data)
        else:
            self.conn.from_client(data)

    def eof_received(self) -> bool:
        self.conn.closed(self.server)
        return True  # the connection closes when the other direction is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.closed(self.server)


class _Conn:
    """One client connection: client → sink at once; sink → client each chunk `delay` late, in
    order. The sink's close is delayed the same way, after the data before it."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.stats = ConnStats()
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.early: list[bytes] = []  # client bytes before the sink connection is up
        self.due: collections.deque[tuple[float, float, bytes | None]] = collections.deque()  # None: close
        self.timer: asyncio.TimerHandle | None = None
        self.client_spoke = True  # the greeting starts the first turn
        self.server_done = False
        self.task: asyncio.Task[None] | None = None

    def made(self, server: bool, transport: asyncio.Transport) -> None:
        if server:
            self.server = transport
            for chunk in self.early:
                transport.write(chunk)
            self.early.clear()
            return
        self.client = transport
        self.proxy.conns.append(self.stats)
        self.task = self.loop.create_task(self._connect())
        self.proxy.tasks.add(self.task)
        self.task.add_done_callback(self.proxy.tasks.discard)

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Side(self, True), self.proxy.host, self.proxy.upstream)
        except OSError:
            if self.client is not None:
                self.client.close()

    def from_client(self, data: bytes) -> None:
        self.stats.client_chunks += 1
        self.stats.client_bytes += len(data)
        self.client_spoke = True
        if self.server is not None:
            self.server.write(data)
        else:
            self.early.append(data)

    def from_server(self, data: bytes) -> None:
        self.stats.server_chunks += 1
        self.stats.server_bytes += len(data)
        if self.client_spoke:
            self.stats.turns += 1
            self.client_spoke = False
        self._later(data)

    def _later(self, data: bytes | None) -> None:
        now = self.loop.time()
        self.due.append((now + self.proxy.delay, now, data))
        if self.timer is None:
            self.timer = self.loop.call_at(now + self.proxy.delay, self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.due and self.due[0][0] <= now + _RESOLUTION:
            _, read_at, data = self.due.popleft()
            if self.client is None or self.client.is_closing():
                self.due.clear()
                return
            if data is None:
                self.client.close()
                return
            self.client.write(data)
            self.stats.delays.append(now - read_at)
        if self.due:
            self.timer = self.loop.call_at(self.due[0][0], self._flush)

    def closed(self, server: bool) -> None:
        if server:
            if not self.server_done:
                self.server_done = True
                self._later(None)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.due.clear()
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()


class DelayProxy:
    """Listens on `host`, a free port; forwards to `host:upstream`, delaying what comes back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, upstream: int, delay_s: float) -> None:
        self.loop = loop
        self.host = host
        self.upstream = upstream
        self.delay = delay_s
        self.conns: list[ConnStats] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await self.loop.create_server(lambda: _Side(_Conn(self), False), self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()


# ---- the sink ----------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def start_sink(host: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """smtp-sink as the peers run it (-c: counters; PIPELINING offered), on a free port."""
    port = free_port(host)
    with log.open("wb") as out:
        sink = subprocess.Popen(
            [SINK, "-c", "-u", "nobody", f"{host}:{port}", "1000"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sink.poll() is not None:
            sys.exit(f"smtp-sink exited with {sink.returncode}: {log.read_text(errors='replace')[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return sink, port
        time.sleep(0.05)
    stop(sink)
    sys.exit(f"smtp-sink did not listen on {host}:{port} within 5 s")


def sink_messages(log: Path) -> int:
    found = _COUNTER.findall(log.read_bytes()[-4096:])
    return int(found[-1][2]) if found else 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the runs ----------------------------------------------------------------------------------


def client_command(a: argparse.Namespace, peer: str, mode: str, port: int, max_seconds: float) -> list[str]:
    args = ["--host", a.host, "--port", str(port), "--count", str(a.count), "--conns", "1", "--mode", mode]
    args += ["--max-seconds", f"{max_seconds:g}"]
    if peer == "aiosmtplib":
        return [a.aiosmtplib_python, str(PEERS / "peer_c_aiosmtplib.py"), *args]
    return [sys.executable, str(ROOT / "bench" / "mailgate_peer.py"), *args, "--batch", str(a.mailgate_batch)]


async def run_client(cmd: list[str], timeout: float, running: set[asyncio.subprocess.Process]) -> tuple[int, str, str]:
    """(returncode, stdout, stderr); the process is killed when it outlives `timeout`."""
    env = {**os.environ, "PEERS": str(PEERS), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    running.add(proc)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        return -1, "", f"killed after {timeout:g} s"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        running.discard(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def one_run(
    a: argparse.Namespace,
    proxy: DelayProxy,
    sink_log: Path,
    peer: str,
    mode: str,
    rnd: int,
    timeout: float,
    running: set[asyncio.subprocess.Process],
) -> dict[str, Any]:
    first_conn = len(proxy.conns)
    sink0 = sink_messages(sink_log)
    # The client stops sending at its own --max-seconds, before this process kills it.
    cmd = client_command(a, peer, mode, proxy.port, max(1.0, timeout - 5))
    rc, out, err = await run_client(cmd, timeout, running)
    await asyncio.sleep(0.2)  # the sink's counter line after the last message
    conns = proxy.conns[first_conn:]
    rec: dict[str, Any] = {"round": rnd, "peer": peer, "mode": mode, "rc": rc}
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {}
    for k in ("requested", "sent", "failed", "elapsed_s", "cpu_s", "aiosmtplib"):
        if k in res:
            rec[k] = res[k]
    sent = int(res.get("sent", 0))
    if res.get("elapsed_s"):  # the peers round msgs_per_s to 0.1: too coarse at ~5-10 msgs/s
        rec["msgs_per_s"] = round(sent / float(res["elapsed_s"]), 3)
    turns = sum(c.turns for c in conns)
    delays = sorted(d for c in conns for d in c.delays)
    rec |= {
        "sink_counted": sink_messages(sink_log) - sink0,
        "connections": len(conns),
        "turns": turns,
        "round_trips_per_msg": round((turns - SESSION_TURNS * len(conns)) / sent, 3) if sent else None,
        "client_writes": sum(c.client_chunks for c in conns),
        "server_chunks": sum(c.server_chunks for c in conns),
        "delay_ms_median": round(1000 * statistics.median(delays), 2) if delays else None,
        "delay_ms_max": round(1000 * delays[-1], 2) if delays else None,
    }
    if rc != 0 or sent != a.count:
        rec["stderr"] = err[-800:]
    return rec


async def bench(a: argparse.Namespace, sink_port: int, sink_log: Path) -> list[dict[str, Any]]:
    t0 = time.monotonic()
    proxy = DelayProxy(asyncio.get_running_loop(), a.host, sink_port, a.delay_ms / 1000)
    await proxy.start()
    running: set[asyncio.subprocess.Process] = set()
    modes = ["raw", "compose"] if a.mode == "both" else [a.mode]
    records: list[dict[str, Any]] = []
    try:
        for rnd in range(1, a.rounds + 1):
            for mode in modes:
                for peer in ("aiosmtplib", "mailgate"):
                    left = a.max_seconds - (time.monotonic() - t0)
                    if left < 10:
                        print(json.dumps({"stopped": f"--max-seconds {a.max_seconds:g} reached"}), flush=True)
                        return records
                    rec = await one_run(a, proxy, sink_log, peer, mode, rnd, min(a.run_timeout, left), running)
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
    finally:
        for proc in list(running):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await proxy.stop()
    return records


def summary(a: argparse.Namespace, records: list[dict[str, Any]]) -> dict[str, Any]:
    n = a.count
    out: dict[str, Any] = {
        "summary": "wan",
        "delay_ms": a.delay_ms,
        "count": n,
        "rounds": a.rounds,
        "model": {
            "round_trips_per_msg": {"aiosmtplib": 4, "mailgate": 2},
            "session_round_trips": SESSION_TURNS,
            "ratio": round((4 * n + SESSION_TURNS) / (2 * n + SESSION_TURNS), 3),
        },
        "goal_ratio": 1.8,
        "all_ok": all(r["rc"] == 0 and r.get("sent") == n for r in records),
    }
    for mode in ("raw", "compose"):
        by_peer: dict[str, dict[str, Any]] = {}
        medians: dict[str, float] = {}
        for peer in ("aiosmtplib", "mailgate"):
            rs = [r for r in records if r["peer"] == peer and r["mode"] == mode and r.get("msgs_per_s")]
            if not rs:
                continue
            rates = [float(r["msgs_per_s"]) for r in rs]
            rtts = [r["round_trips_per_msg"] for r in rs if r["round_trips_per_msg"] is not None]
            medians[peer] = statistics.median(rates)
            by_peer[peer] = {
                "runs": len(rs),
                "msgs_per_s_median": round(medians[peer], 3),
                "msgs_per_s_min": min(rates),
                "msgs_per_s_max": max(rates),
                "round_trips_per_msg_median": statistics.median(rtts) if rtts else None,
                "delay_ms_max": max(r["delay_ms_max"] or 0 for r in rs),
            }
        if not by_peer:
            continue
        entry: dict[str, Any] = {"peers": by_peer}
        if len(by_peer) == 2:
            ratio = medians["mailgate"] / medians["aiosmtplib"]
            entry["ratio_mailgate_over_aiosmtplib"] = round(ratio, 3)
            entry["goal_met"] = ratio >= 1.8
        out[mode] = entry
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="where the sink and the proxy listen (loopback only)")
    p.add_argument("--count", type=int, default=200, help="messages per run, over one connection")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=50.0, help="added to every chunk the server sends")
    p.add_argument("--mode", choices=["raw", "compose", "both"], default="raw")
    p.add_argument("--run-timeout", type=float, default=120.0, help="seconds; a client run is killed after this")
    p.add_argument("--max-seconds", type=float, default=900.0, help="no run starts after this many seconds")
    p.add_argument("--aiosmtplib-python", default=str(SCRATCH / "venv" / "bin" / "python"))
    p.add_argument(
        "--mailgate-batch", type=int, default=1, help="mailgate: messages per SMTPClient.send_many (1: send)"
    )
    a = p.parse_args()
    try:
        loopback = ipaddress.ip_address(a.host)
    except ValueError:
        sys.exit(f"--host must be an IP address, not {a.host!r}")
    if loopback.version != 4 or not loopback.is_loopback:
        sys.exit(f"refusing non-loopback host {a.host!r}: 127.0.0.1 only")
    if not (1 <= a.count <= 5000 and 1 <= a.rounds <= 20 and 0 <= a.delay_ms <= 1000):
        sys.exit("--count in 1..5000, --rounds in 1..20, --delay-ms in 0..1000")
    if not (10 <= a.run_timeout <= 900 and 10 <= a.max_seconds <= 3600):
        sys.exit("--run-timeout in 10..900, --max-seconds in 10..3600")
    if not os.access(SINK, os.X_OK) or not os.access(a.aiosmtplib_python, os.X_OK):
        sys.exit(f"needs {SINK} and {a.aiosmtplib_python}: run ../shared/bench-peers/setup.sh")
    # SIGTERM unwinds like Ctrl-C, so that the finally clauses stop the sink and the clients.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="mailgate-wan-") as scratch:
        log = Path(scratch) / "sink.log"
        sink, port = start_sink(a.host, log)
        try:
            records = asyncio.run(bench(a, port, log))
        finally:
            stop(sink)
    result = summary(a, records)
    print(json.dumps(result), flush=True)
    return 0 if result["all_ok"] and len(records) == 2 * a.rounds * (2 if a.mode == "both" else 1) else 1


if __name__ == "__main__":
    sys.exit(main())
