"""The admin UI in a real headless browser: Debian's Chromium driven by Playwright, against the real
ASGI app served by uvicorn in the test's event loop. Signing in, the mail server form and its
script-driven groups, the live test e-mail (all ok, then a refused password), delegated consent
against the fake identity provider, the message log, captured mail, the keyboard and a phone-wide
screen. Every page visited is saved as a screenshot in docs/screenshots/. The same pages are tested
in process, on their HTML, in test_web.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn

from conftest import TEST_KEY
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, Message
from mailgate.api import create_app
from mailgate.capture import CaptureServer
from mailgate.config import Config
from smtp_servers import ServerConfig, serve

try:
    from playwright.async_api import Browser, Locator, Page, ViewportSize, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extras install it
    pytest.skip("playwright is not installed: pip install -e '.[dev]'", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium (.ci/run does)", allow_module_level=True)

# One Chromium for the module (its start is most of a test's time), so one event loop for the module.
pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
ADMIN, ACME = "root@example.com", "boss@acme.example"
PASSWORD = "correct horse battery staple"
WIDE, PHONE = ViewportSize(width=1200, height=800), ViewportSize(width=375, height=800)
TEST_RUN_TIMEOUT = 15_000  # ms: a test e-mail against 127.0.0.1 takes well under a second


def smtp_doc(port: int, **auth: Any) -> dict[str, Any]:
    return {"kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none"},
            "auth": auth or {"method": "none"},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


def field(scope: Page | Locator, label: str) -> Locator:
    """The input labelled `label`, exactly (a required field's label ends in an asterisk)."""
    return scope.get_by_label(re.compile(rf"^{re.escape(label)}( \*)?$"))


@dataclass
class Site:
    """mailgate served on 127.0.0.1 and one browser tab on it; `mg` is the service behind it."""

    mg: Mailgate
    app: Any
    url: str
    page: Page

    async def open(self, path: str) -> None:
        await self.page.goto(self.url + path)

    async def sign_in(self, email: str, password: str = PASSWORD) -> None:
        await self.open("/admin/login")
        await self.page.get_by_label("E-mail address").fill(email)
        await self.page.get_by_label("Password").fill(password)
        await self.page.get_by_role("button", name="Sign in").click()
        await self.page.wait_for_url(lambda url: "/admin/login" not in url)

    async def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

    async def steps(self) -> dict[str, str]:
        """The finished test run's steps: name -> status."""
        found: list[list[str]] = await self.page.locator("#test-run li.step").evaluate_all(
            "items => items.map(li => [li.dataset.step, li.querySelector('.status').textContent.trim()])"
        )
        return {name: status for name, status in found}


@contextlib.asynccontextmanager
async def served(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    """uvicorn on the bound socket, in this event loop, until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                task.result()  # raises why it did not start
                raise AssertionError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), timeout=30_000)
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def site(tmp_path: Path, browser: Browser) -> AsyncIterator[Site]:
    """A fresh database with a global mail server (without one no tenant sends; a test that delivers
    points it at its own SMTP server), tenants acme (may use its own server) and globex, a system
    admin and acme's tenant admin; the app served on a free port; a new browser context."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = Config(
            retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, public_url=url, tenant_networks="loopback"
        )  # the tenants' test servers are on 127.0.0.1
        async with Mailgate.open(f"sqlite:///{tmp_path}/mg.db", secret_keys=TEST_KEY, actor="setup",
                                 config=config) as mg:  # fmt: skip
            await mg.tenants.add("acme", name="Acme Corp", may_use_own_server=True)
            await mg.tenants.add("globex", name="Globex")
            await mg.servers.set("global", smtp_doc(2525))
            await asyncio.gather(mg.users.create(ADMIN, PASSWORD, "system-admin"),
                                 mg.users.create(ACME, PASSWORD, "tenant-admin", "acme"))  # fmt: skip
            app = create_app(mg)
            async with served(app, sock):
                context = await browser.new_context(viewport=WIDE)
                context.set_default_timeout(10_000)
                try:
                    yield Site(mg, app, url, await context.new_page())
                finally:
                    await context.close()


# ---- the mail server form and the test e-mail ----------------------------------------------------


async def test_a_tenant_admin_configures_their_server_and_the_test_email_passes_every_step(site: Site) -> None:
    relay_config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_required=True, auth_require_tls=False)
    async with serve(relay_config) as relay:
        page = site.page
        await site.open("/admin/login")
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await site.shot("login")
        await site.sign_in(ACME)
        assert page.url == f"{site.url}/admin/tenants/acme"
        await expect(page.get_by_role("heading", name="Own mail server")).to_be_visible()

        # The script shows only the fields of the chosen kind and method.
        username = field(page, "User name")
        await expect(username).to_be_hidden()
        await page.get_by_label("How mail is sent").select_option(label="Microsoft Graph API")
        await expect(page.get_by_role("group", name="Connection security")).to_be_hidden()
        await expect(page.get_by_role("group", name="Microsoft Graph")).to_be_visible()
        await page.get_by_label("How mail is sent").select_option(label="SMTP server (relay, Exchange Online, Gmail)")
        await expect(page.get_by_role("group", name="Connection security")).to_be_visible()

        await field(page, "Sender address").fill("no-reply@acme.example")
        await field(page, "Host").fill("127.0.0.1")
        await field(page, "Port").fill(str(relay.port))
        await field(page, "Security").select_option(label="None (plain text)")
        await field(page, "Method").select_option(label="User name and password")
        await expect(username).to_be_visible()
        await username.fill(relay_config.username)
        await field(page, "Password").fill(relay_config.password)
        await page.get_by_role("button", name="Save mail server").click()
        await expect(page.get_by_role("status")).to_have_text("Mail server saved.")
        await expect(page.locator("p.effective")).to_contain_text("Its own mail server")

        info = await site.mg.servers.get("acme")
        assert info is not None
        smtp = info.document["smtp"]
        assert (smtp["host"], smtp["port"], smtp["security"]) == ("127.0.0.1", relay.port, "none")
        assert info.document["auth"]["method"] == "password" and info.document["auth"]["password"] == {"set": True}
        assert relay_config.password not in await page.content()
        await site.shot("tenant-server")

        await field(page, "Recipient").fill("check@acme.example")
        await page.get_by_role("button", name="Send test e-mail").click()
        summary = page.locator("#test-run .summary")
        await expect(summary).to_contain_text("every step ok", timeout=TEST_RUN_TIMEOUT)
        found = await site.steps()
        # No TLS asked for and a password, not a token: those two steps say they were skipped.
        assert found.pop("tls") == found.pop("token") == "skipped"
        assert set(found.values()) == {"ok"}, found
        assert [m.rcpt_tos for m in relay.messages] == [["check@acme.example"]]
        await page.locator("#test").scroll_into_view_if_needed()
        await site.shot("test-email-ok")


