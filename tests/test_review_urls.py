"""Review of the URLs in a mail server document, of what a stored document that no longer parses
does, and of the access token Exchange echoes: against the real HTTP API (`mailgate serve`,
test_hostile's operator), the migrations on SQLite and PostgreSQL, and the fake EWS server.

Each test ran against the code before its fix and failed there: every URL field but ews.url took
a user name and password (https://user:pass@host/…), which httpx sends as Basic credentials of
its own in place of the Authorization mailgate sets, to wherever the URL points; a port past
65535 was saved; a document stored with such a URL did not load after the upgrade; a stored
smtp.host the settings now refuse ('a..b') locked its admin out (422 on reading, switching and
saving a corrected document) and made the system admin's tenant list a 422 page; an access token
Exchange echoed in an error reached the attempt log.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import sqlite3
import subprocess
from typing import Any

import httpx2
import pytest
from sqlalchemy import text

import test_ews
import test_graph
import test_hostile
from conftest import TEST_KEY
from fakes.ews import FakeEWS
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate
from mailgate.db.engine import connect, upgrade
from mailgate.db.engine import database_url as parse_url
from mailgate.settings.document import lookup
from test_ews import MAILBOX, oauth_doc
from test_graph import deliver, note, status
from test_hostile import ADMIN_EMAIL, ADMIN_PASSWORD, Operator, problems, smtp_server, wait_for
from test_serve import MAILGATE

relay = test_hostile.relay
operator = test_hostile.operator
mg = test_graph.mg
idp = test_ews.idp
ews_oauth = test_ews.ews_oauth

OAUTH = {"method": "oauth2", "username": "u@tenant.example"}


def with_url(field: str, url: str) -> dict[str, Any]:
    """A tenant's server document whose `field` is `url` (the other URLs fine)."""
    document = smtp_server("smtp.tenant.example", 587)
    token: dict[str, Any] = {"grant": "client_credentials", "client_id": "c", "client_secret": "s"}
    if field == "auth.token.token_url":
        document["auth"] = {**OAUTH, "token": {**token, "token_url": url}}
    elif field == "auth.token.authority":
        document["auth"] = {**OAUTH, "token": {**token, "provider": "microsoft", "authority": url,
                                               "directory_id": "d"}}  # fmt: skip
    elif field == "auth.token.authorize_url":
        document["auth"] = {**OAUTH, "token": {"grant": "delegated", "client_id": "c", "client_secret": "s",
                                               "token_url": "https://login.tenant.example/token",
                                               "authorize_url": url}}  # fmt: skip
    elif field.startswith("graph."):
        document.pop("smtp")
        document |= {"kind": "graph", "graph": {"directory_id": "d", "client_id": "c", "client_secret": "s",
                                                "mailbox": "no-reply@tenant.example", field[6:]: url}}  # fmt: skip
    else:
        assert field == "ews.url"
        document.pop("smtp")
        document |= {"kind": "ews", "from_address": "no-reply@tenant.example",
                     "auth": {"method": "password", "username": "TENANT\\notify", "password": "pw"},
                     "ews": {"url": url, "mailbox": "no-reply@tenant.example"}}  # fmt: skip
    return document


URL_FIELDS = ["auth.token.token_url", "auth.token.authority", "auth.token.authorize_url", "graph.authority",
              "graph.endpoint", "ews.url"]  # fmt: skip
PATHS = {"auth.token.token_url": "/token", "auth.token.authorize_url": "/authorize", "ews.url": "/EWS/Exchange.asmx"}


@pytest.fixture(scope="module")
def refused(operator: Operator) -> tuple[str, httpx2.Client]:
    """A tenant whose saves the tests below expect refused: (its id, its admin's client)."""
    tenant, admin, _ = operator.tenant()
    return tenant, admin


# ---- 1. no user name or password in a URL; a port is 0-65535 ----------------------------------


def test_every_url_field_is_saved_as_it_is_without_credentials(operator: Operator) -> None:
    """The documents the tests below change are good ones: only the URL makes them refused."""
    tenant, admin, _ = operator.tenant()
    for field in URL_FIELDS:
        reply = admin.put(f"/v1/tenants/{tenant}/server",
                          json=with_url(field, "https://login.tenant.example" + PATHS.get(field, "")))  # fmt: skip
        assert reply.status_code == 200, (field, reply.text)


@pytest.mark.parametrize("userinfo", ["notify:S3cret-in-url@", "notify@", ":S3cret-in-url@"])
@pytest.mark.parametrize("field", URL_FIELDS)
def test_a_url_with_a_user_name_or_password_is_refused_naming_its_field(
    refused: tuple[str, httpx2.Client], field: str, userinfo: str
) -> None:
    tenant, admin = refused
    url = f"https://{userinfo}login.tenant.example" + PATHS.get(field, "")
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=with_url(field, url))
    assert reply.status_code == 422, reply.text
    assert list(problems(reply)) == [field] and "user name or password" in problems(reply)[field], reply.text
    assert "S3cret-in-url" not in reply.text  # the refusal does not repeat a password
    assert admin.get(f"/v1/tenants/{tenant}/server").status_code == 404  # nothing was saved


