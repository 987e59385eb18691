"""The webhooks page in a real headless Chromium (test_web_browser.py's site and browser): a tenant
admin goes from the tenant's page to its webhooks, adds one for a real receiver, copies the secret
shown once, and after a message is delivered sees the delivery and the receiver's answer. The
screenshot is docs/screenshots/webhooks.png."""

# ruff: noqa: F811 - the fixtures (browser and site) are imported from the module beside, and named as parameters
from __future__ import annotations

import pytest

from fakes.receiver import WebhookReceiver
from mailgate import Message
from mailgate.webhooks import WebhookSender
from smtp_servers import ServerConfig, serve
from test_web_browser import ACME, Site, browser, site, smtp_doc  # noqa: F401 - fixtures

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover - test_web_browser skips the module first
    pytest.skip("playwright is not installed", allow_module_level=True)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]


async def test_a_tenant_admin_adds_a_webhook_and_sees_its_deliveries(site: Site) -> None:
    page = site.page
    with WebhookReceiver() as receiver:
        await site.sign_in(ACME)
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Mail settings").click()
        await page.get_by_role("link", name="Webhooks").click()
        await expect(page.get_by_role("heading", level=1)).to_contain_text("Webhooks · Acme Corp")
        await page.get_by_label("URL").fill(receiver.hook_url)
        await page.get_by_label("message.sent").check()
        await page.get_by_label("message.failed").check()
        await page.get_by_role("button", name="Add webhook").click()
        await expect(page.get_by_role("status")).to_contain_text("shows it this once")
        secret = await page.get_by_label("Signing secret").input_value()
        assert secret.startswith("whsec_")
        receiver.secret = secret
        await page.get_by_role("link", name="Done").click()

        async with serve(ServerConfig()) as relay:
            await site.mg.servers.set("global", smtp_doc(relay.port))
            await site.mg.submit("acme", Message(to="a@acme.example", subject="Hello", text="hi"))
            await site.mg.run_worker(until_idle=True)
        hooks = WebhookSender(site.mg.db, site.mg._keyring, site.mg.config.destinations.tenant)
        try:
            await hooks.deliver_due()
        finally:
            await hooks.aclose()
        assert [d.verified for d in receiver.deliveries] == [True]

        await page.reload()
        row = page.locator("table.webhooks tbody tr")
        await expect(row).to_contain_text("delivered · HTTP 204")
        await expect(page.locator("table.deliveries tbody tr")).to_contain_text("message.sent")
        assert secret not in await page.content()
        await site.shot("webhooks")