async def test_a_wrong_password_fails_the_test_email_at_auth_with_its_cause_and_fix(site: Site) -> None:
    relay_config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_required=True, auth_require_tls=False)
    async with serve(relay_config) as relay:
        await site.mg.servers.set("acme", smtp_doc(relay.port, method="password", username=relay_config.username,
                                                   password=relay_config.password))  # fmt: skip
        page = site.page
        await site.sign_in(ACME)
        password = field(page, "Password")
        await expect(password).to_have_attribute("placeholder", "set — leave blank to keep")
        await password.fill("not the password")
        await page.get_by_role("button", name="Save mail server").click()
        await expect(page.get_by_role("status")).to_have_text("Mail server saved.")
        loaded = await site.mg.servers.with_secrets("acme")
        assert loaded is not None and loaded.auth.password.get_secret_value() == "not the password"  # type: ignore[union-attr]

        await page.get_by_role("button", name="Send test e-mail").click()
        await expect(page.locator("#test-run .summary")).to_contain_text("failed at “auth”", timeout=TEST_RUN_TIMEOUT)
        found = await site.steps()
        assert found["connect"] == found["ehlo"] == "ok" and found["auth"] == "failed", found
        assert found["mail from"] == found["data"] == "skipped", found
        explanation = page.locator('li.step[data-step="auth"] .explanation')
        await expect(explanation).to_be_visible()
        await expect(explanation).to_contain_text("Cause:")
        await expect(explanation).to_contain_text("Fix:")
        assert "not the password" not in await page.content()
        assert relay.messages == []
        await page.locator("#test").scroll_into_view_if_needed()
        await site.shot("test-email-failed")