@pytest.mark.parametrize("port", ["99999", "65536", "8o"])
@pytest.mark.parametrize("field", URL_FIELDS)
def test_a_url_whose_port_is_not_0_to_65535_is_refused_naming_its_field(
    refused: tuple[str, httpx2.Client], field: str, port: str
) -> None:
    tenant, admin = refused
    url = f"https://login.tenant.example:{port}" + PATHS.get(field, "")
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=with_url(field, url))
    assert reply.status_code == 422, reply.text
    assert list(problems(reply)) == [field] and "port" in problems(reply)[field], reply.text


# ---- 2. migration 0013: stored URLs lose their user names and passwords -----------------------

TOKEN = {"grant": "client_credentials", "provider": "generic", "client_id": "c"}
STORED = {
    "global": {"kind": "smtp", "from_address": "no-reply@operator.example",
               "smtp": {"host": "smtp.operator.example", "port": 587},
               "auth": {**OAUTH, "token": {**TOKEN, "token_url": "https://notify:S3cret@login.example/oauth2/token"}}},
    "acme": {"kind": "graph", "from_address": "no-reply@acme.example",
             "graph": {"authority": "https://u:p@login.microsoftonline.com", "endpoint": "https://u@graph.microsoft.com",
                       "directory_id": "d", "client_id": "c", "mailbox": "no-reply@acme.example"}},
    "globex": {"kind": "ews", "from_address": "no-reply@globex.example",
               "auth": {"method": "password", "username": "GLOBEX\\notify"},
               "ews": {"url": "https://GLOBEX%5Cnotify:pw@mail.globex.example:8443/EWS/Exchange.asmx",
                       "mailbox": "no-reply@globex.example"}},
    "initech": {"kind": "smtp", "from_address": "no-reply@initech.example",
                "smtp": {"host": "smtp.initech.example"},
                "auth": {**OAUTH, "token": {**TOKEN, "grant": "delegated", "token_url": "https://login.example/token",
                                            "authorize_url": "https://a:b@login.example/authorize"}}},
    "hooli": {"kind": "smtp", "from_address": "no-reply@hooli.example", "smtp": {"host": "smtp.hooli.example"},
              "auth": {**OAUTH, "token": {**TOKEN, "provider": "microsoft", "authority": "https://x@login.example",
                                          "directory_id": "d", "token_url": None}}},
    "umbrella": {"kind": "smtp", "from_address": "no-reply@umbrella.example",  # nothing to change
                 "smtp": {"host": "smtp.umbrella.example"},
                 "auth": {**OAUTH, "token": {**TOKEN, "token_url": "https://login.example/user@x/token"}}},
}  # fmt: skip
MIGRATED = {
    ("global", "auth.token.token_url"): "https://login.example/oauth2/token",
    ("acme", "graph.authority"): "https://login.microsoftonline.com",
    ("acme", "graph.endpoint"): "https://graph.microsoft.com",
    ("globex", "ews.url"): "https://mail.globex.example:8443/EWS/Exchange.asmx",
    ("initech", "auth.token.authorize_url"): "https://login.example/authorize",
    ("initech", "auth.token.token_url"): "https://login.example/token",
    ("hooli", "auth.token.authority"): "https://login.example",
    ("umbrella", "auth.token.token_url"): "https://login.example/user@x/token",  # an @ in the path stays
}


