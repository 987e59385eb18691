"""The admin UI's "Contact support" form and the global support address, in headless Chromium (the
`site` fixture and helpers of test_web_browser.py): a tenant admin sends a support request from the
form and it arrives at the support address with the system information attached."""

from __future__ import annotations

import json
import re

import pytest

from mailgate.message import Message
from smtp_servers import ServerConfig, serve
from test_web_browser import ACME, ADMIN, Site, browser, field, site, smtp_doc

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover - test_web_browser skips the module first
    pytest.skip("playwright is not installed", allow_module_level=True)

FIXTURES = (browser, site)  # test_web_browser.py's, found by pytest under these names here
pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]


async def test_a_tenant_admin_sends_a_support_request_from_the_form(site: Site) -> None:
    async with serve(ServerConfig()) as relay:
        await site.mg.servers.set("global", smtp_doc(relay.port))
        await site.mg.tenants.update("acme", support_address="help@acme.example", may_set_support_address=True)
        await site.mg.submit("acme", Message(to="alice@example.com", subject="Invitation", text="x"))
        page = site.page
        await site.sign_in(ACME)
        await page.get_by_role("link", name="Contact support…").click()
        await page.wait_for_url("**/admin/tenants/acme/support")
        await expect(page.get_by_role("heading", name="Contact support")).to_be_visible()
        await expect(page.locator("main")).to_contain_text("this tenant's support address, help@acme.example")
        await expect(field(page, "Reply to")).to_have_value(ACME)  # the signed-in admin
        await expect(page.get_by_label("Attach system information")).to_be_checked()
        preview = page.locator("#s-preview")
        await preview.locator("summary").click()
        shown = json.loads(await preview.locator("pre").text_content() or "")
        assert shown["tenant"]["id"] == "acme" and shown["queue"]["queued"] == 1

        await field(page, "Subject").fill("Invitations do not arrive")
        await field(page, "Message").fill("Since this morning nobody gets our invitations.")
        await site.shot("support")
        await page.get_by_role("button", name="Send to support").click()
        await page.wait_for_url(re.compile(r".*/admin/tenants/acme/support\?sent=\d+$"))
        sent = int(page.url.rsplit("=", 1)[1])
        await expect(page.get_by_role("status")).to_contain_text(f"Support request sent: message {sent}.")

        await site.mg.run_worker(until_idle=True)
        [received] = [m for m in await relay.wait_for_messages(2) if b"[mailgate support]" in m.content]
        assert received.rcpt_tos == ["help@acme.example"]
        message = received.parsed()
        assert message["Reply-To"] == ACME
        assert message["Subject"] == "[mailgate support] Acme Corp (acme): Invitations do not arrive"
        [part] = list(message.iter_attachments())
        assert (part.get_filename(), part.get_content_type()) == ("mailgate-system-info.json", "application/json")
        info = json.loads(part.get_content())
        assert info["tenant"] == {"id": "acme", "name": "Acme Corp", "may_use_own_server": True,
                                  "may_set_support_address": True}  # fmt: skip
        assert info["requested_by"] == f"user:{ACME} (tenant-admin of acme)"

    await page.get_by_role("link", name=f"message {sent}", exact=True).click()
    await expect(page.get_by_role("heading", name=f"Message {sent}")).to_contain_text("sent")


async def test_a_refused_request_names_the_field_and_keeps_what_was_typed(site: Site) -> None:
    await site.mg.system.update(support_address="ops@operator.example")
    page = site.page
    await site.sign_in(ACME)
    await site.open("/admin/tenants/acme/support")
    await expect(page.locator("main")).to_contain_text("the operator's support")
    await expect(page.locator("main")).not_to_contain_text("ops@operator.example")  # a system admin's to see
    await field(page, "Subject").fill("Help")
    await field(page, "Message").fill("Mail is stuck")
    await field(page, "Reply to").evaluate("e => { e.type = 'text'; }")  # past the browser's own check
    await field(page, "Reply to").fill("not an address")
    await page.get_by_label("Attach system information").uncheck()
    await page.get_by_role("button", name="Send to support").click()
    await expect(page.locator(".field.invalid")).to_contain_text("is not a valid address")
    await expect(field(page, "Message")).to_have_value("Mail is stuck")
    await expect(page.get_by_label("Attach system information")).not_to_be_checked()
    assert (await site.mg.queue.stats())["by_status"]["queued"] == 0


async def test_a_system_admin_sets_the_global_support_address_on_the_global_page(site: Site) -> None:
    page = site.page
    await site.sign_in(ADMIN)
    await field(page, "Global support address").fill("ops@operator.example")
    await page.get_by_role("button", name="Save support address").click()
    await expect(page.get_by_role("status")).to_contain_text("System settings saved.")
    await expect(field(page, "Global support address")).to_have_value("ops@operator.example")
    assert (await site.mg.system.get()).support_address == "ops@operator.example"
    assert (await site.mg.audit_log())[0].action == "system.update"