# ---- delegated consent ---------------------------------------------------------------------------


async def test_connecting_the_mailbox_through_consent_and_resetting_it(site: Site) -> None:
    directory, client_id = "9188040d-6c67-4c5b-b112-36a304b66dad", "0b5c2d4e-1111-2222-3333-444455556666"
    mailbox = "mailer@acme.example"
    with FakeIdentityProvider() as idp:
        idp.add_tenant(directory)
        idp.add_app(client_id, "app-secret-value", redirect_uris=(f"{site.url}/v1/oauth/callback",))
        page = site.page
        await site.sign_in(ACME)
        await field(page, "Sender address").fill(mailbox)
        await field(page, "Host").fill("127.0.0.1")
        await field(page, "Port").fill("2525")
        await field(page, "Security").select_option(label="None (plain text)")
        await field(page, "Method").select_option(label="OAuth2 (XOAUTH2)")
        await field(page, "User name").fill(mailbox)
        tokens = page.get_by_role("group", name="Token source")
        await field(tokens, "Grant").select_option(label="Delegated: an admin connects the mailbox")
        await field(tokens, "Provider").select_option(label="Microsoft 365 / Exchange Online")
        await field(tokens, "Authority").fill(idp.url)
        await field(tokens, "Directory (tenant) id").fill(directory)
        await field(tokens, "Client id").fill(client_id)
        await field(tokens, "Client secret").fill("app-secret-value")
        await page.get_by_role("button", name="Save mail server").click()
        await expect(page.get_by_role("status")).to_have_text("Mail server saved.")
        consent = page.locator("#consent")
        await expect(consent).to_contain_text("Not connected yet")

        # The fake provider has no sign-in page (and a route can't catch a redirect's target): the
        # browser's visit to it stands for the mailbox's consent, and the browser follows the
        # provider's redirect back to mailgate's callback, with its own session cookie.
        async with page.expect_request(lambda request: request.url.startswith(idp.url + "/")) as visit:
            await consent.get_by_role("button", name="Connect with Microsoft 365").click()
        redirect, _code = idp.consent((await visit.value).url, subject=mailbox)
        assert redirect.startswith(f"{site.url}/v1/oauth/callback?")
        await page.goto(redirect)
        assert page.url == f"{site.url}/admin/tenants/acme#consent"
        await expect(page.get_by_role("status")).to_have_text(f"Connected: {mailbox} now sends the mail of acme.")
        await expect(consent).to_contain_text(f"Connected: {mailbox}, consent given")
        assert "app-secret-value" not in await page.content()
        await site.shot("consent-connected")

        await consent.get_by_role("link", name="Reset…").click()
        await expect(page.get_by_role("heading", name="Are you sure?")).to_be_visible()
        await expect(page.get_by_text("Forget the stored tokens?")).to_be_visible()
        await page.get_by_role("button", name="Forget the tokens").click()
        await expect(page.locator("#consent")).to_contain_text("Not connected yet")
        info = await site.mg.servers.get("acme")
        assert info is not None and info.document["auth"]["token"]["refresh_token"] == {"set": False}


# ---- the message log -----------------------------------------------------------------------------


async def test_the_message_log_filters_by_recipient_and_a_message_shows_its_attempt(site: Site) -> None:
    async with serve(ServerConfig()) as relay:
        await site.mg.servers.set("global", smtp_doc(relay.port))
        invitation = await site.mg.submit("acme", Message(to="alice@example.com", subject="Invitation", text="x"))
        await site.mg.submit("acme", Message(to="bob@example.com", subject="Weekly report", text="x"))
        await site.mg.submit("globex", Message(to="carol@example.com", subject="Globex alert", text="x"))
        await site.mg.run_worker(until_idle=True)
        assert len(relay.messages) == 3

    page = site.page
    await site.sign_in(ADMIN)
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Message log").click()
    rows = page.locator("table tbody tr")
    await expect(rows).to_have_count(3)
    await site.shot("message-log")

    await field(page, "Recipient").fill("alice@example.com")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**/admin/messages?*recipient=alice%40example.com*")
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("Invitation")
    await expect(rows).to_contain_text("sent")

    await rows.get_by_role("link", name=str(invitation)).click()
    await expect(page.get_by_role("heading", name=f"Message {invitation}")).to_contain_text("sent")
    attempt = page.locator("article.attempt")
    await expect(attempt).to_have_count(1)
    await expect(attempt.get_by_role("heading")).to_contain_text("Attempt 1: accepted")
    await expect(attempt).to_contain_text(f"the global mail server (127.0.0.1:{relay.port})")
    await expect(page.locator("table tbody tr")).to_contain_text("alice@example.com")
    await site.shot("message")