async def test_stored_urls_with_a_user_name_or_password_lose_them_in_the_upgrade(database_url: str) -> None:
    db = connect(parse_url(database_url))
    try:
        await upgrade(db, "0012")
        async with db.engine.begin() as conn:
            for scope, document in STORED.items():
                if scope != "global":
                    await conn.execute(
                        text("INSERT INTO tenants (id, name, may_use_own_server, may_set_support_address, created_at, "
                             "updated_at) VALUES (:id, :id, true, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                        {"id": scope},
                    )  # fmt: skip
                await conn.execute(
                    text("INSERT INTO mail_servers (scope, tenant_id, enabled, document, version, created_at, "
                         "updated_at, updated_by) VALUES (:scope, :tenant, true, :doc, 1, CURRENT_TIMESTAMP, "
                         "CURRENT_TIMESTAMP, 'old')"),
                    {"scope": scope, "tenant": None if scope == "global" else scope, "doc": json.dumps(document)},
                )  # fmt: skip
        await upgrade(db)
    finally:
        await db.dispose()
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        for (scope, path), url in MIGRATED.items():
            server = await mg.servers.with_secrets(scope)  # loads: the settings refuse none of its URLs
            assert server is not None
            model, name = lookup(server, path)
            assert getattr(model, name) == url, (scope, path)
        for scope in STORED:
            info = await mg.servers.get(scope)
            assert info is not None and "S3cret" not in json.dumps(info.document)
            expected = (1, "old") if scope == "umbrella" else (2, "mailgate upgrade (0013)")
            assert (info.version, info.updated_by) == expected, scope


# ---- 4. the OAuth2 access token Exchange echoes ---------------------------------------------------


async def test_the_access_token_exchange_echoes_is_redacted(
    idp: FakeIdentityProvider, ews_oauth: FakeEWS, mg: Mailgate
) -> None:
    await mg.servers.set("global", oauth_doc(idp, ews_oauth))
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "sent"
    token = ews_oauth.requests[-1].headers["authorization"].removeprefix("Bearer ")
    ews_oauth.fail_next("ErrorInvalidRecipients", operation="CreateItem",
                        text=f"{MAILBOX} may not send with the token {token} (Bearer {token})")  # fmt: skip
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "failed"
    assert len(idp.token_requests) == 1  # the same token: the one Exchange echoed is the one in use
    text = (await mg.queue.get(pk)).attempts[-1]["text"]
    assert "ErrorInvalidRecipients" in text and MAILBOX in text  # the rest of Exchange's text is kept
    assert token not in text and token[:40] not in text and text.count("[redacted]") == 2, text


# ---- 3. a stored document this version refuses ----------------------------------------------------


def signed_in(operator: Operator) -> httpx2.Client:
    """A browser signed in to the admin pages as a system admin."""
    subprocess.run([MAILGATE, "users", "create", ADMIN_EMAIL, "--role", "system-admin", "--password-stdin"],
                   cwd=operator.served.cwd, env=operator.served.env, input=ADMIN_PASSWORD, capture_output=True,
                   text=True, timeout=60, check=True)  # fmt: skip
    browser = httpx2.Client(base_url=operator.served.url, timeout=30)
    page = browser.get("/admin/login")
    token = html.unescape(re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1))  # type: ignore[union-attr]
    reply = browser.post("/admin/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token})
    assert reply.status_code == 303, reply.text
    return browser


def test_a_stored_host_that_can_not_be_a_dns_name_makes_only_its_tenants_mail_wait(operator: Operator) -> None:
    """A document saved before smtp.host refused 'a..b' no longer loads: before this, its tenant's
    admin could not read it (422), nor save a corrected one (422 for the stored host), nor switch
    it off; the system admin's list of every tenant was a 422 page; and then its new mail was
    refused (409) instead of held until the settings are saved again."""
    tenant, admin, sender = operator.tenant()
    _, _, other = operator.tenant()
    document = {**smtp_server("smtp.tenant.example", 587),
                "auth": {"method": "password", "username": "notify", "password": "stored-Pa55"}}  # fmt: skip
    assert admin.put(f"/v1/tenants/{tenant}/server", json=document).status_code == 200
    with contextlib.closing(sqlite3.connect(operator.served.cwd / "mailgate.db")) as db, db:
        db.execute("UPDATE mail_servers SET document = json_set(document, '$.smtp.host', 'a..b') WHERE scope = ?",
                   (tenant,))  # fmt: skip
    message = {"to": ["bob@example.org"], "subject": "s", "text": "t"}
    # Kept and held (nothing the sender did; a save releases it), not refused.
    held = wait_for(lambda: (r := sender.post("/v1/messages", json=message)).json().get("status") == "held" and r,
                    "held")  # fmt: skip
    assert held.status_code == 202, held.text
    held_url = held.headers["location"]

    shown = admin.get(f"/v1/tenants/{tenant}/server")  # as stored, to be corrected
    assert shown.status_code == 200, shown.text
    assert shown.json()["server"]["smtp"]["host"] == "a..b" and shown.json()["server"]["auth"]["password"] == {
        "set": True}  # fmt: skip
    assert admin.get(f"/v1/tenants/{tenant}/server/health").status_code == 200
    assert admin.post(f"/v1/tenants/{tenant}/server/disable").status_code == 200
    assert admin.post(f"/v1/tenants/{tenant}/server/enable").status_code == 200
    with contextlib.closing(signed_in(operator)) as browser:
        for path in ("/admin/tenants", f"/admin/tenants/{tenant}", f"/admin/tenants/{tenant}/support"):
            page = browser.get(path)
            assert page.status_code == 200, (path, page.text)
        assert "do not load" in browser.get(f"/admin/tenants/{tenant}").text

    reply = other.post("/v1/messages", json=message)  # the other tenants send as before
    url = reply.headers["location"]
    wait_for(lambda: other.get(url).json()["status"] == "sent", "the other tenant's message was not sent")

    document["smtp"]["host"] = "smtp2.tenant.example"
    kept = {**document, "auth": {**document["auth"], "password": {"set": True}}}
    again = admin.put(f"/v1/tenants/{tenant}/server", json=kept)  # its destination is not known: not kept
    assert again.status_code == 422 and "give it again" in problems(again)["auth.password"], again.text
    fixed = admin.put(f"/v1/tenants/{tenant}/server", json=document)
    assert fixed.status_code == 200, fixed.text
    assert wait_for(lambda: (r := sender.post("/v1/messages", json=message)).json().get("status") == "queued" and r,
                    "held")  # fmt: skip
    wait_for(lambda: sender.get(held_url).json()["status"] != "held", "the held message was not released")
