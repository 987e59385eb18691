"""Tenants' webhooks end to end: made through the API (the secret shown once), a message delivered
by the worker to a real aiosmtpd peer, its event POSTed to a real receiver on 127.0.0.1 that checks
the signature with the `standardwebhooks` package; retries with backoff and the last response kept
(cleaned); 410 switches a webhook off; the tenant destination policy at save and at delivery; a
slow receiver delays only its own webhook; secret rotation; the secret in no reply after creation
nor in any log. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook

from conftest import TEST_KEY
from fakes.receiver import Reply, WebhookReceiver
from mailgate import Mailgate, Message
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.db.models import AuditEntry, EventRow, WebhookDelivery, WebhookRow, now
from mailgate.errors import InvalidInput
from mailgate.webhooks import VerificationError, WebhookSender, backoff, excerpt, verify
from smtp_servers import ServerConfig, serve

FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, lease=30, tenant_networks="loopback")


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="tester", config=FAST) as opened:
        await opened.tenants.add("acme")
        await opened.tenants.add("globex")
        yield opened


def doc(server: Any) -> dict[str, Any]:
    return {"from_address": "no-reply@example.com", "smtp": {"host": server.host, "port": server.port,
            "security": "none"}, "connection": {"connect_timeout": 5, "protocol_timeout": 2}}  # fmt: skip


_SENDERS: list[WebhookSender] = []


@pytest.fixture(autouse=True)
async def _close_senders() -> AsyncIterator[None]:
    yield
    while _SENDERS:
        await _SENDERS.pop().aclose()  # their HTTP clients' connections


def sender_of(mg: Mailgate, **kw: Any) -> WebhookSender:
    """A webhook sender as a worker runs it, with its bounds changed by `kw` (retry_base, timeout)."""
    hooks = WebhookSender(mg.db, mg._keyring, mg.config.destinations.tenant)
    for name, value in kw.items():
        setattr(hooks, name, value)
    _SENDERS.append(hooks)
    return hooks


async def deliveries(mg: Mailgate) -> list[WebhookDelivery]:
    async with mg.db.sessions() as s:
        return list((await s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))).all())


async def due_now(mg: Mailgate) -> None:
    async with mg.db.write() as s:
        await s.execute(update(WebhookDelivery).where(WebhookDelivery.status == "pending").values(next_at=now()))


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_sent_message_reaches_the_tenants_webhook_signed(mg: Mailgate, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    admin, _ = await mg.api_tokens.create("tenant-admin", "acme")
    sender, _ = await mg.api_tokens.create("sender", "acme")
    transport = httpx2.ASGITransport(app=create_app(mg))
    with WebhookReceiver() as receiver:
        async with serve(ServerConfig()) as smtp, httpx2.AsyncClient(
            transport=transport, base_url="http://mailgate.test"
        ) as client:  # fmt: skip
            await mg.servers.set("global", doc(smtp))
            auth = {"Authorization": f"Bearer {admin}"}
            made = await client.post("/v1/tenants/acme/webhooks", headers=auth,
                                     json={"url": receiver.hook_url, "event_types": ["message.sent"]})  # fmt: skip
            assert made.status_code == 201, made.text
            secret = made.json()["secret"]
            assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
            receiver.secret = secret
            # A sender token may not manage webhooks.
            refused = await client.get("/v1/tenants/acme/webhooks", headers={"Authorization": f"Bearer {sender}"})
            assert refused.status_code == 403
            sent = await client.post("/v1/messages", headers={"Authorization": f"Bearer {sender}"},
                                     json={"to": ["alice@example.org"], "subject": "Hi", "text": "Hello"})  # fmt: skip
            pk = sent.json()["id"]
            stop = asyncio.Event()
            worker = asyncio.create_task(mg.new_worker().run(stop))  # the worker runs the webhook sender too
            try:
                await smtp.wait_for_messages(1)
                await wait_for(lambda: receiver.deliveries)
            finally:
                stop.set()
                await worker
            shown = (await client.get(f"/v1/tenants/acme/webhooks/{made.json()['id']}", headers=auth)).json()
            listed = (await client.get("/v1/tenants/acme/webhooks", headers=auth)).text
    got = receiver.deliveries[0]
    assert got.verified and got.status == 204
    event_id = (await mg.events.list("acme"))[0].id
    assert got.headers["webhook-id"] == f"evt_{event_id}"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
    body = json.loads(got.body)
    assert body["type"] == "message.sent" and body["data"]["message"] == {"id": pk}
    assert set(body) == {"type", "timestamp", "data"}
    # Our own helper agrees with the reference library.
    assert verify(secret, got.headers, got.body)["type"] == "message.sent"
    assert shown["last_delivery"]["status"] == "delivered" and shown["last_delivery"]["last_code"] == 204
    assert shown["deliveries"][0]["type"] == "message.sent" and shown["pending_deliveries"] == 0
    # The secret: in the reply that made it, and nowhere after — nor in any log or the audit log.
    assert shown["secret"] == {"set": True}
    assert secret not in json.dumps(shown) and secret not in listed and secret[6:] not in caplog.text
    async with mg.db.sessions() as s:
        stored = await s.scalar(select(WebhookRow.secret))
        audit = [a.changes for a in await s.scalars(select(AuditEntry).where(AuditEntry.action.like("webhook.%")))]
    assert stored is not None and secret[6:] not in stored and secret[6:] not in str(audit)


async def test_a_failing_receiver_is_retried_with_backoff_and_its_last_response_kept(mg: Mailgate) -> None:
    replies = [Reply(500, b"\x1b[31mboom\x1b[0m\r\nsecond line" + b"x" * 5000),
               Reply(503, b"busy", [("Retry-After", "120")]), Reply(200, b"ok")]  # fmt: skip
    with WebhookReceiver(replies=replies) as receiver:
        secret, hook = await mg.webhooks.create("acme", receiver.hook_url, ["message.sent"])
        receiver.secret = secret
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        hooks = sender_of(mg, retry_base=2.0)
        assert await hooks.deliver_due() == 1
        [first] = await deliveries(mg)
        assert first.status == "pending" and first.attempts == 1 and first.last_code == 500
        # Cleaned for the admin UI: control characters gone, line breaks one space, bounded.
        assert first.last_response is not None and first.last_response.startswith("[31mboom [0m second line")
        assert "\x1b" not in first.last_response and len(first.last_response) == 300
        assert first.next_at is not None and first.last_at is not None
        assert 1.5 <= (first.next_at - first.last_at).total_seconds() <= 2.5  # the base, ±25 %
        assert await hooks.deliver_due() == 0  # not due yet
        await due_now(mg)
        await hooks.deliver_due()
        [second] = await deliveries(mg)
        assert second.attempts == 2 and second.last_code == 503 and second.last_response == "busy"
        assert second.next_at is not None and second.last_at is not None
        assert (second.next_at - second.last_at).total_seconds() >= 119  # Retry-After honoured
        await due_now(mg)
        await hooks.deliver_due()
        info = await mg.webhooks.get("acme", hook.id)
    [third] = await deliveries(mg)
    assert third.status == "delivered" and third.attempts == 3 and third.last_code == 200 and third.next_at is None
    assert [d.status for d in receiver.deliveries] == [500, 503, 200]
    # The same webhook-id every time: the receiver's idempotency key.
    assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 1
    assert all(d.verified for d in receiver.deliveries)
    assert info.last is not None and info.last["status"] == "delivered"


def test_backoff_doubles_with_jitter_up_to_its_maximum() -> None:
    import random

    rng = random.Random(7)
    for attempts, base in [(1, 5.0), (2, 10.0), (5, 80.0)]:
        delays = [backoff(attempts, rng) for _ in range(200)]
        assert base * 0.75 <= min(delays) < max(delays) <= base * 1.25
    assert backoff(40, rng) <= 6 * 3600 * 1.25
    assert backoff(1, rng, retry_after=600) >= 600


async def test_a_delivery_is_given_up_after_the_maximum_age(mg: Mailgate) -> None:
    with WebhookReceiver(replies=[Reply(500)]) as receiver:
        await mg.webhooks.create("acme", receiver.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        await sender_of(mg).deliver_due()
        async with mg.db.write() as s:
            await s.execute(update(EventRow).values(created_at=now() - timedelta(days=3, minutes=1)))
        await due_now(mg)
        await sender_of(mg).deliver_due()
    [d] = await deliveries(mg)
    assert (
        d.status == "failed"
        and d.attempts == 2
        and d.last_response == "gave up: not delivered within 3 days of the event"
    )
    assert len(receiver.deliveries) == 1


async def test_410_gone_switches_the_webhook_off(mg: Mailgate) -> None:
    with WebhookReceiver(replies=[Reply(410, b"gone")]) as receiver:
        await mg.webhooks.create("acme", receiver.hook_url, ["message.sent", "message.failed"])
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
            await sender_of(mg).deliver_due()
            await mg.submit("acme", Message(to="b@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        [info] = await mg.webhooks.list("acme")
    assert not info.enabled and info.disabled_reason == "the receiver answered 410 Gone"
    assert [d.status for d in await deliveries(mg)] == ["failed"]  # the second event made no delivery
    assert len(receiver.deliveries) == 1


async def test_only_the_subscribed_types_of_the_tenants_own_events_are_delivered(mg: Mailgate) -> None:
    with WebhookReceiver() as receiver:
        await mg.webhooks.create("acme", receiver.hook_url, ["message.failed"])
        await mg.webhooks.create("globex", receiver.hook_url, ["message.sent"])
        cfg = ServerConfig(rcpt_reply=lambda a, i: "550 5.1.1 User unknown" if a.startswith("nobody") else None)
        async with serve(cfg) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.submit("acme", Message(to="nobody@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        await sender_of(mg).deliver_due()
    assert [e["type"] for e in receiver.events()] == ["message.failed"]


# ---- the destination policy ----------------------------------------------------------------------


async def test_a_webhook_to_the_operators_network_is_refused_under_the_default_policy(database_url: str) -> None:
    strict = Config(tenant_networks="")  # the default: tenants reach public addresses only
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, config=strict) as mg:
        await mg.tenants.add("acme")
        for url in ["https://127.0.0.1/hook", "https://10.1.2.3/hook", "https://169.254.169.254/latest",
                    "https://localhost:8443/hook", "http://127.0.0.1:9/hook", "https://[::1]/hook"]:  # fmt: skip
            with pytest.raises(InvalidInput) as refused:
                await mg.webhooks.create("acme", url)
            assert [field for field, _ in refused.value.problems] == ["url"], url
        for url in ["http://example.com/hook", "ftp://example.com/x", "https://user:pw@example.com/h",
                    "https://example.com/h#x", "https://exa mple.com/"]:  # fmt: skip
            with pytest.raises(InvalidInput) as refused:
                await mg.webhooks.create("acme", url)
            assert refused.value.problems[0][0] == "url", url
        assert await mg.webhooks.list("acme") == []


async def test_the_policy_is_checked_again_at_each_delivery(mg: Mailgate, database_url: str) -> None:
    """A webhook saved while loopback was allowed (or a name that resolves elsewhere later) is
    refused when the delivery connects: nothing reaches the receiver, and the reason is kept."""
    with WebhookReceiver() as receiver:
        # https: the URL's form passes under either policy; only the connection's check refuses it.
        await mg.webhooks.create("acme", receiver.hook_url.replace("http://127.0.0.1", "https://localhost"))
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        strict = Config(tenant_networks="")
        async with Mailgate.open(database_url, secret_keys=TEST_KEY, config=strict) as other:
            await sender_of(other, policy=strict.destinations.tenant).deliver_due()
    [d] = await deliveries(mg)
    assert receiver.deliveries == []
    assert d.status == "pending" and d.last_code is None and d.last_response is not None
    assert d.last_response.startswith("not sent: ") and "loopback" in d.last_response


async def test_a_redirect_is_not_followed(mg: Mailgate) -> None:
    with WebhookReceiver() as target, WebhookReceiver(replies=[Reply(307, b"", [("Location", "")])]) as hop:
        hop.replies[0].headers[0] = ("Location", target.hook_url)
        await mg.webhooks.create("acme", hop.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        await sender_of(mg).deliver_due()
    [d] = await deliveries(mg)
    assert target.deliveries == [] and d.status == "pending" and d.last_code == 307


# ---- one tenant's slow receiver, secrets -----------------------------------------------------------


async def test_a_slow_receiver_delays_only_its_own_webhook(mg: Mailgate) -> None:
    with WebhookReceiver(replies=[Reply(200, delay=3.0)]) as slow, WebhookReceiver() as fast:
        await mg.webhooks.create("acme", slow.hook_url)
        await mg.webhooks.create("globex", fast.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.submit("globex", Message(to="b@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        hooks = sender_of(mg, timeout=1.0)
        started = time.monotonic()
        assert await hooks.deliver_due(wait=False) == 2
        await wait_for(lambda: fast.deliveries, timeout=5)
        fast_after = time.monotonic() - started
        await asyncio.gather(*hooks._tasks)
    assert fast_after < 0.9  # not behind the slow one's timeout
    by_webhook = {d.webhook_id: d for d in await deliveries(mg)}
    slow_one, fast_one = sorted(by_webhook.values(), key=lambda d: d.webhook_id)
    assert fast_one.status == "delivered"
    assert slow_one.status == "pending" and slow_one.last_response == "no response within 1 s"


async def test_a_rotated_secret_signs_beside_the_old_one_for_a_day(mg: Mailgate) -> None:
    with WebhookReceiver() as receiver:
        old, hook = await mg.webhooks.create("acme", receiver.hook_url)
        new, info = await mg.webhooks.rotate("acme", hook.id)
        assert new != old and info.previous_secret_until is not None
        assert timedelta(hours=23) < info.previous_secret_until - datetime.now(UTC) <= timedelta(hours=24)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        await sender_of(mg).deliver_due()
    got = receiver.deliveries[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver with either secret accepts it
        Webhook(secret).verify(got.body, got.headers)


def test_verify_accepts_what_the_reference_library_signs_and_nothing_else() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"type":"message.sent","timestamp":"2026-12-04T18:00:00Z","data":{"message":{"id":1}}}'
    stamp = datetime.now(UTC)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(int(stamp.timestamp())),
               "webhook-signature": Webhook(secret).sign("evt_1", stamp, body)}  # fmt: skip
    assert verify(secret, headers, body)["data"]["message"]["id"] == 1
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    for bad_secret, bad_headers, bad_body in [
        (other, headers, body),
        (secret, headers, body.replace(b"1}", b"2}")),
        (secret, {**headers, "webhook-id": "evt_2"}, body),
        (secret, {**headers, "webhook-timestamp": str(int(stamp.timestamp()) - 600)}, body),
        (secret, {k: v for k, v in headers.items() if k != "webhook-signature"}, body),
    ]:
        with pytest.raises(VerificationError):
            verify(bad_secret, bad_headers, bad_body)


def test_a_response_excerpt_is_one_bounded_line() -> None:
    assert excerpt(b"a\r\nb\tc\x00d\xe2\x80\xa8e\xff") == "a b c d e\ufffd"
    assert len(excerpt(b"y" * 10_000)) == 300


async def test_webhook_routes_per_role(mg: Mailgate) -> None:
    admin, _ = await mg.api_tokens.create("system-admin")
    other_admin, _ = await mg.api_tokens.create("tenant-admin", "globex")
    mine, _ = await mg.api_tokens.create("tenant-admin", "acme")
    transport = httpx2.ASGITransport(app=create_app(mg))
    async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:

        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        made = await client.post("/v1/tenants/acme/webhooks", headers=auth(mine),
                                 json={"url": "https://127.0.0.1:9/hook"})  # fmt: skip
        assert made.status_code == 201 and made.json()["event_types"][0] == "message.sent"
        hook = made.json()["id"]
        theirs = await client.get(f"/v1/tenants/acme/webhooks/{hook}", headers=auth(other_admin))
        assert theirs.status_code == 404
        bad = await client.post("/v1/tenants/acme/webhooks", headers=auth(mine),
                                json={"url": "https://127.0.0.1/h", "event_types": ["message.opened"]})  # fmt: skip
        assert bad.status_code == 422 and bad.json()["problems"][0]["field"] == "event_types"
        off = await client.patch(f"/v1/tenants/acme/webhooks/{hook}", headers=auth(admin), json={"enabled": False})
        assert off.json()["enabled"] is False
        rotated = await client.post(f"/v1/tenants/acme/webhooks/{hook}/rotate", headers=auth(mine))
        assert rotated.json()["secret"].startswith("whsec_") and rotated.json()["secret"] != made.json()["secret"]
        assert (await client.delete(f"/v1/tenants/acme/webhooks/{hook}", headers=auth(mine))).status_code == 204
        assert (await client.get(f"/v1/tenants/acme/webhooks/{hook}", headers=auth(mine))).status_code == 404


async def test_keys_rotate_re_encrypts_the_signing_secrets(mg: Mailgate, database_url: str) -> None:
    from cryptography.fernet import Fernet

    new_key = Fernet.generate_key().decode()
    with WebhookReceiver() as receiver:
        receiver.secret, _ = await mg.webhooks.create("acme", receiver.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        async with Mailgate.open(database_url, secret_keys=f"{new_key},{TEST_KEY}", config=FAST) as both:
            assert await both.rotate_keys() == 1
        async with Mailgate.open(database_url, secret_keys=new_key, config=FAST) as only_new:
            await sender_of(only_new).deliver_due()
    assert [d.verified for d in receiver.deliveries] == [True]


def test_mailgate_serve_posts_the_event_of_a_message_it_delivered(tmp_path: Any) -> None:
    """As an operator runs it: `mailgate serve` (a real process), a third-party HTTP client making
    the webhook and submitting, a real SMTP peer, and the receiver checking the signature."""
    from smtp_servers import serve_in_thread
    from test_serve import Served

    env = {**{k: v for k, v in os.environ.items() if k not in ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")},
           "MAILGATE_SECRET_KEYS": TEST_KEY, "MAILGATE_POLL_INTERVAL": "0.1"}  # fmt: skip
    # The process runs this checkout's mailgate, whichever the entry point was installed from.
    import mailgate

    env["PYTHONPATH"] = os.pathsep.join([str(Path(mailgate.__file__).parents[1]), env.get("PYTHONPATH", "")])
    served = Served(tmp_path, env, [])
    try:
        admin = served.cli("tokens", "create", "--role", "system-admin").strip()
        with serve_in_thread() as smtp, WebhookReceiver() as receiver:
            with httpx2.Client(base_url=served.url, headers={"Authorization": f"Bearer {admin}"}, timeout=10) as http:
                assert http.post("/v1/tenants", json={"id": "acme"}).status_code == 201
                server = {"from_address": "no-reply@example.com",
                          "smtp": {"host": smtp.host, "port": smtp.port, "security": "none"}}  # fmt: skip
                assert http.put("/v1/servers/global", json=server).status_code == 200
                made = http.post("/v1/tenants/acme/webhooks", json={"url": receiver.hook_url})
                assert made.status_code == 201, made.text
                receiver.secret = secret = made.json()["secret"]
                reply = http.post("/v1/messages", json={"tenant": "acme", "to": ["bob@example.org"],
                                                        "subject": "Welcome", "text": "hi"})  # fmt: skip
                assert reply.status_code == 202, reply.text
                assert receiver.got.wait(30), served.output()
                events = http.get("/v1/events", params={"tenant": "acme"}).json()["events"]
        assert served.stop() == 0
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
    [got] = receiver.deliveries
    assert got.verified and got.event is not None and got.event["type"] == "message.sent"
    assert got.event["data"]["message"]["id"] == reply.json()["id"]
    assert got.headers["webhook-id"] == f"evt_{events[0]['id']}"
    assert secret[6:] not in served.output()  # never logged


async def test_the_readme_receiver_takes_a_real_delivery_and_refuses_a_forged_one(mg: Mailgate) -> None:
    """README's receiver example, as written there, given what mailgate really sent."""
    seen: list[Any] = []
    with WebhookReceiver() as receiver:
        SECRET, _ = await mg.webhooks.create("acme", receiver.hook_url)  # as the README names it
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
            await mg.run_worker(until_idle=True)
        await sender_of(mg).deliver_due()

    app = FastAPI()

    @app.post("/hooks/mailgate")
    async def mailgate_events(request: Request) -> Response:
        try:
            event = verify(SECRET, request.headers, await request.body())  # the whsec_… shown at creation
        except VerificationError:
            return Response(status_code=401)
        seen.append((event["type"], event["data"]))  # README: print(event["type"], event["data"])
        return Response(status_code=204)

    [got] = receiver.deliveries
    headers = {k: v for k, v in got.headers.items() if k.startswith("webhook-") or k == "content-type"}
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://app.test") as client:
        assert (await client.post("/hooks/mailgate", content=got.body, headers=headers)).status_code == 204
        forged = got.body.replace(b'"sent"', b'"failed"')
        assert (await client.post("/hooks/mailgate", content=forged, headers=headers)).status_code == 401
    assert seen == [("message.sent", json.loads(got.body)["data"])]


async def test_a_claim_takes_a_few_deliveries_of_as_many_webhooks_as_there_are_free_slots(
    mg: Mailgate, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailgate.webhooks

    monkeypatch.setattr(mailgate.webhooks, "CONCURRENCY", 1)
    with WebhookReceiver() as one, WebhookReceiver() as two:
        await mg.webhooks.create("acme", one.hook_url)
        await mg.webhooks.create("acme", two.hook_url)
        async with serve(ServerConfig()) as smtp:
            await mg.servers.set("global", doc(smtp))
            await mg.submit_many("acme", [Message(to="a@example.org", subject="s", text="t")] * 6)
            await mg.run_worker(until_idle=True)
        hooks = sender_of(mg)
        # 12 deliveries due: one webhook (one slot), four of its six (PER_WEBHOOK); the rest given back, due now.
        assert await hooks.deliver_due() == 4
        assert len(one.deliveries) + len(two.deliveries) == 4
        assert sum(d.next_at is not None and d.next_at <= now() for d in await deliveries(mg)) == 8
        for _ in range(3):  # one webhook a round: 2 + 4 + 2 more
            await hooks.deliver_due()
    assert len(one.deliveries) == len(two.deliveries) == 6
