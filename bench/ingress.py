#!/usr/bin/env python3
"""Messages per second into the outbox, in one run against one `mailgate serve --no-worker`:
HTTP single submits (POST /v1/messages), HTTP batches (POST /v1/messages/batch) and the SMTP
submission ingress (STARTTLS + AUTH PLAIN, then MAIL/RCPT/DATA pipelined per message on each
connection).

  python bench/ingress.py                       # SQLite, 10 s per way
  python bench/ingress.py --duration 20 --smtp-clients 20

The server runs in its own process (SQLite in a temporary directory, or PostgreSQL in a fresh
schema of $MAILGATE_BENCH_POSTGRES_URL / the local server). The clients are Python, in this
process: HTTP with --http-clients concurrent keep-alive connections (a minimal asyncio client), batches of
--batch messages from --batch-clients connections, SMTP with --smtp-clients threads each on one
connection (smtplib). Every client sends as soon as its previous answer came (closed loop). The
same message everywhere: one new recipient each time, a subject and 200 bytes of text. Counted:
the answers that said stored (202 / a result with an id / 250), and the outbox must have grown by
exactly their sum. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mailgate import Mailgate  # noqa: E402
from mailgate.ingress import self_signed  # noqa: E402

HOST = "127.0.0.1"
TEXT = "Your report is ready. " * 9


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def prepare(url: str, keys: str) -> str:
    async with Mailgate.open(url, secret_keys=keys, actor="bench") as mg:
        await mg.tenants.add("acme")
        await mg.servers.set("global", {"from_address": "no-reply@example.com",
                                        "smtp": {"host": HOST, "port": 9, "security": "none"}})  # fmt: skip
        token, _ = await mg.api_tokens.create("sender", "acme")
        return token


async def outbox_count(url: str, keys: str) -> int:
    async with Mailgate.open(url, secret_keys=keys, actor="bench") as mg:
        stats = await mg.queue.stats()
        return int(sum(stats["by_status"].values()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def message(n: int) -> dict[str, Any]:
    return {"to": [f"user{n}@example.com"], "subject": f"Report {n}", "text": TEXT}


class Http:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams): httpx costs ~1 ms of CPU a request,
    which on 2 cores would measure the client rather than the server."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(HOST, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {self.token}\r\n"
        writer.write(f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
        return status, json.loads(await reader.readexactly(length))

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


async def http_single(port: int, token: str, clients: int, duration: float) -> int:
    done = 0
    counter = iter(range(10**9))
    end = time.monotonic() + duration

    async def one() -> None:
        nonlocal done
        http = Http(port, token)
        try:
            while time.monotonic() < end:
                status, answer = await http.post("/v1/messages", message(next(counter)))
                if status != 202:
                    raise SystemExit(f"HTTP submit answered {status}: {str(answer)[:300]}")
                done += 1
        finally:
            http.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


async def http_batch(port: int, token: str, clients: int, size: int, duration: float) -> int:
    done = 0
    counter = iter(range(10**9, 2 * 10**9))
    end = time.monotonic() + duration

    async def one() -> None:
        nonlocal done
        http = Http(port, token)
        try:
            while time.monotonic() < end:
                status, answer = await http.post(
                    "/v1/messages/batch", {"messages": [message(next(counter)) for _ in range(size)]}
                )
                bad = [r for r in answer["results"] if "id" not in r] if status == 200 else [answer]
                if bad:
                    raise SystemExit(f"batch answered {status}: {str(bad[0])[:300]}")
                done += len(answer["results"])
        finally:
            http.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


def smtp_load(port: int, token: str, clients: int, duration: float) -> int:
    counts = [0] * clients
    errors: list[str] = []
    end = time.monotonic() + duration
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the run's self-signed certificate
    auth = base64.b64encode(f"\0acme\0{token}".encode()).decode()

    def one(k: int) -> None:
        try:
            with smtplib.SMTP(HOST, port, timeout=60) as smtp:
                smtp.ehlo("bench.example")
                smtp.starttls(context=context)
                smtp.ehlo("bench.example")
                code, _ = smtp.docmd("AUTH", "PLAIN " + auth)
                assert code == 235, code
                n = 0
                while time.monotonic() < end:
                    n += 1
                    rcpt = f"smtp{k}-{n}@example.com"
                    data = f"From: no-reply@example.com\r\nTo: {rcpt}\r\nSubject: Report {n}\r\n\r\n{TEXT}\r\n.\r\n"
                    # PIPELINING: the envelope in one write, then the data once 354 came.
                    smtp.send(f"MAIL FROM:<no-reply@example.com>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
                    replies = [smtp.getreply()[0] for _ in range(3)]
                    if replies != [250, 250, 354]:
                        raise RuntimeError(f"envelope answered {replies}")
                    smtp.send(data.encode())
                    code, text = smtp.getreply()
                    if code != 250:
                        raise RuntimeError(f"DATA answered {code} {text[:200]!r}")
                    counts[k] += 1
                    if n % 900 == 0:  # below the ingress's 1,000 messages per connection
                        break
        except Exception as e:  # reported, and the run fails
            errors.append(f"{type(e).__name__}: {e}")

    def loop(k: int) -> None:
        while time.monotonic() < end and not errors:
            one(k)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"SMTP client failed: {errors[0]}")
    return sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--http-clients", type=int, default=20)
    parser.add_argument("--batch-clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--smtp-clients", type=int, default=10)
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    scratch = Path(tempfile.mkdtemp(prefix="mailgate-bench-ingress-"))
    url = f"sqlite:///{scratch}/bench.db"
    keys = Fernet.generate_key().decode()
    token = asyncio.run(prepare(url, keys))
    before = asyncio.run(outbox_count(url, keys))
    cert, key = self_signed(scratch)
    port, smtp_port = free_port(), free_port()
    env = {**os.environ, "MAILGATE_SECRET_KEYS": keys, "PYTHONPATH": str(ROOT / "src"),
           "MAILGATE_SMTP_TOKEN_RATE": "100000",
           # every client is on 127.0.0.1, and a reconnecting one may briefly count twice
           "MAILGATE_SMTP_MAX_CONNECTIONS_PER_ADDRESS": str(2 * args.smtp_clients)}  # fmt: skip
    log = (scratch / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mailgate.cli", "--database-url", url, "serve", "--no-worker", "--host", HOST,
         "--port", str(port), "--smtp-port", str(smtp_port), "--smtp-cert", str(cert), "--smtp-key", str(key)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=scratch,
    )  # fmt: skip
    base = f"http://{HOST}:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                    break
            time.sleep(0.1)
        figures: dict[str, Any] = {}
        ways = {
            "http_single": lambda: asyncio.run(http_single(port, token, args.http_clients, args.duration)),
            "http_batch": lambda: asyncio.run(http_batch(port, token, args.batch_clients, args.batch, args.duration)),
            "smtp_ingress": lambda: smtp_load(smtp_port, token, args.smtp_clients, args.duration),
        }
        for name, run in ways.items():
            t, server_cpu, client_cpu = time.monotonic(), cpu_seconds(server.pid), time.process_time()
            n = run()
            elapsed = time.monotonic() - t
            server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
            figures[name] = {
                "messages": n, "per_s": round(n / elapsed, 1),
                # Where the time went: the server's CPU per message (all its threads), and the share
                # of one core the server and this client process used.
                "server_cpu_us_per_msg": round(server_cpu / max(n, 1) * 1e6),
                "server_cores": round(server_cpu / elapsed, 2), "client_cores": round(client_cpu / elapsed, 2),
            }  # fmt: skip
    finally:
        server.terminate()
        server.wait(60)
    grown = asyncio.run(outbox_count(url, keys)) - before
    total = sum(f["messages"] for f in figures.values())
    figures.update(
        outbox_grew=grown, answered_stored=total, check="ok" if grown == total else "MISMATCH",
        machine=f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        clients={"http": args.http_clients, "batch": f"{args.batch_clients}×{args.batch}", "smtp": args.smtp_clients},
        duration_s=args.duration, database="sqlite",
    )  # fmt: skip
    print(json.dumps(figures))
    if grown == total:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"the server's log and database stay in {scratch}", file=sys.stderr)
    return 0 if grown == total else 1


if __name__ == "__main__":
    sys.exit(main())
