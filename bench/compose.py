#!/usr/bin/env python3
"""CPU cost of building one notification message: mailgate's composer vs the stdlib.

The message: 1 KB of text plus the same as HTML, a display-named sender, one recipient, a subject
(multipart/alternative). Measured with time.process_time() over --count messages, repeated
--repeat times; the best and median per-message costs are printed, and one JSON line for scripts.

  python bench/compose.py [--count 20000] [--repeat 7]

Rows:
- mailgate compose: `Message.compose()` of a message already built (the composer alone).
- mailgate build + compose, same recipient: `Message(...)` then `compose()`; the address
  validation is cached, as for a sender or a frequent recipient.
- mailgate build + compose, new recipient each time: every recipient address validated afresh.
- stdlib EmailMessage: the same message with `set_content` + `add_alternative`, then `as_bytes()`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailgate import Message

LINE = "The quick brown fox jumps over the lazy dog 0123456789 " * 3
TEXT = ((LINE[:76] + "\n") * 14)[:1000]
HTML = "<html><body><p>" + TEXT[:960].replace("\n", "<br>\n") + "</p></body></html>"
SENDER = "Example Notifications <no-reply@example.com>"


def mailgate_compose_only() -> Callable[[int], bytes]:
    m = Message(from_=SENDER, to="rcpt@example.com", subject="Your access review is due", text=TEXT, html=HTML)
    return lambda i: m.compose()


def mailgate_build(fresh_recipient: bool) -> Callable[[int], bytes]:
    def run(i: int) -> bytes:
        to = f"rcpt{i}@example.com" if fresh_recipient else "rcpt@example.com"
        return Message(from_=SENDER, to=to, subject=f"Your access review is due ({i})", text=TEXT, html=HTML).compose()

    return run


def stdlib(i: int) -> bytes:
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = f"rcpt{i}@example.com"
    m["Subject"] = f"Your access review is due ({i})"
    m["Date"] = formatdate(localtime=False)
    m["Message-ID"] = make_msgid(domain="example.com")
    m.set_content(TEXT)
    m.add_alternative(HTML, subtype="html")
    return m.as_bytes()


def measure(fn: Callable[[int], bytes], count: int, repeat: int) -> list[float]:
    fn(0)  # warm caches and imports
    per_msg = []
    for r in range(repeat):
        base = (r + 1) * count * 10  # new recipients in every round
        t0 = time.process_time()
        for i in range(base, base + count):
            fn(i)
        per_msg.append((time.process_time() - t0) / count * 1e6)
    return per_msg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    if not (1 <= a.count <= 1_000_000 and 1 <= a.repeat <= 50):
        sys.exit("--count must be in 1..1000000, --repeat in 1..50")
    size = len(mailgate_compose_only()(0))
    rows = [  # (label, function, share of --count): the stdlib row is 100 times slower
        ("mailgate compose (message already built)", mailgate_compose_only(), 1),
        ("mailgate build + compose, same recipient", mailgate_build(False), 1),
        ("mailgate build + compose, new recipient each time", mailgate_build(True), 1),
        ("stdlib EmailMessage build + as_bytes()", stdlib, 0.1),
    ]
    results = {}
    print(f"message: text {len(TEXT)} B + html {len(HTML)} B, composed {size} B")
    print(f"{a.count} messages x {a.repeat} rounds (the stdlib row: a tenth of the messages)")
    print("| what | best µs CPU/msg | median µs CPU/msg |")
    print("|---|---:|---:|")
    for label, fn, share in rows:
        per = measure(fn, max(1, int(a.count * share)), a.repeat)
        results[label] = {"best_us": round(min(per), 2), "median_us": round(statistics.median(per), 2)}
        print(f"| {label} | {min(per):.1f} | {statistics.median(per):.1f} |")
    print(json.dumps({"bench": "compose", "composed_bytes": size, "results": results}))


if __name__ == "__main__":
    main()