# ---- the system admin's pages --------------------------------------------------------------------


async def test_a_system_admin_sees_the_global_server_the_tenants_and_the_audit_log(site: Site) -> None:
    page = site.page
    await site.sign_in(ADMIN)
    assert page.url == f"{site.url}/admin/global"
    await expect(page.get_by_role("heading", name="Global mail server")).to_be_visible()
    await field(page, "Sender name").fill("Example Notifications")
    await page.get_by_role("button", name="Save mail server").click()
    await expect(page.get_by_role("status")).to_have_text("Mail server saved.")
    await site.shot("global-server")

    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Tenants").click()
    await expect(page.get_by_role("heading", name="Tenants", exact=True)).to_be_visible()
    rows = page.locator("table tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.filter(has_text="Acme Corp")).to_contain_text("global")
    await site.shot("tenants")

    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit log").click()
    newest = page.locator("table tbody tr").first
    await expect(newest).to_contain_text(f"user:{ADMIN} (system-admin)")
    await expect(newest).to_contain_text("server.set")
    await expect(newest).to_contain_text("Example Notifications")
    await site.shot("audit-log")


async def test_captured_mail_in_demo_mode(site: Site) -> None:
    async with CaptureServer() as capture:
        site.app.state.capture = capture
        await site.mg.servers.set("global", smtp_doc(capture.port))
        await site.mg.submit("acme", Message(to="alice@example.com", subject="Welcome to Acme", text="Hello Alice,\n",
                                             html="<h1>Welcome</h1><p>Hello <b>Alice</b>,</p>"))  # fmt: skip
        await site.mg.run_worker(until_idle=True)
        page = site.page
        await site.sign_in(ADMIN)
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Captured mail").click()
        rows = page.locator("table tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows).to_contain_text("alice@example.com")
        await site.shot("captured")

        await rows.get_by_role("link", name="Welcome to Acme").click()
        await expect(page.get_by_role("heading", name="Welcome to Acme")).to_be_visible()
        await expect(page.locator("pre.mail-text")).to_have_text("Hello Alice,")
        # The html part is shown in a sandboxed frame.
        await expect(page.frame_locator("iframe.mail-html").locator("b")).to_have_text("Alice")
        await site.shot("captured-message")


# ---- keyboard and narrow screens -----------------------------------------------------------------


async def test_signing_in_with_the_keyboard_only(site: Site) -> None:
    page = site.page
    await site.open("/admin/login")
    await expect(page.get_by_label("E-mail address")).to_be_focused()  # autofocus
    await page.keyboard.type(ADMIN)
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Password")).to_be_focused()
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{site.url}/admin/global")
    # The first Tab reaches the skip link, which moves the focus past the navigation.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("main")).to_be_focused()


async def test_the_tenant_page_has_no_horizontal_scroll_on_a_phone(site: Site) -> None:
    relay_config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_required=True, auth_require_tls=False)
    async with serve(relay_config) as relay:
        # A refused password: the report with the longest lines (the server's reply, cause and fix).
        await site.mg.servers.set("acme", smtp_doc(relay.port, method="password", username=relay_config.username,
                                                   password="not the password"))  # fmt: skip
        page = site.page
        await page.set_viewport_size(PHONE)
        await site.sign_in(ACME)
        await page.get_by_role("button", name="Send test e-mail").click()
        await expect(page.locator("#test-run .summary")).to_contain_text("failed at “auth”", timeout=TEST_RUN_TIMEOUT)
        widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] <= PHONE["width"], f"the page is {widths[0]} px wide in a {widths[1]} px window"
