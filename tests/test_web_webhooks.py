"""The admin UI's webhooks page in process (ASGI), on its HTML: who may open which tenant's, adding
one shows the secret on that page only, the URL's problem next to its field, a receiver's last
response shown escaped, switching off, a new secret and removal after asking, CSRF on every form."""

# ruff: noqa: F811 - the fixtures (ui) are imported from the module beside, and named as parameters
from __future__ import annotations

import re

import pytest
from sqlalchemy import update

from mailgate.db.models import WebhookDelivery
from mailgate.events import record_server_event
from test_web import ACME, ADMIN, GLOBEX, UI, text_of, ui  # noqa: F401 - ui is a fixture

PAGE = "/admin/tenants/acme/webhooks"
SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")


async def test_a_tenant_admin_adds_a_webhook_and_sees_the_secret_once(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    listing = await acme.get(PAGE)
    assert listing.status_code == 200 and "No webhooks yet." in listing.text
    added = await acme.post(PAGE, {"url": "https://127.0.0.1:9/hook", "type:message.failed": "1",
                                   "type:server.broken": "1"})  # fmt: skip
    assert added.status_code == 200 and added.headers["cache-control"] == "no-store"
    found = SECRET.search(added.text)
    assert found is not None and "shows it this once" in text_of(added)
    [hook] = await ui.mg.webhooks.list("acme")
    assert hook.event_types == ["message.failed", "server.broken"]
    again = await acme.get(PAGE)
    assert "https://127.0.0.1:9/hook" in again.text and SECRET.search(again.text) is None


async def test_a_refused_url_is_shown_next_to_its_field(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    await acme.get(PAGE)
    reply = await acme.post(PAGE, {"url": "http://example.com/hook"})
    assert reply.status_code == 422
    assert re.search(r'<p class="problem" id="w-url-error">uses https', reply.text)
    assert 'value="http://example.com/hook"' in reply.text
    assert await ui.mg.webhooks.list("acme") == []


async def test_another_tenants_webhooks_are_not_there(ui: UI) -> None:
    await ui.mg.webhooks.create("globex", "https://127.0.0.1:9/globex-hook")
    acme = await ui.signed_in(ACME)
    await acme.get(PAGE)
    assert (await acme.get("/admin/tenants/globex/webhooks")).status_code == 404
    assert (await acme.post("/admin/tenants/globex/webhooks", {"url": "https://127.0.0.1:9/x"})).status_code == 404
    [theirs] = await ui.mg.webhooks.list("globex")
    for action in ("delete", "disable", "rotate"):
        assert (await acme.post(f"/admin/tenants/globex/webhooks/{theirs.id}/{action}")).status_code == 404
        # Nor through acme's own page with globex's webhook id.
        assert (await acme.post(f"{PAGE}/{theirs.id}/{action}")).status_code == 404
    assert (await ui.mg.webhooks.get("globex", theirs.id)).enabled
    admin = await ui.signed_in(ADMIN)
    assert "globex-hook" in (await admin.get("/admin/tenants/globex/webhooks")).text


async def test_the_last_response_and_state_are_shown_escaped(ui: UI) -> None:
    _, hook = await ui.mg.webhooks.create("acme", "https://127.0.0.1:9/hook", ["server.broken"])
    async with ui.mg.db.write() as s:
        await record_server_event(s, "server.broken", "acme", "smtp", "535 5.7.8 refused")
    async with ui.mg.db.write() as s:
        await s.execute(update(WebhookDelivery).values(attempts=2, last_code=500,
                                                       last_response="<script>alert(1)</script> busy"))  # fmt: skip
    acme = await ui.signed_in(ACME)
    page = (await acme.get(PAGE)).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; busy" in page
    assert re.search(rf'<tr data-webhook="{hook.id}">.*?HTTP 500', page, re.S)
    assert re.search(r'<tr data-delivery="\d+">.*?server.broken.*?pending.*?<td>2</td>.*?HTTP 500', page, re.S)


async def test_switch_off_new_secret_and_remove(ui: UI) -> None:
    first, hook = await ui.mg.webhooks.create("acme", "https://127.0.0.1:9/hook")
    acme = await ui.signed_in(ACME)
    await acme.get(PAGE)
    assert (await acme.post(f"{PAGE}/{hook.id}/disable")).status_code == 303
    assert not (await ui.mg.webhooks.get("acme", hook.id)).enabled
    assert "Make a new secret" in (await acme.get(f"{PAGE}/{hook.id}/confirm/rotate")).text
    rotated = await acme.post(f"{PAGE}/{hook.id}/rotate")
    found = SECRET.search(rotated.text)
    assert found is not None and found.group() != first and rotated.headers["cache-control"] == "no-store"
    assert "Remove the webhook" in (await acme.get(f"{PAGE}/{hook.id}/confirm/delete")).text
    assert (await acme.post(f"{PAGE}/{hook.id}/delete")).status_code == 303
    assert await ui.mg.webhooks.list("acme") == []


@pytest.mark.parametrize("action", ["", "/{id}/delete", "/{id}/disable", "/{id}/rotate"])
async def test_a_webhook_form_without_the_csrf_token_changes_nothing(ui: UI, action: str) -> None:
    _, hook = await ui.mg.webhooks.create("acme", "https://127.0.0.1:9/hook")
    before = await ui.mg.audit_log(limit=1000)
    acme = await ui.signed_in(ACME)
    await acme.get(PAGE)
    for token in (None, "forged-token"):
        data = {"url": "https://127.0.0.1:9/other"} | ({"csrf_token": token} if token else {})
        reply = await acme.post(PAGE + action.format(id=hook.id), data, csrf=False)
        assert reply.status_code == 403 and "did not come from this page" in text_of(reply)
    assert await ui.mg.audit_log(limit=1000) == before
