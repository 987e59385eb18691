"""The notification template editor in a real headless Chromium (test_web_browser.py's site and
browser): a tenant admin edits the Dutch invitation's subject, sees the live preview (the HTML in its
sandboxed frame, under the page's policy), saves, and sends a test that arrives with the new subject;
the editor on a phone-wide screen. The screenshot is docs/screenshots/template-editor.png."""

# ruff: noqa: F811 - the fixtures (browser and site) are imported from the module beside, and named as parameters
from __future__ import annotations

import pytest

from smtp_servers import ServerConfig, serve
from test_web_browser import ACME, PHONE, Site, browser, site, smtp_doc  # noqa: F401 - fixtures

try:
    from playwright.async_api import ConsoleMessage, expect
except ImportError:  # pragma: no cover - test_web_browser skips the module first
    pytest.skip("playwright is not installed", allow_module_level=True)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

NEW_SUBJECT = "{{ inviter_name }} vraagt je om bij {{ organization }} te komen"


def policy_violations(site: Site) -> list[str]:
    """Every message Chromium logs about a refused Content-Security-Policy, from now on."""
    found: list[str] = []

    def seen(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            found.append(message.text)

    site.page.on("console", seen)
    return found


async def test_a_tenant_admin_edits_previews_saves_and_tests_the_dutch_invitation(site: Site) -> None:
    async with serve(ServerConfig()) as relay:
        await site.mg.servers.set("global", smtp_doc(relay.port))
        page = site.page
        violations = policy_violations(site)
        await site.sign_in(ACME)
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Templates").click()
        await expect(page.get_by_role("heading", name="Notification templates")).to_be_visible()
        await page.get_by_role("link", name="Edit Invitation in nl").click()
        await expect(page.get_by_role("heading", name="Invitation")).to_contain_text("nl")
        await expect(page.locator("#source")).to_contain_text("Now the built-in text")

        # Typing updates the preview (htmx, after a pause): the subject and the HTML in its frame.
        await page.get_by_label("Subject").fill(NEW_SUBJECT)
        await expect(page.locator(".preview-subject")).to_have_text("Ada Lovelace vraagt je om bij Acme Corp te komen")
        frame = page.frame_locator("iframe.mail-html")
        await expect(frame.locator("strong").first).to_have_text("Ada Lovelace")
        html = page.get_by_label("HTML")
        await html.fill((await html.input_value()).replace("<strong>{{ inviter_name }}</strong>",
                                                           "<em>{{ inviter_name }}</em>"))  # fmt: skip
        await page.get_by_role("button", name="Preview").click()
        await expect(frame.locator("em")).to_have_text("Ada Lovelace")
        # The frame is sandboxed: an opaque origin without script, whatever the template holds.
        iframe = page.locator("iframe.mail-html")
        await expect(iframe).to_have_attribute("sandbox", "")
        assert await frame.locator("body").evaluate("() => { try { return window.parent.document, 'reached' } "
                                                    "catch (e) { return 'refused' } }") == "refused"  # fmt: skip
        await site.shot("template-editor")

        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("status")).to_have_text("Saved: this tenant now sends this nl text.")
        await expect(page.locator("#source")).to_contain_text("This tenant's own text")
        saved = await site.mg.templates.get("invitation", "nl", "acme")
        assert (saved.source, saved.subject) == ("tenant", NEW_SUBJECT)

        await page.get_by_label("Recipient").fill("check@acme.example")
        await page.get_by_role("button", name="Send a test").click()
        notice = page.locator("#test-result").get_by_role("status")
        await expect(notice).to_contain_text("Test queued to check@acme.example")
        await site.mg.run_worker(until_idle=True)
        [received] = await relay.wait_for_messages(1)
        assert received.rcpt_tos == ["check@acme.example"]
        assert received.parsed()["Subject"] == "Ada Lovelace vraagt je om bij Acme Corp te komen"
        await notice.get_by_role("link").click()
        await expect(page.locator("dl.facts")).to_contain_text("Ada Lovelace vraagt je om bij Acme Corp te komen")
        assert violations == []


async def test_the_template_editor_has_no_horizontal_scroll_on_a_phone(site: Site) -> None:
    page = site.page
    await page.set_viewport_size(PHONE)
    await site.sign_in(ACME)
    for path in ("/admin/templates/acme", "/admin/templates/acme/invitation/nl"):
        await site.open(path)
        await expect(page.locator("h1")).to_be_visible()
        if path.endswith("/nl"):
            await expect(page.frame_locator("iframe.mail-html").locator("strong").first).to_have_text("Ada Lovelace")
        widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] <= PHONE["width"], f"{path} is {widths[0]} px wide in a {widths[1]} px window"
