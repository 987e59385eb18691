"""The admin UI's pages in process (ASGI), on their HTML: sign-in and sessions, CSRF on every
form, tenant isolation, the mail server form (groups, hidden kinds, secrets write-only, inline
problems), the live test e-mail against a real SMTP server, consent, the message and audit logs,
and captured mail. The browser tests are in test_web_browser.py."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
from sqlalchemy import select

from conftest import TEST_KEY
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, Message
from mailgate.api import create_app
from mailgate.capture import CaptureServer
from mailgate.config import Config
from mailgate.db.models import AdminSession, AdminUser, ServerSecret
from smtp_servers import ServerConfig, scripted, serve

FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, tenant_networks="loopback")
ADMIN, ACME, GLOBEX = "root@example.com", "boss@acme.example", "boss@globex.example"
PASSWORD = "correct horse battery staple"
RELAY_PASSWORD = "relay-Pa55word-never-shown"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def smtp_doc(port: int, **auth: Any) -> dict[str, Any]:
    return {"kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none"},
            "auth": auth or {"method": "none"},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


@dataclass
class Browser:
    """One signed-in (or not) browser: its own cookies."""

    client: httpx2.AsyncClient
    csrf: str = ""

    async def get(self, url: str, **kw: Any) -> httpx2.Response:
        reply = await self.client.get(url, **kw)
        found = CSRF.search(reply.text)
        if found and reply.status_code < 400:
            self.csrf = html.unescape(found.group(1))
        return reply

    async def post(
        self, url: str, data: dict[str, Any] | None = None, *, csrf: bool = True, **kw: Any
    ) -> httpx2.Response:
        form = dict(data or {})
        if csrf:
            form.setdefault("csrf_token", self.csrf)
        return await self.client.post(url, data=form, **kw)

    async def sign_in(self, email: str, password: str = PASSWORD) -> httpx2.Response:
        await self.get("/admin/login")
        reply = await self.post("/admin/login", {"email": email, "password": password})
        if reply.status_code == 303:
            await self.get(reply.headers["location"], follow_redirects=True)
        return reply


@dataclass
class UI:
    mg: Mailgate
    app: Any
    browsers: list[httpx2.AsyncClient]

    def browser(self) -> Browser:
        client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://mailgate.test")
        self.browsers.append(client)
        return Browser(client)

    async def signed_in(self, email: str) -> Browser:
        b = self.browser()
        reply = await b.sign_in(email)
        assert reply.status_code == 303, reply.text
        return b


@pytest.fixture
async def ui(tmp_path: Path) -> AsyncIterator[UI]:
    async with Mailgate.open(f"sqlite:///{tmp_path}/mg.db", secret_keys=TEST_KEY, actor="setup", config=FAST) as mg:
        await mg.tenants.add("acme", name="Acme Corp", may_use_own_server=True)
        await mg.tenants.add("globex", name="Globex", may_use_own_server=True)
        await mg.users.create(ADMIN, PASSWORD, "system-admin")
        await mg.users.create(ACME, PASSWORD, "tenant-admin", "acme")
        await mg.users.create(GLOBEX, PASSWORD, "tenant-admin", "globex")
        app = create_app(mg)
        state = UI(mg, app, [])
        try:
            yield state
        finally:
            for client in state.browsers:
                await client.aclose()


def text_of(reply: httpx2.Response) -> str:
    """The page's text, tags removed, whitespace squeezed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", reply.text)).split())


# ---- signing in ----------------------------------------------------------------------------------


async def test_pages_need_a_signed_in_admin(ui: UI) -> None:
    b = ui.browser()
    for url in ("/admin", "/admin/global", "/admin/tenants", "/admin/tenants/acme", "/admin/messages", "/admin/audit"):
        reply = await b.get(url)
        assert reply.status_code == 303, url
        assert reply.headers["location"].startswith("/admin/login?next="), url


