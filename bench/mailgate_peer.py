#!/usr/bin/env python3
"""mailgate as a peer in ../shared/bench-peers: N messages over --conns reused connections.

Same contract as the peers there (same message shape and arguments, one JSON line on stdout,
timed inside the process from the first connect to the last accepted message):
- --mode raw: pre-rendered bytes from _common.raw(i), sent with SMTPClient.send();
- --mode compose: a `mailgate.Message` built per send (address validation included) and
  composed, as an application does.
Default asyncio event loop. Loopback only, bounded by --count and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", ROOT.parent / "shared" / "bench-peers"))
sys.path[:0] = [str(ROOT / "src"), str(PEERS)]

import _common as c  # noqa: E402

from mailgate import Envelope, Message  # noqa: E402
from mailgate.smtp import SMTPClient, SMTPConfig  # noqa: E402


async def run(a: argparse.Namespace) -> tuple[dict[str, int], float, float]:
    cfg = SMTPConfig(
        a.host, a.port, security="none", helo_name=c.LOCAL_HOSTNAME, connect_timeout=10, protocol_timeout=10
    )
    counter = itertools.count()
    stats = {"sent": 0, "failed": 0}
    compose = a.mode == "compose"
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + a.max_seconds

    async def batched() -> None:
        async with SMTPClient(cfg) as smtp:
            while time.perf_counter() < deadline:
                numbers = [i for i in itertools.islice(counter, a.batch) if i < a.count]
                if not numbers:
                    return
                items = []
                for i in numbers:
                    if compose:
                        m = Message(from_=c.SENDER, to=c.rcpt(i), subject=f"bench message {i}", text=c.BODY)
                        items.append((m.envelope(), m.compose()))
                    else:
                        items.append((Envelope(c.SENDER, (c.rcpt(i),)), c.raw(i)))
                for delivery in await smtp.send_many(items):
                    if isinstance(delivery, Exception) or not delivery.all_accepted:
                        stats["failed"] += 1
                        print(f"send failed: {delivery}", file=sys.stderr)
                    else:
                        stats["sent"] += 1
                if stats["failed"] > 10:
                    return

    async def worker() -> None:
        if a.batch > 1:
            return await batched()
        async with SMTPClient(cfg) as smtp:
            while (i := next(counter)) < a.count and time.perf_counter() < deadline:
                if compose:
                    m = Message(from_=c.SENDER, to=c.rcpt(i), subject=f"bench message {i}", text=c.BODY)
                    delivery = await smtp.send(m.envelope(), m.compose())
                else:
                    delivery = await smtp.send(Envelope(c.SENDER, (c.rcpt(i),)), c.raw(i))
                if delivery.all_accepted:
                    stats["sent"] += 1
                else:
                    stats["failed"] += 1
                    print(f"send {i} failed: {delivery.results}", file=sys.stderr)
                    if stats["failed"] > 10:
                        return

    await asyncio.gather(*(worker() for _ in range(a.conns)))
    return stats, time.perf_counter() - t0, time.process_time() - cpu0


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="messages per SMTPClient.send_many (1: send)")
    a = p.parse_args()
    c.check_args(a)
    if not (1 <= a.conns <= 100):
        sys.exit("--conns must be in 1..100")
    stats, elapsed, cpu = asyncio.run(run(a))
    return int(c.report("mailgate", a.mode, a.count, stats["sent"], stats["failed"], elapsed, cpu, conns=a.conns))


if __name__ == "__main__":
    sys.exit(main())
