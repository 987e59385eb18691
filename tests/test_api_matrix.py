"""Every route × every role × own tenant / other tenant: the exact status each answers, and never
another tenant's data or any secret in the answer.

The world: tenants acme (own) and globex (other), each with its own mail server and a message, and
the global server; tokens for a system admin, acme's tenant admin and acme's sender. Each case runs
on a fresh copy of that world, so a DELETE in one case can't change the answer of another.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from conftest import TEST_KEY
from mailgate import Mailgate, Message
from mailgate.api import create_app

SECRETS = ("global-client-secret-9f3", "acme-client-secret-4b1", "globex-client-secret-7c2")
OTHER_DATA = ("globex-subject-only", "smtp.globex.example", "globex-support@globex.example")
ROLES = ("system-admin", "tenant-admin", "sender", "anonymous")


def delegated(host: str, secret: str) -> dict[str, Any]:
    token = {"grant": "delegated", "provider": "microsoft", "authority": "https://login.microsoftonline.com",
             "directory_id": "11111111-2222-3333-4444-555555555555",
             "client_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "client_secret": secret}  # fmt: skip
    return {"kind": "smtp", "enabled": True, "from_address": f"no-reply@{host}",
            "smtp": {"host": host, "port": 587, "security": "starttls-required"},
            "auth": {"method": "oauth2", "username": f"mailer@{host}", "token": token}}  # fmt: skip


class World:
    def __init__(self, path: Path, tokens: dict[str, str], messages: dict[str, int]) -> None:
        self.path, self.tokens, self.messages = path, tokens, messages


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    path = tmp_path_factory.mktemp("world") / "mailgate.db"

    async def build() -> World:
        async with Mailgate.open(f"sqlite:///{path}", secret_keys=TEST_KEY, actor="setup") as mg:
            await mg.tenants.add("acme", may_use_own_server=True, may_set_support_address=True)
            await mg.tenants.add("globex", may_use_own_server=True, may_set_support_address=True,
                                 support_address=OTHER_DATA[2])  # fmt: skip
            await mg.servers.set("global", delegated("mail.operator.example", SECRETS[0]))
            await mg.servers.set("acme", delegated("smtp.acme.example", SECRETS[1]))
            await mg.servers.set("globex", delegated(OTHER_DATA[1], SECRETS[2]))
            acme = await mg.submit("acme", Message(to="a@acme.example", subject="acme-subject", text="t"))
            globex = await mg.submit("globex", Message(to="g@globex.example", subject=OTHER_DATA[0], text="t"))
            tokens = {
                "system-admin": (await mg.api_tokens.create("system-admin"))[0],
                "tenant-admin": (await mg.api_tokens.create("tenant-admin", "acme"))[0],
                "sender": (await mg.api_tokens.create("sender", "acme"))[0],
            }
            return World(path, tokens, {"acme": acme, "globex": globex})

    return asyncio.run(build())


@pytest.fixture
async def copy(world: World, tmp_path: Path) -> AsyncIterator[httpx2.AsyncClient]:
    path = tmp_path / "mailgate.db"
    shutil.copy(world.path, path)
    async with Mailgate.open(f"sqlite:///{path}", secret_keys=TEST_KEY) as mg:
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
            yield client


S, A, N = "system-admin", "tenant-admin", "sender"


def route(method: str, path: str, body: Any, expect: dict[str, int], *, public: bool = False) -> Any:
    """`expect` maps "role/own" and "role/other" (or just "role") to the status; a tenant role's
    "other" is globex. Anonymous gets 401 unless the route is public."""
    return (method, path, body, expect, public)


def message(tenant: str) -> dict[str, Any]:
    return {"tenant": tenant, "to": ["x@example.com"], "subject": "hello", "text": "hi"}


# fmt: off
# One row per route. {t} is the tenant (acme for "own", globex for "other"), {m} that tenant's message.
ROUTES = [
    route("POST", "/v1/messages", message, {S: 202, A: 403, f"{N}/own": 202, f"{N}/other": 404}),
    route("GET", "/v1/messages", None, {S: 200, A: 200, N: 200}),
    route("GET", "/v1/messages?tenant={t}", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, f"{N}/own": 200,
                                                   f"{N}/other": 404}),
    route("GET", "/v1/messages/{m}", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, f"{N}/own": 200,
                                            f"{N}/other": 404}),
    route("POST", "/v1/messages/{m}/retry", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, N: 403}),
    route("POST", "/v1/messages/{m}/cancel", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, N: 403}),
    route("GET", "/v1/servers/global", None, {S: 200, A: 403, N: 403}),
    route("PUT", "/v1/servers/global", lambda t: delegated("mail.operator.example", "global-new-secret-5d0"),
          {S: 200, A: 403, N: 403}),
    route("DELETE", "/v1/servers/global", None, {S: 204, A: 403, N: 403}),
    route("POST", "/v1/servers/global/enable", None, {S: 200, A: 403, N: 403}),
    route("POST", "/v1/servers/global/disable", None, {S: 200, A: 403, N: 403}),
    route("POST", "/v1/servers/global/oauth/connect", None, {S: 200, A: 403, N: 403}),
    route("GET", "/v1/servers/global/health", None, {S: 200, A: 403, N: 403}),
    route("POST", "/v1/servers/global/test", lambda t: {"to": "x@example.com", "dry_run": True},
          {S: 200, A: 403, N: 403}),
    route("POST", "/v1/servers/global/oauth/reset", None, {S: 200, A: 403, N: 403}),
    *[
        route(method, "/v1/tenants/{t}/server" + suffix, body,
              {S: ok, f"{A}/own": ok, f"{A}/other": 404, f"{N}/own": 403, f"{N}/other": 404})
        for method, suffix, body, ok in [
            ("GET", "", None, 200),
            ("PUT", "", lambda t: delegated(f"smtp.{t}.example", "changed-secret"), 200),
            ("DELETE", "", None, 204),
            ("POST", "/enable", None, 200),
            ("POST", "/disable", None, 200),
            ("POST", "/oauth/connect", None, 200),
            ("POST", "/oauth/reset", None, 200),
            ("POST", "/test", lambda t: {"to": "x@example.com", "dry_run": True}, 200),
            ("GET", "/health", None, 200),
        ]
    ],
    route("GET", "/v1/tenants", None, {S: 200, A: 200, N: 403}),
    route("POST", "/v1/tenants", lambda t: {"id": "initech"}, {S: 201, A: 403, N: 403}),
    route("GET", "/v1/tenants/{t}", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, N: 403}),
    route("PATCH", "/v1/tenants/{t}", lambda t: {"support_address": "help@example.com"},
          {S: 200, f"{A}/own": 200, f"{A}/other": 404, N: 403}),
    route("PATCH", "/v1/tenants/{t}", lambda t: {"may_use_own_server": False},
          {S: 200, f"{A}/own": 403, f"{A}/other": 404, N: 403}),
    route("DELETE", "/v1/tenants/{t}", None, {S: 204, A: 403, N: 403}),
    route("GET", "/v1/audit", None, {S: 200, A: 200, N: 403}),
    route("GET", "/v1/audit?tenant={t}", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, N: 403}),
    route("GET", "/v1/events", None, {S: 200, A: 200, N: 200}),
    route("GET", "/v1/events?tenant={t}", None, {S: 200, f"{A}/own": 200, f"{A}/other": 404, f"{N}/own": 200,
                                                 f"{N}/other": 404}),
    route("POST", "/v1/tenants/{t}/webhooks", lambda t: {"url": "https://127.0.0.1:9/hook"},
          {S: 201, f"{A}/own": 201, f"{A}/other": 404, f"{N}/own": 403, f"{N}/other": 404}),
    route("GET", "/v1/tenants/{t}/webhooks", None,
          {S: 200, f"{A}/own": 200, f"{A}/other": 404, f"{N}/own": 403, f"{N}/other": 404}),
    route("GET", "/metrics", None, {S: 200, A: 403, N: 403}),
    # acme has no support address (and no global one is set): 409; globex has its own.
    route("POST", "/v1/support-requests", lambda t: {"tenant": t, "subject": "hello", "text": "hi"},
          {f"{S}/own": 409, f"{S}/other": 202, f"{A}/own": 409, f"{A}/other": 404, f"{N}/own": 409,
           f"{N}/other": 404}),
    route("GET", "/v1/system-settings", None, {S: 200, A: 403, N: 403}),
    route("PATCH", "/v1/system-settings", lambda t: {"support_address": "help@operator.example"},
          {S: 200, A: 403, N: 403}),
    route("GET", "/healthz", None, {S: 200, A: 200, N: 200, "anonymous": 200}, public=True),
    route("GET", "/readyz", None, {S: 200, A: 200, N: 200, "anonymous": 200}, public=True),
    route("GET", "/v1/oauth/callback?state=unknown&code=x", None, {S: 303, A: 303, N: 303, "anonymous": 303},
          public=True),
]
# fmt: on


def _cases() -> list[Any]:
    cases = []
    for method, path, body, expect, public in ROUTES:
        for role in ROLES:
            for which in ("own", "other"):
                status = expect.get(f"{role}/{which}", expect.get(role))
                if role == "anonymous" and not public:
                    status = 401
                assert status is not None, (method, path, role, which)
                cases.append(pytest.param(method, path, body, role, which, status,
                                          id=f"{method} {path} {role} {which}"))  # fmt: skip
    return cases


@pytest.mark.parametrize(("method", "path", "body", "role", "which", "status"), _cases())
async def test_route_answers_each_role(
    world: World, copy: httpx2.AsyncClient, method: str, path: str, body: Any, role: str, which: str, status: int
) -> None:
    tenant = "acme" if which == "own" else "globex"
    url = path.format(t=tenant, m=world.messages[tenant])
    headers = {"Authorization": f"Bearer {world.tokens[role]}"} if role in world.tokens else {}
    reply = await copy.request(method, url, json=body(tenant) if callable(body) else None, headers=headers)
    assert reply.status_code == status, reply.text
    text = reply.text
    for secret in (*SECRETS, "changed-secret", "global-new-secret-5d0", *world.tokens.values()):
        assert secret not in text
    if role in (A, N):
        for other in OTHER_DATA:
            assert other not in text, f"{role} saw globex's data: {text[:300]}"
    if status >= 400 and status != 405:
        error = reply.json()
        assert set(error) >= {"code", "message"} and error["message"]