async def test_sign_in_sets_a_signed_httponly_samesite_cookie_and_lands_on_the_role_home(ui: UI) -> None:
    b = ui.browser()
    reply = await b.sign_in(ADMIN)
    assert reply.status_code == 303
    cookie = next(c for c in reply.headers.get_list("set-cookie") if c.startswith("mailgate_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert (await b.get("/admin")).headers["location"] == "/admin/global"
    tenant = await ui.signed_in(ACME)
    assert (await tenant.get("/admin")).headers["location"] == "/admin/tenants/acme"
    # The session row holds a hash, not the token in the cookie.
    token = cookie.split("=", 1)[1].split(";")[0].rsplit(".", 1)[0]
    async with ui.mg.db.sessions() as s:
        hashes = list(await s.scalars(select(AdminSession.token_hash)))
    assert hashes and token not in hashes


async def test_wrong_password_and_unknown_address_get_the_same_answer(ui: UI) -> None:
    b = ui.browser()
    wrong = await b.sign_in(ADMIN, "not the password at all")
    unknown = await b.sign_in("nobody@example.com", "not the password at all")
    assert wrong.status_code == unknown.status_code == 401
    assert "the address or the password is not right" in text_of(wrong)
    assert "the address or the password is not right" in text_of(unknown)
    assert "mailgate_session" not in wrong.headers.get("set-cookie", "")


async def test_sign_in_is_refused_after_five_failures(ui: UI) -> None:
    b = ui.browser()
    for _ in range(5):
        assert (await b.sign_in(ACME, "wrong password, wrong")).status_code == 401
    refused = await b.sign_in(ACME)  # the right password, now too late
    assert refused.status_code == 401 and "too many failed sign-ins" in text_of(refused)


async def test_sign_in_form_without_its_csrf_token_is_refused(ui: UI) -> None:
    b = ui.browser()
    await b.get("/admin/login")
    reply = await b.post("/admin/login", {"email": ADMIN, "password": PASSWORD, "csrf_token": "forged"})
    assert reply.status_code == 403 and "mailgate_session" not in reply.headers.get("set-cookie", "")


async def test_a_forged_or_tampered_session_cookie_is_not_a_session(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    value = b.client.cookies["mailgate_session"]
    token, signature = value.rsplit(".", 1)
    for forged in (f"{token}.{'A' * len(signature)}", f"{token[:-1]}x.{signature}", token):
        other = ui.browser()
        other.client.cookies.set("mailgate_session", forged)
        assert (await other.get("/admin/global")).status_code == 303, forged


async def test_sign_out_ends_the_session_on_the_server(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    stolen = b.client.cookies["mailgate_session"]
    reply = await b.post("/admin/logout")
    assert reply.status_code == 303 and reply.headers["location"] == "/admin/login"
    replay = ui.browser()
    replay.client.cookies.set("mailgate_session", stolen)
    assert (await replay.get("/admin/global")).status_code == 303


async def test_removing_a_user_or_changing_the_password_ends_their_sessions(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    globex = await ui.signed_in(GLOBEX)
    await ui.mg.users.set_password(ACME, "a brand new password")
    await ui.mg.users.remove(GLOBEX)
    assert (await acme.get("/admin/tenants/acme")).status_code == 303
    assert (await globex.get("/admin/tenants/globex")).status_code == 303


async def test_next_only_leads_inside_the_admin(ui: UI) -> None:
    for target, expected in (("/admin/messages", "/admin/messages"), ("https://evil.example/", "/admin"),
                             ("//evil.example/admin", "/admin"), ("/v1/messages", "/admin"),
                             ("/admin.evil/x", "/admin"), ("/admin/\\evil.example", "/admin")):  # fmt: skip
        b = ui.browser()
        await b.get("/admin/login", params={"next": target})
        reply = await b.post("/admin/login", {"email": ADMIN, "password": PASSWORD, "next": target})
        assert reply.headers["location"] == expected, target


async def test_passwords_are_stored_as_argon2_hashes(ui: UI) -> None:
    async with ui.mg.db.sessions() as s:
        hashes = list(await s.scalars(select(AdminUser.password_hash)))
    assert hashes and all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes)


# ---- headers on every response -------------------------------------------------------------------


def assert_not_framed_nor_cached(reply: httpx2.Response) -> None:
    where = f"{reply.request.method} {reply.request.url.path} → {reply.status_code}"
    assert reply.headers.get_list("content-security-policy") == ["frame-ancestors 'none'"], where
    assert reply.headers.get("x-frame-options") == "DENY", where
    assert reply.headers.get("cache-control") == "no-store", where


async def test_a_refused_oversized_admin_request_may_not_be_framed_nor_cached(ui: UI) -> None:
    app = create_app(ui.mg, config=dataclasses.replace(FAST, max_request_size=1000))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://mailgate.test") as b:
        reply = await b.post("/admin/login", data={"email": ADMIN, "password": "x" * 5000})
    assert reply.status_code == 413
    assert_not_framed_nor_cached(reply)


async def test_every_admin_response_may_not_be_framed_nor_cached(ui: UI) -> None:
    anonymous = ui.browser()
    assert_not_framed_nor_cached(await anonymous.get("/admin/login"))
    assert_not_framed_nor_cached(await anonymous.get("/admin/global"))  # 303 to the sign-in page
    assert_not_framed_nor_cached(await anonymous.post("/admin/login", {"email": ADMIN, "password": "wrong guess!"}))
    assert_not_framed_nor_cached(await anonymous.get("/admin/nothing-here"))  # 404 of the router
    b = ui.browser()
    signed_in = await b.sign_in(ADMIN)
    assert signed_in.status_code == 303
    assert_not_framed_nor_cached(signed_in)  # the redirect that sets the session cookie
    assert_not_framed_nor_cached(await b.get("/admin"))  # 303 to the role's home
    for url in ("/admin/global", "/admin/tenants", "/admin/tenants/acme", "/admin/messages", "/admin/audit"):
        page = await b.get(url)
        assert page.status_code == 200, url
        assert_not_framed_nor_cached(page)
    assert_not_framed_nor_cached(await b.get("/admin/tenants/nope"))  # 404 from the service
    assert_not_framed_nor_cached(await b.post("/admin/tenants", {"id": "x"}, csrf=False))  # 403: no CSRF token
    acme = await ui.signed_in(ACME)
    forbidden = await acme.get("/admin/global")
    assert forbidden.status_code == 403
    assert_not_framed_nor_cached(forbidden)
    hx = await anonymous.client.get("/admin/global", headers={"HX-Request": "true"})
    assert hx.status_code == 401
    assert_not_framed_nor_cached(hx)
    assert_not_framed_nor_cached(await b.post("/admin/logout"))
    api = await anonymous.get("/healthz")  # the API is not the admin UI's business
    assert "x-frame-options" not in api.headers and "content-security-policy" not in api.headers


async def test_the_page_of_an_unexpected_error_may_not_be_framed_nor_cached(ui: UI) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug")

    ui.app.add_api_route("/admin/broken", broken)
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=ui.app, raise_app_exceptions=False),
                                base_url="http://mailgate.test")  # fmt: skip
    ui.browsers.append(client)
    reply = await client.get("/admin/broken")
    assert reply.status_code == 500 and "the operator's log has the error type" in text_of(reply)
    assert_not_framed_nor_cached(reply)


async def test_static_files_may_be_cached_but_not_framed(ui: UI) -> None:
    reply = await ui.browser().get("/admin/static/admin.css")
    assert reply.status_code == 200
    assert reply.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert reply.headers["x-frame-options"] == "DENY"
    assert "cache-control" not in reply.headers and reply.headers["etag"]


# ---- CSRF on every form --------------------------------------------------------------------------

FORMS = [
    "/admin/logout", "/admin/servers/global", "/admin/servers/global/enable", "/admin/servers/global/disable",
    "/admin/servers/global/delete", "/admin/servers/global/reset", "/admin/servers/global/connect",
    "/admin/servers/global/test", "/admin/tenants", "/admin/tenants/acme", "/admin/messages/1/retry",
    "/admin/messages/1/cancel", "/admin/tenants/acme/support", "/admin/system",
    "/admin/templates/acme/invitation/nl", "/admin/templates/acme/invitation/nl/preview",
    "/admin/templates/acme/invitation/nl/reset", "/admin/templates/acme/invitation/nl/test",
    "/admin/tenants/acme/webhooks", "/admin/tenants/acme/webhooks/1/delete",
]  # fmt: skip


def _posted_admin_paths(app: Any) -> set[str]:
    """Every POST route under /admin, also those of routers mounted with include_router (which
    FastAPI keeps as one entry of app.routes)."""
    paths = set()
    for route in app.routes:
        included = getattr(route, "effective_candidates", None)
        for r in included() if included is not None else [route]:
            if "POST" in (getattr(r, "methods", None) or ()) and r.path.startswith("/admin"):
                paths.add(r.path)
    return paths


def test_every_form_route_is_in_the_csrf_list(ui: UI) -> None:
    posted = _posted_admin_paths(ui.app) - {"/admin/login"}  # the sign-in form has its own token
    assert len(posted) >= 15  # the walk sees the routes of the included routers
    untested = {
        path for path in posted
        if not any(re.fullmatch(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)), form) for form in FORMS)
    }  # fmt: skip
    assert not untested, f"POST routes no CSRF test covers: {sorted(untested)}"


