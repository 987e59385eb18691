#!/usr/bin/env python3
"""CPU cost of rendering a notification template for one message, once the template is cached.

What `mg.templates.render` does per message after the first: check the data against the declared
variables, pick the text (overrides looked up at most once a second per tenant and template, here
from that cache), and render subject, text and HTML from the compiled templates in the sandbox.
Measured with time.process_time() over --count renders, repeated --repeat times; best and median
per render are printed, and one JSON line for scripts. The goal (issue 19): at most 1 ms.

  python bench/templates.py [--count 5000] [--repeat 7]

Rows:
- invitation (en): the built-in invitation, 5 string variables.
- subscription_update (nl): the built-in with a 3-item list looped over in text and HTML.
- invitation, tenant override: a tenant's own subject/text/HTML, through the service (a SQLite
  database in memory; the override lookup is cached as for a busy tenant).
- render + compose: the invitation rendered, then built and composed into MIME (Message.compose).
- css-inline on the rendered HTML (only if `css_inline` imports): what inlining each message's
  HTML would add, had we inlined per message instead of writing the built-ins' styles inline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailgate import Mailgate, Message
from mailgate.notifications import KINDS
from mailgate.notifications.store import render_built_in

INVITATION = {
    "recipient_name": "Alex Janssen",
    "inviter_name": "Ada Lovelace",
    "organization": "Acme Corp",
    "accept_url": "https://app.example.com/invitations/accept?token=4f9a2c",
    "expires_at": "12 March 2027",
}


def per_call(work: Callable[[], object], count: int, repeat: int) -> tuple[float, float]:
    work()  # compile and cache
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(count):
            work()
        runs.append((time.process_time() - start) / count * 1e6)
    return min(runs), statistics.median(runs)


async def service_render(count: int, repeat: int) -> tuple[float, float]:
    async with Mailgate.open("sqlite+aiosqlite://", actor="bench") as mg:
        await mg.tenants.add("acme")
        await mg.templates.save(
            "invitation",
            "en",
            "acme",
            subject="Acme: {{ inviter_name }} invites you",
            text=KINDS["invitation"].texts["en"].text,
            html=KINDS["invitation"].texts["en"].html.replace("#0b5cad", "#c0392b"),
        )
        await mg.templates.render("invitation", "en", "acme", INVITATION)
        runs = []
        for _ in range(repeat):
            start = time.process_time()
            for _ in range(count):
                await mg.templates.render("invitation", "en", "acme", INVITATION)
            runs.append((time.process_time() - start) / count * 1e6)
        return min(runs), statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    sub = KINDS["subscription_update"].sample_data

    def compose() -> bytes:
        r = render_built_in("invitation", "en", INVITATION)
        return Message(
            from_="no-reply@example.com", to="alex@example.org", subject=r.subject, text=r.text, html=r.html
        ).compose()

    rows: dict[str, tuple[float, float]] = {
        "invitation (en)": per_call(lambda: render_built_in("invitation", "en", INVITATION), args.count, args.repeat),
        "subscription_update (nl)": per_call(
            lambda: render_built_in("subscription_update", "nl", sub), args.count, args.repeat
        ),
        "invitation, tenant override": asyncio.run(service_render(args.count, args.repeat)),
        "render + compose": per_call(compose, args.count, args.repeat),
    }
    try:
        import css_inline  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        html = render_built_in("invitation", "en", INVITATION).html
        inliner = css_inline.CSSInliner(keep_style_tags=True)
        rows["css-inline of the rendered HTML"] = per_call(lambda: inliner.inline(html), args.count, args.repeat)
    for name, (best, median) in rows.items():
        print(f"{name:<34} best {best:8.1f} µs   median {median:8.1f} µs")
    print(json.dumps({name: {"best_us": round(b, 1), "median_us": round(m, 1)} for name, (b, m) in rows.items()}))


if __name__ == "__main__":
    main()
