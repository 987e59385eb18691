"""Delegated Graph consent in a real headless browser (Chromium, as test_web_browser.py): the graph
form's "Sends as" choice hides the mailbox, Connect goes to the fake Entra ID's authorize URL, the
callback brings the browser back to the page that shows the connected mailbox as the sender, the
test e-mail goes through the fake Graph as that mailbox, and Reset forgets it."""

from __future__ import annotations

import pytest

from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider
from test_web_browser import ACME, TEST_RUN_TIMEOUT, Site, browser, field, site  # noqa: F401  (fixtures)

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover - the dev extras install it
    pytest.skip("playwright is not installed: pip install -e '.[dev]'", allow_module_level=True)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

DIRECTORY, APP, SECRET = "3c1d5e7f-0000-4000-8000-00000000d31e", "44444444-5555-6666-7777-888888888888", "app-secret"
MAILBOX = "notifications@acme.example"


async def test_connecting_a_graph_mailbox_makes_it_the_sender_and_reset_forgets_it(site: Site) -> None:  # noqa: F811
    with FakeIdentityProvider() as idp, FakeGraph(idp) as graph:
        idp.add_tenant(DIRECTORY)
        idp.add_app(APP, SECRET, redirect_uris=(f"{site.url}/v1/oauth/callback",))
        graph.add_mailbox(MAILBOX)
        page = site.page
        await site.sign_in(ACME)
        await page.get_by_label("How mail is sent").select_option(label="Microsoft Graph API")
        group = page.get_by_role("group", name="Microsoft Graph")
        mailbox = field(group, "Sending mailbox")
        await expect(mailbox).to_be_visible()
        await field(group, "Sends as").select_option(value="delegated")
        await expect(mailbox).to_be_hidden()  # the consent names it
        await field(group, "Directory (tenant) id").fill(DIRECTORY)
        await field(group, "Client id").fill(APP)
        await field(group, "Client secret").fill(SECRET)
        await field(group, "Authority").fill(idp.url)
        await field(group, "Graph endpoint").fill(graph.url)
        await page.get_by_role("button", name="Save mail server").click()
        await expect(page.get_by_role("status")).to_have_text("Mail server saved.")
        consent = page.locator("#consent")
        await expect(consent).to_contain_text("Not connected yet")

        # As in test_web_browser.py: the browser's visit to the provider stands for the consent.
        async with page.expect_request(lambda request: request.url.startswith(idp.url + "/")) as visit:
            await consent.get_by_role("button", name="Connect with Microsoft 365").click()
        authorize = (await visit.value).url
        assert authorize.startswith(f"{idp.url}/{DIRECTORY}/oauth2/v2.0/authorize?")
        redirect, _code = idp.consent(authorize, subject=MAILBOX)
        await page.goto(redirect)
        assert page.url == f"{site.url}/admin/tenants/acme#consent"
        await expect(page.get_by_role("status")).to_have_text(f"Connected: {MAILBOX} now sends the mail of acme.")
        await expect(consent).to_contain_text(f"Connected: {MAILBOX}, consent given")
        await expect(field(page, "Sender address")).to_have_value(MAILBOX)
        content = await page.content()
        assert SECRET not in content and not any(t in content for t in idp.refresh_tokens_for(MAILBOX))

        await field(page, "Recipient").fill("check@example.org")
        await page.get_by_role("button", name="Send test e-mail").click()
        await expect(page.locator("#test-run .summary")).to_contain_text("every step ok", timeout=TEST_RUN_TIMEOUT)
        [sent] = graph.sent
        assert sent.from_ == MAILBOX and sent.to == ["check@example.org"]

        await consent.get_by_role("link", name="Reset…").click()
        await expect(page.get_by_text("also forgets the mailbox and the sender address")).to_be_visible()
        await page.get_by_role("button", name="Forget the tokens").click()
        await expect(page.locator("#consent")).to_contain_text("Not connected yet")
        await expect(field(page, "Sender address")).to_have_value("")
        info = await site.mg.servers.get("acme")
        assert info is not None and info.document["graph"]["refresh_token"] == {"set": False}
