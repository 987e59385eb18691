"""Token sources against a fake identity provider on 127.0.0.1 (real HTTP): the presets, client
authentication, the cache (reuse, margin, one request for many senders, backoff), rotation,
every documented refusal, the delegated consent flow, and XOAUTH2 end to end through the outbox
into aiosmtpd checking the tokens."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from conftest import TEST_KEY
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, Message
from mailgate.config import Config
from mailgate.db.models import ServerSecret
from mailgate.errors import NotFound, SettingsError
from mailgate.oauth import TokenCache, TokenError, TokenSource
from mailgate.oauth.cache import smtp_token_source
from mailgate.oauth.consent import challenge_of
from mailgate.oauth.endpoints import Endpoint, smtp_endpoint
from mailgate.settings.document import TokenSourceSettings, parse_server
from smtp_servers import ServerConfig, serve

TENANT_ID = "0b8e4a5c-1d2f-4e3a-9b7c-5d6e7f8a9b0c"
CLIENT = "11111111-2222-3333-4444-555555555555"
SECRET = "Qx~8Q~secret.value-that-is-long_enough"
MAILBOX = "noreply@contoso.example"
CALLBACK = "http://127.0.0.1:8000/v1/oauth/callback"
DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05, broken_recheck=60, lease=30,
              tenant_networks="loopback")  # fmt: skip


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(
            CLIENT, SECRET, roles=("SMTP.SendAsApp",), redirect_uris=("http://127.0.0.1:8000/v1/oauth/callback",)
        )
        yield fake


@pytest.fixture
async def cache() -> AsyncIterator[TokenCache]:
    c = TokenCache(backoff=0.01)
    yield c
    await c.aclose()


def microsoft(idp: FakeIdentityProvider, **token: Any) -> TokenSourceSettings:
    fields = {"grant": "client_credentials", "provider": "microsoft", "authority": idp.url,
              "directory_id": TENANT_ID, "client_id": CLIENT, "client_secret": SECRET, **token}  # fmt: skip
    return TokenSourceSettings.model_validate(fields)


def app_source(idp: FakeIdentityProvider, margin: float = 300, **token: Any) -> TokenSource:
    return TokenSource(smtp_endpoint(microsoft(idp, **token)), "client_credentials", margin=margin)


# ---- presets and requests ---------------------------------------------------------------------


def test_microsoft_preset_builds_token_url_and_smtp_scope() -> None:
    e = smtp_endpoint(TokenSourceSettings.model_validate(
        {"grant": "client_credentials", "provider": "microsoft", "directory_id": "contoso.onmicrosoft.com",
         "client_id": CLIENT, "client_secret": SECRET}))  # fmt: skip
    assert e.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert e.scope == "https://outlook.office365.com/.default"
    delegated = smtp_endpoint(TokenSourceSettings.model_validate(
        {"grant": "delegated", "provider": "microsoft", "directory_id": "t", "client_id": CLIENT,
         "authority": "https://login.microsoftonline.us"}))  # fmt: skip
    assert delegated.scope == "https://outlook.office.com/SMTP.Send offline_access"
    assert delegated.authorize_url == "https://login.microsoftonline.us/t/oauth2/v2.0/authorize"


def test_google_preset_and_explicit_values_win() -> None:
    g = smtp_endpoint(
        TokenSourceSettings.model_validate({"grant": "refresh_token", "provider": "google", "client_id": "c"})
    )
    assert (g.token_url, g.scope) == ("https://oauth2.googleapis.com/token", "https://mail.google.com/")
    own = smtp_endpoint(TokenSourceSettings.model_validate(
        {"grant": "refresh_token", "provider": "google", "client_id": "c", "token_url": "https://idp.example/t",
         "scope": "mail"}))  # fmt: skip
    assert (own.token_url, own.scope) == ("https://idp.example/t", "mail")


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ({"provider": "generic", "client_id": "c"}, "token_url is required"),
        ({"provider": "microsoft", "client_id": "c"}, "directory_id"),
        ({"provider": "generic", "token_url": "https://idp.example/t"}, "client_id is required"),
        ({"provider": "generic", "client_id": "c", "token_url": "http://idp.example/t"}, "use https"),
    ],
)
def test_incomplete_or_unsafe_token_sources_are_refused(token: dict[str, Any], problem: str) -> None:
    auth = {"method": "oauth2", "username": "a@example.com", "token": {"grant": "client_credentials", **token}}
    doc = {"from_address": "a@example.com", "smtp": {"host": "smtp.example.com"}, "auth": auth}
    with pytest.raises(SettingsError) as e:
        parse_server(doc)
    assert problem in str(e.value)


async def test_client_credentials_form_post_and_reuse(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    source = app_source(idp)
    first = await cache.get(source)
    again = await cache.get(source)
    assert again is first
    [req] = idp.token_requests
    assert req.method == "POST" and req.path == f"/{TENANT_ID}/oauth2/v2.0/token"
    assert req.client_auth == "form"
    assert req.form == {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET,
                        "scope": "https://outlook.office365.com/.default"}  # fmt: skip
    info = idp.check(first.value)
    assert info is not None and info.audience == "https://outlook.office365.com" and info.roles == ("SMTP.SendAsApp",)
    assert SECRET not in repr(source) and first.value not in repr(first)


async def test_client_credentials_with_http_basic(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.add_app("basic-client", "s3cr+t/with=odd chars:")
    token = await cache.get(app_source(idp, client_auth="basic", client_id="basic-client",
                                       client_secret="s3cr+t/with=odd chars:"))  # fmt: skip
    assert idp.check(token.value) is not None
    [req] = idp.token_requests
    assert req.client_auth == "basic"
    assert req.form is not None and "client_secret" not in req.form and "client_id" not in req.form
    pair = base64.b64decode(req.headers["authorization"].split()[1]).decode()
    assert pair == "basic-client:s3cr%2Bt%2Fwith%3Dodd+chars%3A"  # RFC 6749 2.3.1: form-urlencoded first


async def test_token_is_renewed_within_the_margin(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.token_lifetime = 2  # the margin (300 s) is capped at half the lifetime
    source = app_source(idp)
    first = await cache.get(source)
    assert await cache.get(source) is first
    await asyncio.sleep(1.1)
    second = await cache.get(source)
    assert second.value != first.value and len(idp.token_requests) == 2


async def test_fifty_concurrent_callers_make_one_request(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.delay = 0.3
    source = app_source(idp)
    tokens = await asyncio.gather(*(cache.get(source) for _ in range(50)))
    assert len({t.value for t in tokens}) == 1
    assert len(idp.token_requests) == 1


async def test_a_tenant_with_another_secret_does_not_share_the_token(
    idp: FakeIdentityProvider, cache: TokenCache
) -> None:
    await cache.get(app_source(idp))
    with pytest.raises(TokenError) as e:
        await cache.get(app_source(idp, client_secret="a guess"))
    assert e.value.error_codes == [7000215]


async def test_transient_failures_are_retried_with_backoff(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.fail_next(2, status=503, error="temporarily_unavailable", aadsts=90024)
    token = await cache.get(app_source(idp))
    assert idp.check(token.value) is not None
    assert len(idp.token_requests) == 3


async def test_a_failure_that_lasts_is_reported_transient(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.fail_next(3)
    with pytest.raises(TokenError) as e:
        await cache.get(app_source(idp))
    assert e.value.transient and e.value.code == 503


def _refusal_cases() -> list[Any]:
    return [
        pytest.param({"client_secret": "2c8e0d9e-secret-id-not-value"}, None, 7000215, "Secret ID", id="7000215"),
        pytest.param({"client_id": "99999999-0000-0000-0000-000000000000"}, None, 700016, "client", id="700016"),
        pytest.param({"directory_id": "no-such-tenant"}, None, 90002, "directory", id="90002"),
        pytest.param({}, (401, "invalid_client", 7000222), 7000222, "expired", id="7000222"),
        pytest.param({}, (400, "invalid_grant", 65001), 65001, "consent", id="65001"),
        pytest.param({}, (400, "invalid_grant", None), None, "invalid_grant", id="invalid_grant"),
        pytest.param({}, (400, "unauthorized_client", None), None, "unauthorized_client", id="unauthorized_client"),
    ]


@pytest.mark.parametrize(("token", "scripted", "code", "explained"), _refusal_cases())
async def test_refusals_are_permanent_and_explained(
    idp: FakeIdentityProvider, cache: TokenCache, token: dict[str, Any], scripted: Any, code: int | None, explained: str
) -> None:
    if scripted:
        idp.fail_next(1, status=scripted[0], error=scripted[1], aadsts=scripted[2])
    with pytest.raises(TokenError) as e:
        await cache.get(app_source(idp, **token))
    assert not e.value.transient
    assert e.value.explanation.broken
    if code is not None:
        assert e.value.error_codes == [code] and f"AADSTS{code}" in e.value.message
    assert explained in e.value.message
    assert SECRET not in e.value.message
    assert len(idp.token_requests) == 1  # a permanent refusal is not retried


async def test_expired_secret_from_the_real_endpoint(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.add_app("expired-app", "old", secret_expired=True)
    with pytest.raises(TokenError) as e:
        await cache.get(app_source(idp, client_id="expired-app", client_secret="old"))
    assert e.value.error == "invalid_client" and e.value.error_codes == [7000222]
    assert "new client secret" in e.value.message


# ---- refresh tokens ---------------------------------------------------------------------------


async def test_google_refresh_sends_no_scope(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.add_app("google-client", "google-secret")
    idp.add_refresh_token("1//refresh", client_id="google-client", subject=MAILBOX, scope="https://mail.google.com/")
    settings = TokenSourceSettings.model_validate({"grant": "refresh_token", "provider": "google",
        "client_id": "google-client", "client_secret": "google-secret", "token_url": f"{idp.url}/token"})  # fmt: skip
    source = TokenSource(smtp_endpoint(settings), "refresh_token", "1//refresh", subject=MAILBOX)
    token = await cache.get(source)
    assert idp.check(token.value) is not None
    [req] = idp.token_requests
    assert req.path == "/token"
    assert req.form == {"grant_type": "refresh_token", "refresh_token": "1//refresh", "client_id": "google-client",
                        "client_secret": "google-secret"}  # fmt: skip


async def test_a_rotated_refresh_token_is_stored_before_its_token_is_used(
    idp: FakeIdentityProvider, cache: TokenCache
) -> None:
    idp.token_lifetime = 2
    idp.add_refresh_token("rt-0", client_id=CLIENT, subject=MAILBOX, scope=DELEGATED_SCOPE, rotate=True)
    stored: list[str] = []

    async def store(value: str) -> None:
        assert idp.token_requests  # the reply came
        stored.append(value)

    endpoint = smtp_endpoint(microsoft(idp, grant="refresh_token"))
    source = TokenSource(endpoint, "refresh_token", "rt-0", subject=MAILBOX, store_refresh_token=store)
    await cache.get(source)
    assert len(stored) == 1 and stored[0] != "rt-0"
    await asyncio.sleep(1.1)
    await cache.get(source)  # renews with the newest refresh token, not the first
    assert idp.token_requests[1].form is not None and idp.token_requests[1].form["refresh_token"] == stored[0]
    assert len(stored) == 2
    # A resolution that already carries the stored (rotated) token finds the same entry.
    rotated = TokenSource(endpoint, "refresh_token", stored[1], subject=MAILBOX, store_refresh_token=store)
    await cache.get(rotated)
    assert len(idp.token_requests) == 2


async def test_a_token_that_cannot_be_stored_is_not_used(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.add_refresh_token("rt-x", client_id=CLIENT, subject=MAILBOX, scope=DELEGATED_SCOPE, rotate=True)

    async def store(value: str) -> None:
        raise OSError("database is away")

    endpoint = smtp_endpoint(microsoft(idp, grant="refresh_token"))
    with pytest.raises(TokenError) as e:
        await cache.get(TokenSource(endpoint, "refresh_token", "rt-x", subject=MAILBOX, store_refresh_token=store))
    assert e.value.transient and "could not be stored" in e.value.message


async def test_a_revoked_refresh_token_is_invalid_grant(idp: FakeIdentityProvider, cache: TokenCache) -> None:
    idp.add_refresh_token("rt-r", client_id=CLIENT, subject=MAILBOX, scope="https://outlook.office.com/SMTP.Send")
    idp.revoke_refresh_token("rt-r")
    endpoint = smtp_endpoint(microsoft(idp, grant="refresh_token"))
    with pytest.raises(TokenError) as e:
        await cache.get(TokenSource(endpoint, "refresh_token", "rt-r", subject=MAILBOX))
    assert e.value.error == "invalid_grant" and not e.value.transient


async def test_the_token_endpoint_unreachable_is_transient(cache: TokenCache) -> None:
    endpoint = Endpoint("generic", "http://127.0.0.1:9/token", "c", "s", "scope")
    with pytest.raises(TokenError) as e:
        await cache.get(TokenSource(endpoint, "client_credentials", timeout=(1, 1)))
    assert e.value.transient and "cannot reach" in e.value.message


# ---- delegated consent --------------------------------------------------------------------------


def delegated_doc(idp: FakeIdentityProvider, host: str = "127.0.0.1", port: int = 25) -> dict[str, Any]:
    return {"from_address": MAILBOX, "smtp": {"host": host, "port": port, "security": "none"},
            "auth": {"method": "oauth2", "username": MAILBOX,
                     "token": {"grant": "delegated", "provider": "microsoft", "authority": idp.url,
                               "directory_id": TENANT_ID, "client_id": CLIENT, "client_secret": SECRET}},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin@acme", config=FAST) as opened:
        await opened.tenants.add("acme", may_use_own_server=True)
        yield opened


async def test_consent_flow_stores_the_refresh_token(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    await mg.servers.set("acme", delegated_doc(idp))
    url = await mg.begin_consent("acme")
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(f"{idp.url}/{TENANT_ID}/oauth2/v2.0/authorize?")
    assert query["code_challenge_method"] == ["S256"] and query["login_hint"] == [MAILBOX]
    assert query["scope"] == ["https://outlook.office.com/SMTP.Send offline_access"]
    redirect, code = idp.consent(url, subject=MAILBOX)
    state = parse_qs(urlsplit(redirect).query)["state"][0]
    result = await mg.complete_consent(state, code)
    assert (result.scope, result.mailbox) == ("acme", MAILBOX)
    [exchange] = idp.token_requests
    assert exchange.form is not None and exchange.form["grant_type"] == "authorization_code"
    assert challenge_of(exchange.form["code_verifier"]) == query["code_challenge"][0]
    info = await mg.servers.get("acme")
    assert info is not None and info.document["auth"]["token"]["refresh_token"] == {"set": True}
    [granted] = idp.refresh_tokens_for(MAILBOX)  # the refresh token the provider issued
    assert granted not in str(info.to_dict())  # write-only
    async with mg.db.sessions() as s:  # and encrypted at rest
        stored = await s.scalar(select(ServerSecret.ciphertext).where(ServerSecret.field == "auth.token.refresh_token"))
    assert stored is not None and granted not in stored
    loaded = await mg.servers.loaded("acme")
    assert loaded is not None and loaded.server.auth.token.refresh_token.get_secret_value() == granted  # type: ignore[union-attr]
    assert (await mg.audit_log("acme"))[0].action == "server.consent"
    with pytest.raises(NotFound):  # a state works once
        await mg.complete_consent(state, code)
    info = await mg.reset_consent("acme")
    assert info.document["auth"]["token"]["refresh_token"] == {"set": False}
    assert (await mg.audit_log("acme"))[0].action == "server.consent_reset"


async def test_consent_is_only_for_delegated_servers(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    doc = delegated_doc(idp)
    doc["auth"]["token"]["grant"] = "client_credentials"
    await mg.servers.set("acme", doc)
    with pytest.raises(SettingsError, match="delegated"):
        await mg.begin_consent("acme")


async def test_a_delegated_server_without_consent_waits_broken(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    await mg.servers.set("global", delegated_doc(idp))
    pk = await mg.submit("acme", Message(to="bob@example.org", subject="s", text="t"))
    await mg.run_worker(until_idle=True)
    detail = await mg.queue.get(pk)
    assert detail.summary.status == "deferred"
    assert "no mailbox is connected" in (detail.summary.last_error or "")


# ---- XOAUTH2 end to end -----------------------------------------------------------------------


def smtp_doc(idp: FakeIdentityProvider, server: Any, **connection: Any) -> dict[str, Any]:
    return {"from_address": MAILBOX, "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "auth": {"method": "oauth2", "username": MAILBOX,
                     "token": {"grant": "client_credentials", "provider": "microsoft", "authority": idp.url,
                               "directory_id": TENANT_ID, "client_id": CLIENT, "client_secret": SECRET}},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5, "pool_size": 5, **connection},
            "debug": {"protocol_log": True}}  # fmt: skip


def xoauth2_server(idp: FakeIdentityProvider, **kw: Any) -> ServerConfig:
    kw = {"token_check": idp.check, **kw}
    return ServerConfig(security="none", auth={"XOAUTH2"}, auth_require_tls=False, username=MAILBOX,
                        xoauth2_style="exchange", **kw)  # fmt: skip


async def test_fifty_messages_over_xoauth2_make_one_token_request(
    idp: FakeIdentityProvider, mg: Mailgate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mailgate.protocol")
    async with serve(xoauth2_server(idp, pipelining=True)) as server:
        await mg.servers.set("global", smtp_doc(idp, server))
        await mg.submit_many("acme", [Message(to=f"u{i}@example.org", subject="s", text="t") for i in range(50)])
        stats = await mg.run_worker(until_idle=True)
        assert stats.sent == 50
        assert len(server.messages) == 50
    assert len(idp.token_requests) == 1
    assert all(a.success and a.mechanism == "XOAUTH2" for a in server.auth_attempts)
    token = next(iter(idp.issued))
    assert "AUTH XOAUTH2 [redacted]" in caplog.text and token not in caplog.text and SECRET not in caplog.text


async def test_an_expiring_token_closes_the_connection_and_brings_a_new_one(
    idp: FakeIdentityProvider, mg: Mailgate
) -> None:
    idp.token_lifetime = 2
    async with serve(xoauth2_server(idp)) as server:
        await mg.servers.set("global", smtp_doc(idp, server, pool_size=1))
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))  # one worker, one pool, throughout
        try:
            await mg.submit("acme", Message(to="a@example.org", subject="1", text="t"))
            await wait_for(lambda: len(server.messages) == 1)
            await asyncio.sleep(1.2)  # past the renewal point (half of 2 s), before the expiry
            first_token = next(iter(idp.issued))
            await mg.submit("acme", Message(to="b@example.org", subject="2", text="t"))
            await wait_for(lambda: len(server.messages) == 2)
            assert time.time() < idp.issued[first_token].expires_at  # closed before the server would cut it
        finally:
            stop.set()
            await worker
    assert len(idp.token_requests) == 2
    first, second = server.auth_attempts
    assert first.success and second.success and first.connection != second.connection


async def test_a_connection_is_reused_while_its_token_is_fresh(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    async with serve(xoauth2_server(idp)) as server:
        await mg.servers.set("global", smtp_doc(idp, server, pool_size=1))
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            for i in range(3):
                await mg.submit("acme", Message(to=f"u{i}@example.org", subject="s", text="t"))
                await wait_for(lambda i=i: len(server.messages) == i + 1)  # type: ignore[misc]
        finally:
            stop.set()
            await worker
    assert len(server.auth_attempts) == 1 and len(idp.token_requests) == 1


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_refused_token_is_renewed_once(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    accepted: set[str] = set()

    def only_second(token: str) -> bool:
        if idp.check(token) is None:
            return False
        accepted.add(token)
        return len(accepted) > 1  # the first token is "revoked" at the server

    async with serve(xoauth2_server(idp, token_check=only_second)) as server:
        await mg.servers.set("global", smtp_doc(idp, server))
        await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
        assert (await mg.run_worker(until_idle=True)).sent == 1
    assert len(idp.token_requests) == 2
    assert [a.success for a in server.auth_attempts] == [False, True]


async def test_a_revoked_client_secret_marks_the_server_broken(idp: FakeIdentityProvider, mg: Mailgate) -> None:
    idp.revoke_secret(CLIENT)
    async with serve(xoauth2_server(idp)) as server:
        await mg.servers.set("global", smtp_doc(idp, server))
        pk = await mg.submit("acme", Message(to="a@example.org", subject="s", text="t"))
        await mg.run_worker(until_idle=True)
        assert not server.messages
    resolution = await mg.resolve("acme")
    assert resolution.broken_reason is not None and "AADSTS7000215" in resolution.broken_reason
    assert "Secret ID" in resolution.broken_reason
    assert (await mg.queue.get(pk)).summary.status == "deferred"


async def test_token_source_for_a_delegated_server_needs_a_refresh_token(idp: FakeIdentityProvider) -> None:
    server = parse_server(delegated_doc(idp))
    with pytest.raises(TokenError, match="no mailbox is connected"):
        smtp_token_source(server)
