"""Tests of the HTTP fakes themselves (tests/fakes): the fake identity provider (Microsoft Entra ID
v2.0 and Google style token endpoints) and the fake Microsoft Graph mail API.

They drive the fakes with plain `urllib.request` and check every documented reply and error, so a
fake that silently accepts what the real service refuses (or answers in the wrong shape) fails here
before it can make a client test pass for the wrong reason.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest

from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider, pkce_challenge

TENANT = "6f1c2a8e-0b7d-4c1e-9a55-3d2b8f7e4c10"
APP = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
SECRET = "Zq8~a+b/c=d%e&f g"  # needs form-urlencoding: "+", "/", "=", "%", "&", " "
PUBLIC = "public-client"
SEND_ONLY = "send-only-app"
NO_ROLES = "no-roles-app"
REDIRECT = "http://localhost:8765/callback"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
EXO_SCOPE = "https://outlook.office365.com/.default"
SMTP_SEND = "https://outlook.office.com/SMTP.Send"
GMAIL_SCOPE = "https://mail.google.com/"
FORM = "application/x-www-form-urlencoded"
MAILBOX = "mailbox@contoso.com"
ALIAS = "alias@contoso.com"  # Send As
BOSS = "boss@contoso.com"  # Send on Behalf
ONPREM = "onprem@contoso.com"
AADSTS_DESCRIPTION = re.compile(
    r"^AADSTS(\d+): .+\r\nTrace ID: [0-9a-f-]{36}\r\nCorrelation ID: [0-9a-f-]{36}\r\n"
    r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$",
    re.DOTALL,
)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def form_post(url: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> Reply:
    return call(
        "POST", url, data=urllib.parse.urlencode(fields).encode(), headers={"Content-Type": FORM, **(headers or {})}
    )


def ms_url(idp: FakeIdentityProvider, tenant: str = TENANT) -> str:
    return f"{idp.url}/{tenant}/oauth2/v2.0/token"


def basic(client_id: str, secret: str) -> str:
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def app_token(idp: FakeIdentityProvider, client_id: str = APP, scope: str = GRAPH_SCOPE) -> str:
    reply = form_post(
        ms_url(idp),
        {"grant_type": "client_credentials", "client_id": client_id, "client_secret": SECRET, "scope": scope},
    )
    assert reply.status == 200, reply.body
    token: str = reply.json()["access_token"]
    return token


def assert_aadsts(reply: Reply, status: int, error: str, code: int) -> str:
    """The reply is Microsoft's token error JSON with exactly the documented keys; returns the description."""
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    body = reply.json()
    assert set(body) == {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert body["error"] == error
    assert body["error_codes"] == [code]
    match = AADSTS_DESCRIPTION.match(body["error_description"])
    assert match is not None and int(match.group(1)) == code, body["error_description"]
    assert body["trace_id"] in body["error_description"] and body["correlation_id"] in body["error_description"]
    assert body["error_uri"] == f"https://login.microsoftonline.com/error?code={code}"
    description: str = body["error_description"]
    return description


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT)
        fake.add_app(APP, SECRET, roles=("Mail.Send", "Mail.ReadWrite"), redirect_uris=(REDIRECT,))
        fake.add_app(SEND_ONLY, SECRET, roles=("Mail.Send",))
        fake.add_app(NO_ROLES, SECRET)
        fake.add_app(PUBLIC, None, redirect_uris=(REDIRECT,))
        yield fake
        assert fake.errors == []


@pytest.fixture
def graph(idp: FakeIdentityProvider) -> Iterator[FakeGraph]:
    with FakeGraph(idp) as fake:
        fake.add_mailbox(MAILBOX, send_as=(ALIAS,), send_on_behalf=(BOSS,))
        fake.add_mailbox(ONPREM, rest_enabled=False)
        yield fake
        assert fake.errors == []


# ---- identity: client credentials ----------------------------------------------------------


def test_client_credentials_with_form_secret(idp: FakeIdentityProvider) -> None:
    reply = form_post(
        ms_url(idp),
        {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": EXO_SCOPE},
    )
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    body = reply.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}  # never a refresh_token
    assert body["token_type"] == "Bearer" and body["expires_in"] == body["ext_expires_in"] == 3599
    token = body["access_token"]
    assert 1300 < len(token) < 1700 and token.count(".") == 2
    assert claims(token)["aud"] == "https://outlook.office365.com"
    assert claims(token)["tid"] == TENANT and claims(token)["appid"] == APP
    assert claims(token)["roles"] == ["Mail.Send", "Mail.ReadWrite"] and "scp" not in claims(token)
    issued = idp.check(token)
    assert issued is not None and issued.subject is None and issued.grant == "client_credentials"
    assert issued.audience == "https://outlook.office365.com" and issued.roles == ("Mail.Send", "Mail.ReadWrite")
    (recorded,) = idp.token_requests
    assert recorded.client_auth == "form" and recorded.form is not None and recorded.form["client_secret"] == SECRET
    assert recorded.status == 200 and recorded.headers["content-type"] == FORM


