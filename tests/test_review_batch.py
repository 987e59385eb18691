"""Security review: a batch of template items may not render to more than a request may carry.
A request is at most max_request_size bytes, but an item's data (64 K characters) renders to up to
3 × 512 K: 500 items of a template that repeats a variable were ~750 M characters in memory from
one request of ~32 MB."""

from __future__ import annotations

import httpx2

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.config import Config

LIMIT = 2 * 1024 * 1024  # the operator's max_request_size here


async def test_a_batch_renders_to_at_most_the_request_size(database_url: str) -> None:
    config = Config(max_request_size=LIMIT)
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="tester", config=config) as mg:
        await mg.tenants.add("acme")
        await mg.servers.set("global", {"from_address": "no-reply@example.com",
                                        "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"}})  # fmt: skip
        # The tenant's admin saves a template that prints a variable 120 times: 480 K characters.
        text = "{{ inviter_name }}\n" * 120 + "{{ organization }} {{ accept_url }} {{ expires_at }}"
        await mg.templates.save("invitation", "en", "acme", subject="Hi {{ organization }}", text=text, html="")
        sender, _ = await mg.api_tokens.create("sender", "acme")
        data = {**mg.templates.sample_data("invitation"), "inviter_name": "x" * 4000}
        items = [{"to": [f"r{i}@example.org"], "template": "invitation", "data": data} for i in range(20)]
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
            reply = await http.post("/v1/messages/batch", json={"messages": items},
                                    headers={"Authorization": f"Bearer {sender}"})  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert len(reply.content) < LIMIT
        results = reply.json()["results"]
        stored = [r for r in results if "id" in r]
        refused = [r["error"] for r in results if "error" in r]
        # 20 × 480 K = 9.6 M characters: only the first few fit in 2 MB, the rest are refused.
        assert 1 <= len(stored) <= LIMIT // (120 * 4000)
        assert len(stored) + len(refused) == 20 and refused
        assert {e["status"] for e in refused} == {413} and {e["code"] for e in refused} == {"batch_too_large"}