@pytest.mark.parametrize("url", FORMS)
async def test_a_form_without_the_csrf_token_changes_nothing(ui: UI, url: str) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    before = await ui.mg.audit_log(limit=1000)
    b = await ui.signed_in(ADMIN)
    for token in (None, "forged-token"):
        data = {"id": "newco", "to": ADMIN} if token is None else {"id": "newco", "to": ADMIN, "csrf_token": token}
        reply = await b.post(url, data, csrf=False)
        assert reply.status_code == 403, (url, token, reply.status_code)
        assert "did not come from this page" in text_of(reply)
    assert await ui.mg.audit_log(limit=1000) == before
    assert (await b.get("/admin/global")).status_code == 200  # still signed in


async def test_the_csrf_token_of_one_session_is_refused_in_another(ui: UI) -> None:
    one = await ui.signed_in(ADMIN)
    two = await ui.signed_in(ADMIN)
    assert one.csrf != two.csrf
    reply = await two.post("/admin/tenants", {"id": "newco", "csrf_token": one.csrf}, csrf=False)
    assert reply.status_code == 403
    assert [t.id for t in await ui.mg.tenants.list()] == ["acme", "globex"]


async def test_htmx_requests_may_carry_the_token_in_a_header(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    reply = await b.client.post("/admin/tenants", data={"id": "newco"},
                                headers={"HX-Request": "true", "X-CSRF-Token": b.csrf})  # fmt: skip
    assert reply.status_code == 204 and reply.headers["hx-redirect"] == "/admin/tenants/newco"


# ---- tenant isolation ----------------------------------------------------------------------------


async def test_a_tenant_admin_sees_and_changes_only_their_tenant(ui: UI) -> None:
    await ui.mg.servers.set("globex", smtp_doc(2526, method="password", username="g", password=RELAY_PASSWORD))
    acme = await ui.signed_in(ACME)
    assert (await acme.get("/admin/tenants/acme")).status_code == 200
    hidden, missing = await acme.get("/admin/tenants/globex"), await acme.get("/admin/tenants/nosuch")
    assert hidden.status_code == missing.status_code == 404  # another tenant is exactly like no tenant
    assert text_of(hidden).replace("globex", "nosuch") == text_of(missing)
    assert "Globex" not in hidden.text
    for url in ("/admin/global", "/admin/tenants"):
        assert (await acme.get(url)).status_code == 403, url
    for url in ("/admin/servers/globex", "/admin/servers/globex/disable", "/admin/tenants/globex",
                "/admin/servers/globex/test"):  # fmt: skip
        assert (await acme.post(url, {"from_address": "x@example.com", "to": ACME})).status_code == 404, url
    assert (await acme.post("/admin/servers/global/disable")).status_code == 403
    assert (await ui.mg.servers.get("globex")) is not None and (await ui.mg.servers.get("globex")).enabled  # type: ignore[union-attr]
    assert not any(r.actor.startswith(f"user:{ACME}") for r in await ui.mg.audit_log(limit=100))


async def test_a_tenant_admin_does_not_see_other_tenants_messages_or_audit(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    mine = await ui.mg.submit("acme", Message(to="a@example.com", subject="for acme only", text="x"))
    theirs = await ui.mg.submit("globex", Message(to="g@example.com", subject="for globex only", text="x"))
    await ui.mg.acting_as("user:someone").servers.set("globex", smtp_doc(2526))
    acme = await ui.signed_in(ACME)
    log = text_of(await acme.get("/admin/messages"))
    assert "for acme only" in log and "for globex only" not in log
    assert "for globex only" not in text_of(await acme.get("/admin/messages", params={"tenant": "globex"}))
    assert (await acme.get(f"/admin/messages/{mine}")).status_code == 200
    assert (await acme.get(f"/admin/messages/{theirs}")).status_code == 404
    assert (await acme.post(f"/admin/messages/{theirs}/cancel")).status_code == 404
    assert "globex" not in text_of(await acme.get("/admin/audit"))
    assert "globex" not in text_of(await acme.get("/admin/audit", params={"tenant": "globex"}))
    assert "Message log" in text_of(await acme.get("/admin/messages"))


async def test_a_tenant_admin_changes_only_what_their_role_allows(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    page = await acme.get("/admin/tenants/acme")
    assert 'name="may_use_own_server"' not in page.text and 'name="name"' not in page.text
    reply = await acme.post("/admin/tenants/acme", {"admin_address": "it@acme.example", "name": "Hacked",
                                                     "may_use_own_server": "on",
                                                     "support_address": "x@acme.example"})  # fmt: skip
    assert reply.status_code == 303
    tenant = await ui.mg.tenants.get("acme")
    assert tenant.admin_address == "it@acme.example" and tenant.name == "Acme Corp"
    assert tenant.support_address is None  # this tenant may not set it


# ---- the mail server form ------------------------------------------------------------------------


async def test_the_server_form_has_every_group_and_labels_every_input(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    page = (await b.get("/admin/global")).text
    for legend in ("Use mail server", "Sender", "Kind", "Connection security", "Authentication", "Token source",
                   "Microsoft Graph", "Connection tuning", "Quotas", "Debugging"):  # fmt: skip
        assert f"<legend>{legend}</legend>" in page, legend
    ids = re.findall(r'<(?:input|select)[^>]* id="([^"]+)"', page)
    labelled = set(re.findall(r'<label for="([^"]+)"', page))
    assert ids and set(ids) <= labelled, set(ids) - labelled
    # A new server: SMTP shown, the Graph and token source groups hidden.
    assert re.search(r'<fieldset data-when="kind=graph" hidden>', page)
    assert re.search(r'<fieldset data-when="kind=smtp\|ews;auth.method=oauth2" hidden>', page)
    assert re.search(r'<fieldset data-when="kind=smtp">', page)
    # EWS: its own group hidden; it shares the authentication and token source groups with SMTP.
    assert re.search(r'<fieldset data-when="kind=ews" hidden>', page)
    assert "<legend>Exchange Web Services</legend>" in page
    assert re.search(r'<fieldset data-when="kind=smtp\|ews">', page)


async def test_the_form_saves_an_ews_server(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/global")
    form = {"enabled": "on", "from_address": "notify@contoso.example", "kind": "ews",
            "ews.url": "https://mail.contoso.example/EWS/Exchange.asmx", "ews.mailbox": "notify@contoso.example",
            "ews.exchange_version": "Exchange2016", "ews.password_scheme": "basic", "ews.save_to_sent_items": "on",
            "auth.method": "password", "auth.username": "CONTOSO\\notify", "auth.password": RELAY_PASSWORD,
            "auth.mechanism": "PLAIN", "smtp.host": "ignored.example"}  # fmt: skip
    reply = await b.post("/admin/servers/global", form)
    assert reply.status_code == 303, text_of(reply)
    info = await ui.mg.servers.get("global")
    assert info is not None
    doc = info.document
    assert doc["kind"] == "ews" and doc.get("smtp") is None
    assert doc["ews"] == {"url": "https://mail.contoso.example/EWS/Exchange.asmx", "autodiscover": False,
                          "mailbox": "notify@contoso.example",
                          "exchange_version": "Exchange2016", "password_scheme": "basic", "allow_delegate": False,
                          "save_to_sent_items": True}  # fmt: skip
    # The SMTP-only mechanism is not sent by the form (the stored document has its default).
    assert doc["auth"] == {"method": "password", "username": "CONTOSO\\notify", "password": {"set": True},
                           "mechanism": "auto"}  # fmt: skip
    page = await b.get("/admin/global")
    assert RELAY_PASSWORD not in page.text and re.search(r'name="ews.url"[^>]* data-destination', page.text)


async def test_saving_the_form_stores_the_document_and_keeps_the_secret_write_only(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/global")
    form = {"enabled": "on", "from_address": "no-reply@example.com", "from_name": "Example", "kind": "smtp",
            "smtp.host": "smtp.example.com", "smtp.port": "587", "smtp.security": "starttls-required",
            "smtp.verify_certificate": "on", "auth.method": "password", "auth.username": "relay-user",
            "auth.password": RELAY_PASSWORD, "auth.mechanism": "auto", "quota.messages_per_minute": "30",
            # fields of a hidden kind are not part of the document
            "graph.client_id": "ignored", "auth.token.client_id": "ignored"}  # fmt: skip
    reply = await b.post("/admin/servers/global", form)
    assert reply.status_code == 303, text_of(reply)
    info = await ui.mg.servers.get("global")
    assert info is not None
    doc = info.document
    assert doc["smtp"]["host"] == "smtp.example.com" and doc["smtp"]["port"] == 587
    assert doc["auth"] == {
        "method": "password",
        "username": "relay-user",
        "password": {"set": True},
        "mechanism": "auto",
    }
    assert doc["quota"]["messages_per_minute"] == 30 and doc.get("graph") is None
    page = await b.get("/admin/global")
    assert "Mail server saved." in text_of(page)
    assert RELAY_PASSWORD not in page.text
    assert 'placeholder="set — leave blank to keep"' in page.text
    # The page says at once, when a destination field changes, that the password must be given again.
    assert re.search(r'<p class="problem again" id="f-auth-password-again" hidden>', page.text)
    assert re.search(r'name="smtp.host" data-destination', page.text)
    assert not re.search(r'name="from_address" data-destination', page.text)
    # Stored encrypted: the secret row does not hold the password.
    async with ui.mg.db.sessions() as s:
        stored = list(await s.scalars(select(ServerSecret.ciphertext)))
    assert stored and all(RELAY_PASSWORD not in v for v in stored)
    # Saved again with the password left blank: it is kept.
    form["auth.password"] = ""
    form["from_name"] = "Example Notifications"
    assert (await b.post("/admin/servers/global", form)).status_code == 303
    loaded = await ui.mg.servers.with_secrets("global")
    assert loaded is not None and loaded.auth.password.get_secret_value() == RELAY_PASSWORD  # type: ignore[union-attr]


async def test_a_tenant_gives_its_ca_as_text_and_only_the_global_server_names_a_file(ui: UI) -> None:
    from certs import make_ca

    pem = make_ca("acme private CA").cert_pem.decode()
    b = await ui.signed_in(ACME)
    page = await b.get("/admin/tenants/acme")
    assert 'name="smtp.ca_certificate"' in page.text and 'name="smtp.ca_file"' not in page.text
    form = {
        "enabled": "on",
        "from_address": "no-reply@acme.example",
        "kind": "smtp",
        "smtp.host": "smtp.acme.example",
        "smtp.security": "starttls-required",
        "smtp.verify_certificate": "on",
        "smtp.ca_certificate": pem.replace("\n", "\r\n"),
        "auth.method": "none",
        "smtp.ca_file": "/etc/passwd",
    }  # a field the tenant's page does not have: never part of the document
    reply = await b.post("/admin/servers/acme", form)
    assert reply.status_code == 303, text_of(reply)
    stored = await ui.mg.servers.with_secrets("acme")
    assert stored is not None and stored.smtp is not None
    assert "BEGIN CERTIFICATE" in (stored.smtp.ca_certificate or "") and stored.smtp.ca_file is None
    admin = await ui.signed_in(ADMIN)
    assert 'name="smtp.ca_file"' in (await admin.get("/admin/global")).text


async def test_a_stored_secret_can_be_removed_from_the_form(ui: UI) -> None:
    doc = smtp_doc(2525, method="oauth2", username="m@example.com")
    doc["auth"]["token"] = {"grant": "refresh_token", "provider": "google", "client_id": "c",
                            "client_secret": "cs-VALUE-never-shown", "refresh_token": "rt-value"}  # fmt: skip
    await ui.mg.servers.set("global", doc)
    b = await ui.signed_in(ADMIN)
    page = await b.get("/admin/global")
    assert 'name="auth.token.client_secret.remove"' in page.text and "cs-VALUE-never-shown" not in page.text
    form = {"enabled": "on", "from_address": "no-reply@example.com", "kind": "smtp", "smtp.host": "127.0.0.1",
            "smtp.port": "2525", "smtp.security": "none", "smtp.verify_certificate": "on", "auth.method": "oauth2",
            "auth.username": "m@example.com", "auth.token.grant": "refresh_token", "auth.token.provider": "google",
            "auth.token.client_id": "c", "auth.token.client_auth": "form",
            "auth.token.client_secret.remove": "on"}  # fmt: skip
    assert (await b.post("/admin/servers/global", form)).status_code == 303
    info = await ui.mg.servers.get("global")
    assert info is not None and info.document["auth"]["token"]["client_secret"] == {"set": False}
    assert info.document["auth"]["token"]["refresh_token"] == {"set": True}


async def test_a_changed_host_asks_for_the_secret_again(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525, method="password", username="u", password=RELAY_PASSWORD))
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/global")
    form = {"enabled": "on", "from_address": "no-reply@example.com", "kind": "smtp", "smtp.host": "other.example.com",
            "smtp.port": "2525", "smtp.security": "none", "auth.method": "password", "auth.username": "u",
            "auth.password": ""}  # fmt: skip
    reply = await b.post("/admin/servers/global", form)
    assert reply.status_code == 422
    problem = re.search(r'id="f-auth-password-error">([^<]+)<', reply.text)
    assert problem is not None and "again" in problem.group(1)
    info = await ui.mg.servers.get("global")
    assert info is not None and info.document["smtp"]["host"] == "127.0.0.1"  # nothing saved


async def test_problems_are_shown_next_to_their_fields_with_the_values_typed(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/global")
    reply = await b.post("/admin/servers/global", {
        "enabled": "on", "from_address": "not an address", "kind": "smtp", "smtp.host": "smtp.example.com",
        "smtp.port": "five", "smtp.security": "starttls-required", "auth.method": "none",
    })  # fmt: skip
    assert reply.status_code == 422
    assert re.search(r'id="f-smtp-port-error">is a whole number<', reply.text)
    assert 'value="five"' in reply.text and 'value="smtp.example.com"' in reply.text
    assert await ui.mg.servers.get("global") is None
    reply = await b.post("/admin/servers/global", {
        "enabled": "on", "from_address": "not an address", "kind": "smtp", "smtp.host": "smtp.example.com",
        "smtp.port": "465", "smtp.security": "starttls-required", "auth.method": "none",
    })  # fmt: skip
    assert re.search(r'id="f-from-address-error">[^<]*not a valid address', reply.text)
    assert re.search(r'id="f-smtp-host-error">smtp: port 465 speaks implicit TLS', reply.text)
    assert 'class="field invalid"' in reply.text


async def test_a_graph_server_saved_from_the_form(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/tenants/acme")
    reply = await b.post("/admin/servers/acme", {
        "enabled": "on", "from_address": "mail@acme.example", "kind": "graph", "graph.directory_id": "dir-1",
        "graph.client_id": "client-1", "graph.client_secret": "graph-secret-never-shown",
        "graph.mailbox": "mail@acme.example", "graph.save_to_sent_items": "on", "smtp.host": "ignored.example.com",
        "auth.method": "password",
    })  # fmt: skip
    assert reply.status_code == 303, text_of(reply)
    info = await ui.mg.servers.get("acme")
    assert info is not None and info.document["kind"] == "graph" and info.document.get("smtp") is None
    assert info.document["graph"]["save_to_sent_items"] is True and info.document["graph"]["large_attachments"] is False
    page = await b.get("/admin/tenants/acme")
    assert "graph-secret-never-shown" not in page.text
    assert re.search(r'<fieldset data-when="kind=graph">', page.text)


async def test_switch_off_on_and_remove_with_confirmation(ui: UI) -> None:
    await ui.mg.servers.set("acme", smtp_doc(2525))
    b = await ui.signed_in(ACME)
    await b.get("/admin/tenants/acme")
    assert (await b.post("/admin/servers/acme/disable")).status_code == 303
    assert not (await ui.mg.servers.get("acme")).enabled  # type: ignore[union-attr]
    assert "Switch on" in text_of(await b.get("/admin/tenants/acme"))
    assert (await b.post("/admin/servers/acme/enable")).status_code == 303
    confirm = await b.get("/admin/servers/acme/confirm/delete")
    assert confirm.status_code == 200 and "Are you sure?" in text_of(confirm)
    assert (await b.post("/admin/servers/acme/delete")).status_code == 303
    assert await ui.mg.servers.get("acme") is None
    assert "The global mail server" in text_of(await b.get("/admin/tenants/acme")) or "Nothing" in text_of(
        await b.get("/admin/tenants/acme"))  # fmt: skip


# ---- tenants -------------------------------------------------------------------------------------


async def test_tenants_list_shows_each_effective_server_and_health(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    await ui.mg.servers.set("acme", smtp_doc(2526))
    await ui.mg.tenants.update("globex", may_use_own_server=False)
    b = await ui.signed_in(ADMIN)
    page = await b.get("/admin/tenants")
    found = re.findall(r"<tr>\s*<td><a href=\"/admin/tenants/[^\"]+\">(.*?)</tr>", page.text, re.S)
    rows = {" ".join(re.sub(r"<[^>]+>", " ", r).split()).split()[0]: " ".join(re.sub(r"<[^>]+>", " ", r).split())
            for r in found}  # fmt: skip
    assert rows["Acme"] == "Acme Corp acme own unknown yes"
    assert rows["Globex"] == "Globex globex global unknown no"
    await ui.mg.servers.disable("global")  # the global server off: no tenant sends
    page = await b.get("/admin/tenants")
    assert text_of(page).count(" disabled ") >= 2 and " own unknown " not in text_of(page)


async def test_adding_a_tenant_and_its_problems(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/tenants")
    reply = await b.post("/admin/tenants", {"id": "new co!", "name": "New"})
    assert reply.status_code == 422 and 'class="field invalid"' in reply.text
    assert 'value="new co!"' in reply.text
    reply = await b.post("/admin/tenants", {"id": "newco", "name": "New Co", "may_use_own_server": "on",
                                            "admin_address": "it@newco.example"})  # fmt: skip
    assert reply.status_code == 303 and reply.headers["location"] == "/admin/tenants/newco"
    tenant = await ui.mg.tenants.get("newco")
    assert tenant.may_use_own_server and tenant.admin_address == "it@newco.example"
    assert "Tenant newco added." in text_of(await b.get("/admin/tenants/newco"))
    records = await ui.mg.audit_log("newco")
    assert records[0].actor == f"user:{ADMIN} (system-admin)"


# ---- the test e-mail -----------------------------------------------------------------------------


async def _until_done(b: Browser, first: httpx2.Response) -> list[httpx2.Response]:
    pages = [first]
    for _ in range(200):
        found = re.search(r'hx-get="(/admin/tests/[^"]+)"', pages[-1].text)
        if found is None:
            return pages
        await asyncio.sleep(0.02)
        pages.append(await b.client.get(found.group(1), headers={"HX-Request": "true"}))
    raise AssertionError("the test run never finished")


def steps(reply: httpx2.Response) -> dict[str, str]:
    return dict(re.findall(r'<li class="step (\w+)" data-step="([^"]+)"', reply.text)[i][::-1]
                for i in range(len(re.findall(r'<li class="step', reply.text))))  # fmt: skip


async def test_the_test_email_shows_every_step_ok_live(ui: UI) -> None:
    relay_config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_required=True, auth_require_tls=False)
    async with serve(relay_config) as relay:
        await ui.mg.servers.set("acme", smtp_doc(relay.port, method="password", username=relay_config.username,
                                                 password=relay_config.password))  # fmt: skip
        b = await ui.signed_in(ACME)
        await b.get("/admin/tenants/acme")
        first = await b.post("/admin/servers/acme/test", {"to": "check@acme.example"}, headers={"HX-Request": "true"})
        assert first.status_code == 200 and 'hx-trigger="load delay:250ms"' in first.text
        pages = await _until_done(b, first)
        final = pages[-1]
        assert "every step ok" in text_of(final)
        found = steps(final)
        # No TLS asked for and a password, not a token: those two steps say they were skipped.
        assert found.pop("tls") == found.pop("token") == "skipped"
        assert set(found.values()) == {"ok"}, found
        assert list(steps(final)) == ["resolve settings", "dns", "connect", "greeting", "ehlo", "tls", "token",
                                      "auth", "mail from", "rcpt to", "data", "queued"]  # fmt: skip
        assert relay_config.password not in final.text
        assert [m.rcpt_tos for m in relay.messages] == [["check@acme.example"]]


async def test_a_tenants_silent_server_holds_at_most_two_test_emails(ui: UI) -> None:
    from mailgate.api.limits import MAX_TEST_EMAILS_PER_SCOPE

    async with scripted("silent") as hole:
        doc = smtp_doc(hole.address[1])
        doc["connection"] = {"connect_timeout": 1, "protocol_timeout": 1}
        await ui.mg.servers.set("acme", doc)
        b = await ui.signed_in(ACME)
        await b.get("/admin/tenants/acme")
        started = [await b.post("/admin/servers/acme/test", {"to": "a@acme.example"}, headers={"HX-Request": "true"})
                   for _ in range(MAX_TEST_EMAILS_PER_SCOPE + 1)]  # fmt: skip
        assert [r.status_code for r in started] == [200] * MAX_TEST_EMAILS_PER_SCOPE + [409]
        assert "test e-mails of this mail server are under way" in text_of(started[-1])
        for run in ui.app.state.test_runs.values():  # they end by their timeouts
            await asyncio.wait_for(asyncio.shield(run.task), 10)


async def test_the_test_email_defaults_to_the_admin_and_explains_a_refused_password(ui: UI) -> None:
    relay_config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_required=True, auth_require_tls=False)
    async with serve(relay_config) as relay:
        await ui.mg.servers.set("acme", smtp_doc(relay.port, method="password", username=relay_config.username,
                                                 password="the wrong password"))  # fmt: skip
        b = await ui.signed_in(ACME)
        page = await b.get("/admin/tenants/acme")
        assert f'name="to" type="email" value="{ACME}"' in page.text
        final = (await _until_done(b, await b.post("/admin/servers/acme/test", {"to": ""},
                                                    headers={"HX-Request": "true"})))[-1]  # fmt: skip
        found = steps(final)
        assert found["auth"] == "failed" and found["mail from"] == "skipped" and found["connect"] == "ok"
        assert "Cause:" in text_of(final) and "Fix:" in text_of(final)
        assert "the wrong password" not in final.text


async def test_without_javascript_the_test_page_shows_the_whole_report(ui: UI) -> None:
    async with serve(ServerConfig()) as relay:
        await ui.mg.servers.set("global", smtp_doc(relay.port))
        b = await ui.signed_in(ADMIN)
        await b.get("/admin/global")
        reply = await b.post("/admin/servers/global/test", {"to": "x@example.com", "dry_run": "on"})
        assert reply.status_code == 200 and "hx-get" not in reply.text
        found = steps(reply)
        assert found["rcpt to"] == "ok" and found["data"] == "skipped" and "failed" not in found.values()
        assert "dry run: RSET instead of DATA" in text_of(reply) and relay.messages == []


async def test_another_admin_cannot_read_a_test_run(ui: UI) -> None:
    async with serve(ServerConfig()) as relay:
        await ui.mg.servers.set("global", smtp_doc(relay.port))
        b = await ui.signed_in(ADMIN)
        await b.get("/admin/global")
        first = await b.post("/admin/servers/global/test", {"to": "x@example.com"}, headers={"HX-Request": "true"})
        url = re.search(r'hx-get="(/admin/tests/[^"]+)"', first.text)
        assert url is not None
        other = await ui.signed_in(ACME)
        assert (await other.get(url.group(1))).status_code == 404
        await _until_done(b, first)


async def test_a_running_test_run_is_never_dropped_to_make_room(ui: UI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are kept for their pages (at most TEST_RUNS_KEPT); finished ones make room, a running
    one never does: a new run waits its turn instead."""
    from mailgate.web import pages

    monkeypatch.setattr(pages, "TEST_RUNS_KEPT", 2)
    async with serve(ServerConfig()) as relay:
        await ui.mg.servers.set("global", smtp_doc(relay.port))
        b = await ui.signed_in(ADMIN)
        await b.get("/admin/global")
        runs: dict[str, pages.TestRun] = {}
        ui.app.state.test_runs = runs
        busy = [pages.TestRun(f"busy{i}", 1, "global", "x@example.com", ()) for i in range(2)]  # still running
        runs.update({r.id: r for r in busy})
        refused = await b.post("/admin/servers/global/test", {"to": "x@example.com"}, headers={"HX-Request": "true"})
        assert refused.status_code == 409 and "2 test e-mails are under way" in text_of(refused)
        assert list(runs) == ["busy0", "busy1"]
        busy[1].error = "finished"  # one is over: it makes room, the running one stays
        first = await b.post("/admin/servers/global/test", {"to": "x@example.com"}, headers={"HX-Request": "true"})
        assert first.status_code == 200
        assert "busy0" in runs and "busy1" not in runs and len(runs) == 2
        await _until_done(b, first)


# ---- delegated consent ---------------------------------------------------------------------------


async def test_connect_runs_the_consent_and_comes_back_to_the_page_showing_the_mailbox(ui: UI) -> None:
    directory, client_id, mailbox = "9188040d-6c67-4c5b-b112-36a304b66dad", "0b5c2d4e-1111-2222-3333-444455556666", \
        "mailer@acme.example"  # fmt: skip
    with FakeIdentityProvider() as idp:
        idp.add_tenant(directory)
        idp.add_app(client_id, "app-secret-value", redirect_uris=("http://127.0.0.1:8000/v1/oauth/callback",))
        b = await ui.signed_in(ACME)
        await b.get("/admin/tenants/acme")
        reply = await b.post("/admin/servers/acme", {
            "enabled": "on", "from_address": mailbox, "kind": "smtp", "smtp.host": "127.0.0.1", "smtp.port": "2525",
            "smtp.security": "none", "auth.method": "oauth2", "auth.username": mailbox,
            "auth.token.grant": "delegated", "auth.token.provider": "microsoft", "auth.token.authority": idp.url,
            "auth.token.directory_id": directory, "auth.token.client_id": client_id,
            "auth.token.client_secret": "app-secret-value", "auth.token.client_auth": "form",
        })  # fmt: skip
        assert reply.status_code == 303, text_of(reply)
        page = await b.get("/admin/tenants/acme")
        assert "Connect with Microsoft 365" in text_of(page) and "Not connected yet" in text_of(page)
        reply = await b.post("/admin/servers/acme/connect")
        assert reply.status_code == 303 and reply.headers["location"].startswith(idp.url)
        redirect, _code = idp.consent(reply.headers["location"], subject=mailbox)
        callback = urlsplit(redirect)
        back = await b.client.get(f"{callback.path}?{callback.query}")  # the browser, with its admin cookie
        assert back.status_code == 303 and back.headers["location"] == "/admin/tenants/acme#consent"
        page = await b.get("/admin/tenants/acme")
        assert f"Connected: {mailbox} now sends the mail of acme." in text_of(page)
        assert f"Connected: {mailbox} , consent given" in text_of(page)
        assert "app-secret-value" not in page.text
        # The consent is the admin's who started it, not the callback's (which has no session of its own).
        consent = next(r for r in await ui.mg.audit_log("acme") if r.action == "server.consent")
        assert consent.actor == f"user:{ACME} (tenant-admin of acme)"
        # Reset asks first, then forgets the tokens.
        assert "Forget the stored tokens?" in text_of(await b.get("/admin/servers/acme/confirm/reset"))
        assert (await b.post("/admin/servers/acme/reset")).status_code == 303
        assert "Not connected yet" in text_of(await b.get("/admin/tenants/acme"))
        info = await ui.mg.servers.get("acme")
        assert info is not None and info.document["auth"]["token"]["refresh_token"] == {"set": False}


async def test_a_refused_consent_comes_back_with_the_reason(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    reply = await b.client.get("/v1/oauth/callback", params={"error": "access_denied",
                                                             "error_description": "The user said no"})  # fmt: skip
    assert reply.status_code == 303 and reply.headers["location"] == "/admin"
    page = await b.get("/admin/global")
    assert "The consent was not given: the account that signed in declined it." in text_of(page)
    assert "The user said no" not in text_of(page)  # the provider's words (anyone can make that link): never shown


async def test_a_notice_cannot_be_forged_with_a_link_or_a_cookie(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    b.client.cookies.set("mailgate_flash", "MVlvdXIgcGFzc3dvcmQgZXhwaXJlZA==.forged", path="/admin")
    assert "password expired" not in text_of(await b.get("/admin/global"))


# ---- message log ---------------------------------------------------------------------------------


async def test_the_message_log_filters_and_a_message_shows_its_attempts(ui: UI) -> None:
    refuse = ServerConfig(rcpt_reply=lambda address, i: "550 5.1.1 no such user" if "gone@" in address else None)
    async with serve(refuse) as relay:
        await ui.mg.servers.set("global", smtp_doc(relay.port))
        ok = await ui.mg.submit("acme", Message(to="alice@example.com", subject="Invitation", text="x"))
        refused = await ui.mg.submit("acme", Message(to="gone@example.com", subject="Password reset", text="x"))
        await ui.mg.submit("globex", Message(to="alice@example.com", subject="Globex alert", text="x"))
        await ui.mg.run_worker(until_idle=True)
    b = await ui.signed_in(ADMIN)
    every = text_of(await b.get("/admin/messages"))
    assert "Invitation" in every and "Password reset" in every and "Globex alert" in every
    by_recipient = text_of(await b.get("/admin/messages", params={"recipient": "ALICE@example.com"}))
    assert "Invitation" in by_recipient and "Globex alert" in by_recipient and "Password reset" not in by_recipient
    failed = text_of(await b.get("/admin/messages", params={"status": "failed", "tenant": "acme"}))
    assert "Password reset" in failed and "Invitation" not in failed
    today = (await ui.mg.queue.get(ok)).summary.created_at.strftime("%Y-%m-%d")
    assert "Invitation" in text_of(await b.get("/admin/messages", params={"since": today, "until": today}))
    assert "Invitation" not in text_of(await b.get("/admin/messages", params={"since": "2999-01-01"}))
    bad = await b.get("/admin/messages", params={"since": "yesterday", "status": "lost"})
    assert bad.status_code == 422 and "'yesterday' is a date: YYYY-MM-DD" in text_of(bad)
    detail = text_of(await b.get(f"/admin/messages/{refused}"))
    assert "550" in detail and "5.1.1" in detail and "no such user" in detail and "Attempt 1" in detail


async def test_retry_and_cancel_from_the_message_page(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    waiting = await ui.mg.submit("acme", Message(to="a@example.com", subject="Wait", text="x"))
    b = await ui.signed_in(ACME)
    page = await b.get(f"/admin/messages/{waiting}")
    assert "Cancel" in text_of(page)
    reply = await b.post(f"/admin/messages/{waiting}/cancel")
    assert reply.status_code == 303
    assert (await ui.mg.queue.get(waiting)).summary.status == "cancelled"
    assert "Cancelled." in text_of(await b.get(f"/admin/messages/{waiting}"))
    again = await b.post(f"/admin/messages/{waiting}/cancel")  # not waiting any more: said, not a crash
    assert again.status_code == 303
    assert "Cancel" not in text_of(await b.get(f"/admin/messages/{waiting}")).replace("Cancelled", "")


# ---- audit log -----------------------------------------------------------------------------------


async def test_the_audit_log_names_the_admin_and_never_a_secret(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    await b.get("/admin/global")
    await b.post("/admin/servers/global", {"enabled": "on", "from_address": "no-reply@example.com", "kind": "smtp",
                                           "smtp.host": "smtp.example.com", "smtp.security": "starttls-required",
                                           "auth.method": "password", "auth.username": "u",
                                           "auth.password": RELAY_PASSWORD})  # fmt: skip
    page = await b.get("/admin/audit")
    assert f"user:{ADMIN} (system-admin)" in text_of(page) and "server.set" in text_of(page)
    assert RELAY_PASSWORD not in page.text


# ---- captured mail (demo) ------------------------------------------------------------------------


async def test_captured_mail_is_shown_rendered_and_its_html_is_sandboxed(ui: UI) -> None:
    async with CaptureServer() as capture:
        ui.app.state.capture = capture
        await ui.mg.servers.set("global", smtp_doc(capture.port))
        await ui.mg.submit("acme", Message(to="a@example.com", subject="Grüße", text="plain words",
                                           html="<p>rich <b>words</b><script>alert(1)</script></p>"))  # fmt: skip
        await ui.mg.run_worker(until_idle=True)
        b = await ui.signed_in(ADMIN)
        listing = await b.get("/admin/captured")
        assert "Grüße" in text_of(listing) and "Captured mail" in text_of(await b.get("/admin/global"))
        one = await b.get("/admin/captured/1")
        assert "plain words" in text_of(one) and '<iframe class="mail-html"' in one.text and " sandbox " in one.text
        assert "<script>" not in one.text
        frame = await b.get("/admin/captured/1/html")
        assert "<b>words</b>" in frame.text
        # Framed by its message's page only: the page's own frame-ancestors stays, in one policy.
        assert frame.headers.get_list("content-security-policy") == [
            "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
        ]
        assert frame.headers["x-frame-options"] == "SAMEORIGIN" and frame.headers["cache-control"] == "no-store"
        acme = await ui.signed_in(ACME)
        assert (await acme.get("/admin/captured")).status_code == 403  # every tenant's mail: system admins only
        assert (await b.get("/admin/captured/99")).status_code == 404


async def test_without_demo_mode_there_is_no_captured_mail(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    assert (await b.get("/admin/captured")).status_code == 404
    assert "Captured mail" not in text_of(await b.get("/admin/global"))


# ---- the page itself -----------------------------------------------------------------------------


async def test_static_files_are_served_and_pages_use_no_inline_script(ui: UI) -> None:
    b = await ui.signed_in(ADMIN)
    for name in ("htmx.min.js", "admin.js", "admin.css"):
        assert (await b.get(f"/admin/static/{name}")).status_code == 200, name
    for url in ("/admin/global", "/admin/tenants", "/admin/messages", "/admin/audit", "/admin/tenants/acme"):
        page = await b.get(url)
        assert page.status_code == 200, url
        assert re.search(r"<script(?![^>]*\ssrc=)[^>]*>", page.text) is None, url
        assert '<meta name="viewport"' in page.text and 'href="#main"' in page.text