def test_client_credentials_with_basic_auth_needs_form_urlencoded_credentials(idp: FakeIdentityProvider) -> None:
    fields = {"grant_type": "client_credentials", "scope": GRAPH_SCOPE}
    ok = form_post(ms_url(idp), fields, {"Authorization": basic(APP, SECRET)})
    assert ok.status == 200 and idp.check(ok.json()["access_token"]) is not None
    assert idp.token_requests[-1].client_auth == "basic"
    raw = "Basic " + base64.b64encode(f"{APP}:{SECRET}".encode()).decode()  # RFC 6749 §2.3.1 says: quote first
    assert_aadsts(form_post(ms_url(idp), fields, {"Authorization": raw}), 401, "invalid_client", 7000215)


def test_basic_auth_plus_client_secret_in_the_form_is_refused(idp: FakeIdentityProvider) -> None:
    reply = form_post(
        ms_url(idp),
        {"grant_type": "client_credentials", "client_secret": SECRET, "scope": GRAPH_SCOPE},
        {"Authorization": basic(APP, SECRET)},
    )
    assert "multiple client authentication methods" in assert_aadsts(reply, 400, "invalid_request", 90023)


@pytest.mark.parametrize(
    ("setup", "tenant", "fields", "status", "error", "code"),
    [
        (None, "no-such-tenant", {}, 400, "invalid_request", 90002),
        (None, TENANT, {"client_id": "unknown-app"}, 400, "unauthorized_client", 700016),
        (None, TENANT, {"client_secret": "secret-id-not-value"}, 401, "invalid_client", 7000215),
        (None, TENANT, {"client_secret": ""}, 401, "invalid_client", 7000218),
        (lambda idp: idp.revoke_secret(APP), TENANT, {}, 401, "invalid_client", 7000215),
        (lambda idp: idp.add_app(APP, SECRET, secret_expired=True), TENANT, {}, 401, "invalid_client", 7000222),
        (lambda idp: idp.add_app(APP, SECRET, directory_id="other"), TENANT, {}, 400, "unauthorized_client", 700016),
        (None, TENANT, {"client_id": PUBLIC, "client_secret": "x"}, 401, "invalid_client", 700025),
        (None, TENANT, {"scope": "https://graph.microsoft.com/Mail.Send"}, 400, "invalid_scope", 1002012),
        (None, TENANT, {"scope": f"{GRAPH_SCOPE} {EXO_SCOPE}"}, 400, "invalid_scope", 700022),
        (None, TENANT, {"scope": "https://outlook.office.con/.default"}, 400, "invalid_resource", 500011),
        (None, TENANT, {"scope": ""}, 400, "invalid_request", 900144),
        (None, TENANT, {"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
    ],
    ids=[
        "unknown-tenant",
        "unknown-client",
        "wrong-secret",
        "no-secret",
        "revoked-secret",
        "expired-secret",
        "app-of-another-tenant",
        "secret-from-public-client",
        "delegated-scope",
        "two-resources",
        "unknown-resource",
        "no-scope",
        "unsupported-grant",
    ],
)
def test_microsoft_token_errors(
    idp: FakeIdentityProvider,
    setup: Callable[[FakeIdentityProvider], None] | None,
    tenant: str,
    fields: dict[str, str],
    status: int,
    error: str,
    code: int,
) -> None:
    if setup is not None:
        setup(idp)
    base = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": GRAPH_SCOPE}
    reply = form_post(ms_url(idp, tenant), {k: v for k, v in {**base, **fields}.items() if v != ""})
    assert_aadsts(reply, status, error, code)
    assert idp.issued == {}


def test_token_request_must_be_a_form_post(idp: FakeIdentityProvider) -> None:
    fields = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": GRAPH_SCOPE}
    as_json = call("POST", ms_url(idp), data=json.dumps(fields).encode(), headers={"Content-Type": "application/json"})
    assert "'grant_type'" in assert_aadsts(as_json, 400, "invalid_request", 900144)
    get = call("GET", ms_url(idp))
    assert get.headers["allow"] == "POST"
    assert_aadsts(get, 405, "invalid_request", 900561)
    duplicated = call(
        "POST", ms_url(idp), data=b"grant_type=client_credentials&scope=a&scope=b", headers={"Content-Type": FORM}
    )
    assert_aadsts(duplicated, 400, "invalid_request", 9000411)
    assert idp.issued == {}


def test_correlation_id_echoes_client_request_id(idp: FakeIdentityProvider) -> None:
    correlation = "0f8fad5b-d9cb-469f-a165-70867728950e"
    reply = form_post(ms_url(idp, "nope"), {"grant_type": "client_credentials"}, {"client-request-id": correlation})
    assert reply.json()["correlation_id"] == correlation


def test_google_token_errors(idp: FakeIdentityProvider) -> None:
    url = f"{idp.url}/token"
    idp.add_refresh_token("g-refresh", client_id=APP, subject="user@gmail.com", scope=GMAIL_SCOPE)
    refresh = {"grant_type": "refresh_token", "refresh_token": "g-refresh", "client_id": APP, "client_secret": SECRET}
    cases = [
        (
            {"client_id": "nope"},
            401,
            {"error": "invalid_client", "error_description": "The OAuth client was not found."},
        ),
        ({"client_secret": "wrong"}, 401, {"error": "unauthorized_client", "error_description": "Unauthorized"}),
        (
            {"refresh_token": "unknown"},
            400,
            {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
        ),
        (
            {"grant_type": "client_credentials"},
            400,
            {"error": "unsupported_grant_type", "error_description": "Invalid grant_type: client_credentials"},
        ),
    ]
    for change, status, expected in cases:
        reply = form_post(url, {**refresh, **change})
        assert (reply.status, reply.json()) == (status, expected), change
    idp.revoke_refresh_token("g-refresh")
    revoked = form_post(url, refresh)
    assert (revoked.status, revoked.json()["error_description"]) == (400, "Token has been expired or revoked.")
    assert idp.issued == {}


# ---- identity: refresh tokens -----------------------------------------------------------------


def test_microsoft_refresh_rotates_and_old_token_stays_valid(idp: FakeIdentityProvider) -> None:
    idp.add_refresh_token("rt-1", client_id=PUBLIC, subject=MAILBOX, scope=f"{SMTP_SEND} offline_access", rotate=True)
    fields = {
        "grant_type": "refresh_token",
        "client_id": PUBLIC,
        "refresh_token": "rt-1",
        "scope": f"{SMTP_SEND} offline_access",
    }
    first = form_post(ms_url(idp), fields)
    assert first.status == 200, first.body
    body = first.json()
    assert body["scope"] == SMTP_SEND and body["refresh_token"] not in ("", "rt-1")
    assert idp.token_requests[-1].client_auth == "none"
    issued = idp.check(body["access_token"])
    assert issued is not None and issued.subject == MAILBOX and issued.scopes == ("SMTP.Send",)
    assert issued.audience == "https://outlook.office.com" and issued.roles == ()
    assert claims(body["access_token"])["scp"] == "SMTP.Send" and claims(body["access_token"])["upn"] == MAILBOX
    rotated = form_post(ms_url(idp), {**fields, "refresh_token": body["refresh_token"]})
    assert rotated.status == 200 and rotated.json()["refresh_token"] != body["refresh_token"]
    assert form_post(ms_url(idp), fields).status == 200  # Microsoft does not revoke the old one
    assert_aadsts(form_post(ms_url(idp), {**fields, "scope": " "}), 400, "invalid_request", 900144)
    not_granted = {**fields, "scope": "https://graph.microsoft.com/Mail.Send"}
    assert_aadsts(form_post(ms_url(idp), not_granted), 400, "invalid_grant", 65001)
    assert_aadsts(
        form_post(ms_url(idp), {**fields, "client_id": APP, "client_secret": SECRET}), 400, "invalid_grant", 70000
    )
    idp.revoke_refresh_token("rt-1")
    assert_aadsts(form_post(ms_url(idp), fields), 400, "invalid_grant", 70008)


def test_google_refresh_without_rotation(idp: FakeIdentityProvider) -> None:
    idp.add_refresh_token("1//0g", client_id=APP, subject="user@example.com", scope=GMAIL_SCOPE)
    fields = {"grant_type": "refresh_token", "client_id": APP, "client_secret": SECRET, "refresh_token": "1//0g"}
    reply = form_post(f"{idp.url}/token", fields)
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert body["scope"] == GMAIL_SCOPE and body["token_type"] == "Bearer"
    issued = idp.check(body["access_token"])
    assert issued is not None and issued.subject == "user@example.com" and issued.scopes == (GMAIL_SCOPE,)
    assert issued.directory_id is None and issued.audience == APP
    basic_reply = form_post(
        f"{idp.url}/token",
        {"grant_type": "refresh_token", "refresh_token": "1//0g"},
        {"Authorization": basic(APP, SECRET)},
    )
    assert basic_reply.status == 200 and idp.token_requests[-1].client_auth == "basic"


# ---- identity: authorization code + PKCE -----------------------------------------------------


def authorize_url(idp: FakeIdentityProvider, verifier: str, **overrides: str) -> str:
    query = {
        "client_id": PUBLIC,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": f"{SMTP_SEND} offline_access",
        "state": "st4te",
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
        **overrides,
    }
    path = overrides.pop("path", f"/{TENANT}/oauth2/v2.0/authorize")
    query.pop("path", None)
    return f"{idp.url}{path}?{urllib.parse.urlencode(query)}"


def test_authorization_code_with_pkce(idp: FakeIdentityProvider) -> None:
    verifier = secrets.token_urlsafe(48)
    redirect, code = idp.consent(authorize_url(idp, verifier), subject=MAILBOX)
    assert redirect.startswith(REDIRECT + "?")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(redirect).query) == {"code": [code], "state": ["st4te"]}
    redeem = {
        "grant_type": "authorization_code",
        "client_id": PUBLIC,
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    assert_aadsts(
        form_post(ms_url(idp), {**redeem, "code_verifier": secrets.token_urlsafe(48)}), 400, "invalid_grant", 501481
    )
    assert_aadsts(form_post(ms_url(idp), {**redeem, "redirect_uri": REDIRECT + "/"}), 400, "invalid_grant", 500112)
    without_verifier = {k: v for k, v in redeem.items() if k != "code_verifier"}
    assert_aadsts(form_post(ms_url(idp), without_verifier), 400, "invalid_grant", 50148)
    assert_aadsts(form_post(ms_url(idp), {**redeem, "code": "1.AQunknown"}), 400, "invalid_grant", 70008)
    reply = form_post(ms_url(idp), redeem)  # failed attempts do not burn the code
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["scope"] == SMTP_SEND and body["refresh_token"]
    issued = idp.check(body["access_token"])
    assert issued is not None and issued.subject == MAILBOX and issued.grant == "authorization_code"
    assert_aadsts(form_post(ms_url(idp), redeem), 400, "invalid_grant", 54005)  # single use
    refreshed = form_post(
        ms_url(idp),
        {
            "grant_type": "refresh_token",
            "client_id": PUBLIC,
            "refresh_token": body["refresh_token"],
            "scope": SMTP_SEND,
        },
    )
    assert refreshed.status == 200 and refreshed.json()["refresh_token"]  # codes mint rotating refresh tokens


def test_authorization_code_without_offline_access_gets_no_refresh_token(idp: FakeIdentityProvider) -> None:
    verifier = secrets.token_urlsafe(32)
    _, code = idp.consent(authorize_url(idp, verifier, scope=SMTP_SEND), subject=MAILBOX)
    reply = form_post(
        ms_url(idp),
        {
            "grant_type": "authorization_code",
            "client_id": PUBLIC,
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert reply.status == 200 and "refresh_token" not in reply.json()


def test_google_authorization_code(idp: FakeIdentityProvider) -> None:
    verifier = secrets.token_urlsafe(48)
    url = authorize_url(idp, verifier, client_id=APP, scope=GMAIL_SCOPE, path="/o/oauth2/v2/auth")
    _, code = idp.consent(url, subject="user@gmail.com")
    redeem = {
        "grant_type": "authorization_code",
        "client_id": APP,
        "client_secret": SECRET,
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    mismatch = form_post(f"{idp.url}/token", {**redeem, "redirect_uri": "http://localhost:1/other"})
    assert (mismatch.status, mismatch.json()["error"]) == (400, "redirect_uri_mismatch")
    bad = form_post(f"{idp.url}/token", {**redeem, "code_verifier": "x" * 43})
    assert bad.json() == {"error": "invalid_grant", "error_description": "Invalid code verifier."}
    reply = form_post(f"{idp.url}/token", redeem)
    assert reply.status == 200
    assert set(reply.json()) == {"access_token", "expires_in", "scope", "token_type", "refresh_token"}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"redirect_uri": "http://localhost:8765/other"}, "AADSTS50011"),
        ({"client_id": "unknown"}, "AADSTS700016"),
        ({"response_type": "token"}, "response_type"),
        ({"state": ""}, "state"),
        ({"scope": " "}, "scope"),
        ({"code_challenge": "short"}, "code_challenge"),
        ({"code_challenge_method": "plain"}, "code_challenge_method"),
        ({"path": "/other-tenant/oauth2/v2.0/authorize"}, "AADSTS90002"),
        ({"path": "/oauth2/authorize"}, "authorize path"),
    ],
)
def test_consent_validates_the_authorize_url(idp: FakeIdentityProvider, overrides: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        idp.consent(authorize_url(idp, secrets.token_urlsafe(32), **overrides), subject=MAILBOX)


# ---- identity: expiry, failures, delay, connections -----------------------------------------


def test_check_honours_token_lifetime(idp: FakeIdentityProvider) -> None:
    idp.token_lifetime = 1
    reply = form_post(
        ms_url(idp),
        {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": GRAPH_SCOPE},
    )
    token = reply.json()["access_token"]
    assert reply.json()["expires_in"] == 1 and idp.check(token) is not None
    time.sleep(1.1)
    assert idp.check(token) is None
    assert idp.lookup(token) is not None and idp.check("not-a-token") is None


def test_fail_next_answers_transient_errors_then_recovers(idp: FakeIdentityProvider) -> None:
    idp.fail_next(2)
    fields = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": GRAPH_SCOPE}
    for _ in range(2):
        assert_aadsts(form_post(ms_url(idp), fields), 503, "temporarily_unavailable", 90024)
    assert form_post(ms_url(idp), fields).status == 200
    assert [r.status for r in idp.token_requests] == [503, 503, 200]
    assert all(r.client_auth == "form" for r in idp.token_requests)
    idp.fail_next(1, status=500, error="server_error", aadsts=None)
    failed = form_post(f"{idp.url}/token", {"grant_type": "refresh_token"})
    assert (failed.status, failed.json()["error"]) == (500, "server_error")


def test_delay_holds_each_token_request(idp: FakeIdentityProvider) -> None:
    idp.delay = 0.3
    started = time.monotonic()
    form_post(ms_url(idp), {"grant_type": "client_credentials"})
    assert time.monotonic() - started >= 0.3


def test_keep_alive_and_close_with_an_idle_connection_open(idp: FakeIdentityProvider) -> None:
    host, port = urllib.parse.urlsplit(idp.url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        for _ in range(2):
            connection.request(
                "POST", f"/{TENANT}/oauth2/v2.0/token", body=b"grant_type=x", headers={"Content-Type": FORM}
            )
            response = connection.getresponse()
            assert response.status == 400 and response.getheader("Content-Length") == str(len(response.read()))
        started = time.monotonic()
        idp.close()  # the idle keep-alive connection must not hold the shutdown
        assert time.monotonic() - started < 2
    finally:
        connection.close()


# ---- graph ------------------------------------------------------------------------------------


def graph_call(
    graph: FakeGraph,
    path: str,
    token: str | None,
    *,
    body: Any = None,
    data: bytes | None = None,
    content_type: str = "application/json",
    method: str = "POST",
) -> Reply:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = json.dumps(body).encode() if body is not None else data
    return call(method, f"{graph.url}{path}", data=payload, headers=headers)


def assert_graph_error(reply: Reply, status: int, code: str, message: str | None = None) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"code", "message", "innerError"}
    assert error["code"] == code, error
    assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
    if message is not None:
        assert error["message"].startswith(message), error["message"]


def recipient(address: str) -> dict[str, Any]:
    return {"emailAddress": {"address": address}}


def json_message(**extra: Any) -> dict[str, Any]:
    return {
        "subject": "Invoice",
        "body": {"contentType": "HTML", "content": "<p>hi</p>"},
        "toRecipients": [recipient("to@example.com")],
        **extra,
    }


SEND = f"/v1.0/users/{MAILBOX}/sendMail"


def mime_message(*, from_: str = MAILBOX, to: str = "to@example.com", sender: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = from_
    message["To"] = to
    message["Cc"] = "cc@example.com"
    message["Bcc"] = "bcc@example.com"
    if sender is not None:
        message["Sender"] = sender
    message["Subject"] = "Report ✓"
    message.set_content("plain")
    message.add_alternative("<p><img src='cid:logo@x'></p>", subtype="html")
    html = message.get_body(preferencelist=("html",))
    assert isinstance(html, EmailMessage)
    html.add_related(b"\x89PNG", maintype="image", subtype="png", cid="<logo@x>")
    message.add_attachment(b"%PDF-1.7", maintype="application", subtype="pdf", filename="report.pdf")
    return message


def test_mime_send_parses_recipients_and_attachments(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    token = app_token(idp)
    encoded = base64.encodebytes(mime_message().as_bytes())  # base64 with newlines is accepted
    reply = graph_call(graph, SEND, token, data=encoded, content_type="text/plain")
    assert (reply.status, reply.body, reply.headers["content-length"]) == (202, b"", "0")
    (mail,) = graph.sent
    assert mail.via == "mime" and mail.mailbox == MAILBOX and mail.from_ == MAILBOX and mail.sender is None
    assert (mail.to, mail.cc, mail.bcc) == (["to@example.com"], ["cc@example.com"], ["bcc@example.com"])
    assert mail.subject == "Report ✓" and mail.save_to_sent_items and mail.json is None
    assert mail.attachments == [
        ("", "image/png", b"\x89PNG", True, "logo@x"),
        ("report.pdf", "application/pdf", b"%PDF-1.7", False, None),
    ]
    assert ("Subject", "Report ✓") in mail.internet_message_headers
    assert graph.requests[-1].headers["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not base64 at all!", "ErrorMimeContentInvalidBase64String"),
        (base64.b64encode(b'{"message": {}}'), "ErrorMimeContentInvalidBase64String"),
        (base64.b64encode(b"From: mailbox@contoso.com\r\nSubject: x\r\n\r\nbody"), "ErrorInvalidRecipients"),
        (base64.b64encode(b"From: mailbox@contoso.com\r\nTo: a@x; b@y\r\n\r\nbody"), "ErrorInvalidRecipients"),
    ],
    ids=["bad-base64", "not-a-message", "no-recipients", "bad-recipient"],
)
def test_mime_send_errors(idp: FakeIdentityProvider, graph: FakeGraph, data: bytes, code: str) -> None:
    assert_graph_error(graph_call(graph, SEND, app_token(idp), data=data, content_type="text/plain"), 400, code)
    assert graph.sent == []


def test_json_send(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    message = json_message(
        ccRecipients=[{"emailAddress": {"address": "cc@example.com", "name": "C C"}}],
        bccRecipients=[recipient("bcc@example.com")],
        replyTo=[recipient("reply@example.com")],
        importance="high",
        internetMessageHeaders=[{"name": "X-Mailgate-Id", "value": "42"}],
        attachments=[
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "a.txt",
                "contentType": "text/plain",
                "contentBytes": base64.b64encode(b"hello").decode(),
            },
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "logo.png",
                "contentType": "image/png",
                "contentBytes": base64.b64encode(b"\x89PNG").decode(),
                "isInline": True,
                "contentId": "logo",
            },
        ],
    )
    reply = graph_call(graph, SEND, app_token(idp), body={"message": message, "saveToSentItems": False})
    assert (reply.status, reply.body) == (202, b"")
    (mail,) = graph.sent
    assert mail.via == "json" and mail.json == message and not mail.save_to_sent_items
    assert (mail.to, mail.cc, mail.bcc, mail.reply_to) == (
        ["to@example.com"],
        ["cc@example.com"],
        ["bcc@example.com"],
        ["reply@example.com"],
    )
    assert (mail.subject, mail.body_type, mail.body) == ("Invoice", "html", "<p>hi</p>")
    assert mail.internet_message_headers == [("X-Mailgate-Id", "42")]
    assert mail.attachments == [
        ("a.txt", "text/plain", b"hello", False, None),
        ("logo.png", "image/png", b"\x89PNG", True, "logo"),
    ]


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        ({"message": json_message(), "extra": 1}, "RequestBodyRead", "The parameter 'extra'"),
        ({"message": json_message(flag={})}, "RequestBodyRead", "The property 'flag' does not exist"),
        ({"message": json_message(toRecipients=[recipient("a@x.com; b@y.com")])}, "ErrorInvalidRecipients", None),
        ({"message": json_message(toRecipients=[recipient("a@x.com,b@y.com")])}, "ErrorInvalidRecipients", None),
        ({"message": json_message(toRecipients=[recipient("nobody")])}, "ErrorInvalidRecipients", None),
        ({"message": json_message(toRecipients=[])}, "ErrorInvalidRecipients", "At least one recipient isn't valid."),
        (
            {"message": json_message(toRecipients=[recipient(f"r{i}@example.com") for i in range(501)])},
            "ErrorTooManyRecipients",
            None,
        ),
        (
            {"message": json_message(internetMessageHeaders=[{"name": "List-Unsubscribe", "value": "<x>"}])},
            "InvalidInternetMessageHeader",
            "The internet message header name 'List-Unsubscribe' should start with 'x-' or 'X-'.",
        ),
        ({"message": json_message(body={"contentType": "markdown", "content": ""})}, "RequestBodyRead", None),
        (
            {"message": json_message(attachments=[{"name": "a", "contentBytes": "aGk="}])},
            "RequestBodyRead",
            "The property 'contentBytes' does not exist on type 'microsoft.graph.attachment'",
        ),
        (
            {
                "message": json_message(
                    attachments=[{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a", "contentBytes": "!!"}]
                )
            },
            "RequestBodyRead",
            None,
        ),
    ],
    ids=[
        "extra-parameter",
        "unknown-property",
        "semicolon-list",
        "comma-list",
        "no-at-sign",
        "no-recipients",
        "501-recipients",
        "standard-header",
        "bad-body-type",
        "attachment-without-odata-type",
        "bad-content-bytes",
    ],
)
def test_json_send_errors(
    idp: FakeIdentityProvider, graph: FakeGraph, payload: dict[str, Any], code: str, message: str | None
) -> None:
    assert_graph_error(graph_call(graph, SEND, app_token(idp), body=payload), 400, code, message)
    assert graph.sent == []


@pytest.mark.parametrize(
    ("from_", "sender", "status"),
    [
        (ALIAS, None, 202),
        (ALIAS, ALIAS, 202),
        (ALIAS, MAILBOX, 403),
        (BOSS, MAILBOX, 202),
        (BOSS, None, 202),
        (BOSS, BOSS, 403),
        ("stranger@contoso.com", None, 403),
        (MAILBOX, "stranger@contoso.com", 403),
    ],
)
def test_send_as_and_on_behalf(
    idp: FakeIdentityProvider, graph: FakeGraph, from_: str, sender: str | None, status: int
) -> None:
    token = app_token(idp)
    extra: dict[str, Any] = {"from": recipient(from_)}
    if sender is not None:
        extra["sender"] = recipient(sender)
    json_reply = graph_call(graph, SEND, token, body={"message": json_message(**extra)})
    mime = base64.b64encode(mime_message(from_=from_, sender=sender).as_bytes())
    mime_reply = graph_call(graph, SEND, token, data=mime, content_type="text/plain")
    for reply in (json_reply, mime_reply):
        if status == 403:
            assert_graph_error(
                reply, 403, "ErrorSendAsDenied", "The user account which was used to submit this request"
            )
        else:
            assert reply.status == 202
    assert len(graph.sent) == (2 if status == 202 else 0)


def test_graph_authentication_and_permissions(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    body = {"message": json_message()}
    missing = graph_call(graph, SEND, None, body=body)
    assert_graph_error(missing, 401, "InvalidAuthenticationToken", "Access token is empty.")
    assert missing.headers["www-authenticate"].startswith("Bearer ")
    assert_graph_error(graph_call(graph, SEND, "garbage", body=body), 401, "InvalidAuthenticationToken", "IDX14100")
    wrong_audience = app_token(idp, scope=EXO_SCOPE)
    assert_graph_error(
        graph_call(graph, SEND, wrong_audience, body=body), 401, "InvalidAuthenticationToken", "Invalid audience."
    )
    no_roles = app_token(idp, client_id=NO_ROLES)
    assert_graph_error(graph_call(graph, SEND, no_roles, body=body), 403, "ErrorAccessDenied", "Access is denied.")
    send_only = app_token(idp, client_id=SEND_ONLY)
    assert graph_call(graph, SEND, send_only, body=body).status == 202
    draft = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages", send_only, body=json_message())
    assert_graph_error(draft, 403, "ErrorAccessDenied")  # drafts need Mail.ReadWrite
    me = graph_call(graph, "/v1.0/me/sendMail", send_only, body=body)
    assert_graph_error(me, 400, "BadRequest", "/me request is only valid with delegated authentication flow.")
    assert len(graph.sent) == 1


def test_graph_rejects_an_expired_token(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    idp.token_lifetime = 1
    token = app_token(idp)
    time.sleep(1.1)
    reply = graph_call(graph, SEND, token, body={"message": json_message()})
    assert_graph_error(reply, 401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")


def test_graph_mailbox_resolution(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    token = app_token(idp)
    body = {"message": json_message()}
    unknown = graph_call(graph, "/v1.0/users/ghost@contoso.com/sendMail", token, body=body)
    assert_graph_error(unknown, 404, "ErrorInvalidUser", "The requested user 'ghost@contoso.com' is invalid.")
    onprem = graph_call(graph, f"/v1.0/users/{ONPREM}/sendMail", token, body=body)
    assert_graph_error(
        onprem,
        404,
        "MailboxNotEnabledForRESTAPI",
        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
    )
    encoded = urllib.parse.quote("Mailbox@Contoso.com", safe="")
    assert graph_call(graph, f"/v1.0/users/{encoded}/sendMail", token, body=body).status == 202
    assert graph.sent[-1].mailbox == MAILBOX
    assert_graph_error(graph_call(graph, f"/v1.0/users/{MAILBOX}/calendar", token, body=body), 404, "ResourceNotFound")
    assert_graph_error(graph_call(graph, SEND, token, method="GET"), 405, "MethodNotAllowed")


def test_graph_request_over_4_mb_is_413(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    data = b"A" * (4 * 1024 * 1024 + 4)
    reply = graph_call(graph, SEND, app_token(idp), data=data, content_type="text/plain")
    assert_graph_error(reply, 413, "RequestEntityTooLarge")
    assert graph.sent == []


def test_throttle_next_sends_retry_after(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    token = app_token(idp)
    graph.throttle_next(1, retry_after=7)
    graph.throttle_next(1, status=503, retry_after=None)
    body = {"message": json_message()}
    throttled = graph_call(graph, SEND, token, body=body)
    assert_graph_error(throttled, 429, "ApplicationThrottled")
    assert throttled.headers["retry-after"] == "7"
    unavailable = graph_call(graph, SEND, token, body=body)
    assert_graph_error(unavailable, 503, "ServiceUnavailable")
    assert "retry-after" not in unavailable.headers
    assert graph_call(graph, SEND, token, body=body).status == 202
    assert [r.status for r in graph.requests] == [429, 503, 202]


def test_more_than_four_concurrent_requests_per_mailbox_are_throttled(
    idp: FakeIdentityProvider, graph: FakeGraph
) -> None:
    token = app_token(idp)
    graph.delay = 0.4
    barrier = threading.Barrier(6)
    replies: list[Reply] = []

    def send() -> None:
        barrier.wait(timeout=5)
        replies.append(graph_call(graph, SEND, token, body={"message": json_message()}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(r.status for r in replies) == [202] * 4 + [429] * 2
    assert all(r.headers["retry-after"] == "1" for r in replies if r.status == 429)
    assert graph.max_in_flight[MAILBOX] >= 5 and graph.concurrency_violations == 2


# ---- graph: drafts and upload sessions ------------------------------------------------------


def upload_session(graph: FakeGraph, token: str, draft_id: str, size: int, **extra: Any) -> Reply:
    item = {"attachmentType": "file", "name": "big.bin", "size": size, "contentType": "application/zip", **extra}
    return graph_call(
        graph,
        f"/v1.0/users/{MAILBOX}/messages/{draft_id}/attachments/createUploadSession",
        token,
        body={"AttachmentItem": item},
    )


def put_chunk(url: str, data: bytes, start: int, total: int, headers: dict[str, str] | None = None) -> Reply:
    content_range = f"bytes {start}-{start + len(data) - 1}/{total}"
    all_headers = {"Content-Type": "application/octet-stream", "Content-Range": content_range, **(headers or {})}
    return call("PUT", url, data=data, headers=all_headers)


def create_draft(graph: FakeGraph, token: str, **extra: Any) -> str:
    reply = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages", token, body=json_message(**extra))
    assert reply.status == 201, reply.body
    draft_id: str = reply.json()["id"]
    return draft_id


def test_draft_with_upload_session_in_order(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    token = app_token(idp)
    draft_id = create_draft(graph, token)
    quoted = urllib.parse.quote(draft_id, safe="")
    small = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": "small.txt",
        "contentType": "text/plain",
        "contentBytes": base64.b64encode(b"small").decode(),
    }
    added = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages/{quoted}/attachments", token, body=small)
    assert added.status == 201 and added.json()["size"] == 5
    blob = secrets.token_bytes(5 * 1024 * 1024)
    session = upload_session(graph, token, quoted, len(blob))
    assert session.status == 201
    assert (
        session.json()["@odata.context"] == "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession"
    )
    assert session.json()["nextExpectedRanges"] == ["0-"]
    url = session.json()["uploadUrl"]
    assert url.startswith(f"{graph.url}/upload/") and "?authtoken=" in url
    split = 3_276_800  # 10 x 320 KiB
    first = put_chunk(url, blob[:split], 0, len(blob))
    assert first.status == 200 and first.json()["nextExpectedRanges"] == [str(split)]
    last = put_chunk(url, blob[split:], split, len(blob))
    assert (last.status, last.body) == (201, b"") and "/Attachments('" in last.headers["location"]
    assert [(p.start, p.end, p.total, p.had_authorization) for p in graph.uploads] == [
        (0, split - 1, len(blob), False),
        (split, len(blob) - 1, len(blob), False),
    ]
    sent = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages/{quoted}/send", token, data=b"")
    assert (sent.status, sent.body) == (202, b"")
    (mail,) = graph.sent
    assert mail.via == "draft" and mail.to == ["to@example.com"] and graph.drafts == {}
    assert [(a.name, a.data) for a in mail.attachments] == [("small.txt", b"small"), ("big.bin", blob)]
    again = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages/{quoted}/send", token, data=b"")
    assert_graph_error(again, 404, "ErrorItemNotFound")


def test_upload_session_rejects_misuse(idp: FakeIdentityProvider, graph: FakeGraph) -> None:
    token = app_token(idp)
    draft_id = urllib.parse.quote(create_draft(graph, token), safe="")
    size = 3 * 1024 * 1024 + 10
    assert_graph_error(
        upload_session(graph, token, draft_id, 1024), 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize"
    )
    assert_graph_error(upload_session(graph, token, draft_id, size, unknown=True), 400, "RequestBodyRead")
    extra_key = graph_call(
        graph,
        f"/v1.0/users/{MAILBOX}/messages/{draft_id}/attachments/createUploadSession",
        token,
        body={"AttachmentItem": {"attachmentType": "file", "name": "x", "size": size}, "Extra": 1},
    )
    assert_graph_error(extra_key, 400, "RequestBodyRead")
    url = upload_session(graph, token, draft_id, size).json()["uploadUrl"]
    blob = b"x" * size
    assert_graph_error(put_chunk(url, blob[1000:], 1000, size), 416, "InvalidRange")  # out of order
    assert_graph_error(put_chunk(url, blob[:1000], 0, size + 1), 400, "InvalidRange")  # wrong total
    authorized = put_chunk(url, blob[:1000], 0, size, {"Authorization": f"Bearer {token}"})
    assert_graph_error(authorized, 401, "InvalidAuthenticationToken")
    assert len(graph.upload_violations) == 1
    assert_graph_error(
        put_chunk(url.split("?")[0] + "?authtoken=forged", blob[:1000], 0, size), 401, "InvalidAuthenticationToken"
    )
    assert put_chunk(url, blob[:1000], 0, size).status == 200
    assert_graph_error(put_chunk(url, blob[500:1500], 500, size), 416, "InvalidRange")  # overlap
    incomplete = graph_call(graph, f"/v1.0/users/{MAILBOX}/messages/{draft_id}/send", token, data=b"")
    assert_graph_error(incomplete, 400, "ErrorInvalidRequest", "attachment upload incomplete")
    assert graph.sent == [] and [p.status for p in graph.uploads] == [416, 400, 401, 401, 200, 416]
    assert graph.uploads[2].had_authorization
