"""Security review: one tenant's slow receivers may not hold every place of the webhook sender."""

from __future__ import annotations

import asyncio
import time

from fakes.receiver import Reply, WebhookReceiver
from mailgate import Mailgate, Message
from mailgate.webhooks import CONCURRENCY, MAX_WEBHOOKS
from smtp_servers import ServerConfig, serve
from test_webhooks import _close_senders, doc, mg, sender_of, wait_for

FIXTURES = (mg, _close_senders)  # test_webhooks.py's, found by pytest under these names here


async def test_two_tenants_slow_receivers_do_not_hold_every_place(mg: Mailgate) -> None:
    assert 2 * MAX_WEBHOOKS >= CONCURRENCY  # else two tenants could not fill the places anyway
    await mg.tenants.add("initech")
    slow_replies = [Reply(200, delay=3.0) for _ in range(2 * MAX_WEBHOOKS)]
    with WebhookReceiver(replies=slow_replies) as slow, WebhookReceiver() as fast:
        for tenant in ("acme", "globex"):
            for _ in range(MAX_WEBHOOKS):
                await mg.webhooks.create(tenant, slow.hook_url)
        await mg.webhooks.create("initech", fast.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            for tenant in ("acme", "globex", "initech"):  # initech's event last: its delivery ids are the highest
                await mg.submit(tenant, Message(to="a@example.org", subject="s", text="t"))
                await mg.run_worker(until_idle=True)
        hooks = sender_of(mg, timeout=2.0)
        started = time.monotonic()
        await hooks.deliver_due(wait=False)
        await hooks.deliver_due(wait=False)  # the next turn of the loop
        try:
            await wait_for(lambda: fast.deliveries, timeout=1.5)
            fast_after = time.monotonic() - started
        finally:
            await asyncio.gather(*hooks._tasks)
    assert fast_after < 1.5  # not behind the slow receivers' 2 s timeouts
