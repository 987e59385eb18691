"""Property-based tests of the HTTP API: schemathesis makes requests from the app's OpenAPI
document (valid ones and invalid ones) for every operation, sends them to the app in-process
(ASGI, no network) with a real token, and no answer may be a 5xx.

Every test gets a fresh SQLite database with a tenant ("acme", which may use its own server), a
global mail server, one queued message and a token per role, so requests get past "no such
tenant/server/message". A hook puts "acme" and that message's id into about half the generated
path parameters and bodies: random strings would otherwise only ever find 404s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.config import Config
from mailgate.message import Message

TENANT = "acme"
GLOBAL_SERVER = {
    "kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
    "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"}, "auth": {"method": "none"},
}  # fmt: skip
ROLES = ("system-admin", "sender")

# The document the app serves at /openapi.json (building it needs no database).
schema = schemathesis.openapi.from_dict(create_app(config=Config()).openapi())


@dataclass(frozen=True)
class Api:
    app: Any
    tokens: dict[str, str]  # role → token
    message_id: int


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any]) -> Any:
    """Half the time, the tenant and message that exist."""
    if not isinstance(path_parameters, dict):
        return st.just(path_parameters)
    known = dict(path_parameters)
    if "tenant" in known:
        known["tenant"] = TENANT
    if "message_id" in known:
        known["message_id"] = 1
    return st.sampled_from([path_parameters, known])


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
    if isinstance(body, dict) and "tenant" in body:
        return st.sampled_from([body, {**body, "tenant": TENANT}])
    return st.just(body)


async def _populate(url: str) -> Api:
    async with Mailgate.open(url, secret_keys=TEST_KEY, actor="tester") as mg:
        await mg.tenants.add(TENANT, may_use_own_server=True)
        await mg.servers.set("global", GLOBAL_SERVER)
        message_id = await mg.submit(TENANT, Message(to=["someone@example.com"], subject="hello", text="hi"))
        tokens = {"system-admin": (await mg.api_tokens.create("system-admin"))[0]}
        for role in ROLES[1:]:
            tokens[role] = (await mg.api_tokens.create(role, TENANT))[0]
    return Api(None, tokens, message_id)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path}/m.db"
    # The app opens its own service at start-up (in schemathesis's event loop thread); it reads
    # the secret keys from the environment, as `mailgate serve` does.
    monkeypatch.setenv("MAILGATE_SECRET_KEYS", TEST_KEY)
    populated = asyncio.run(_populate(url))
    assert populated.message_id == 1
    yield Api(create_app(database_url=url, config=Config()), populated.tokens, populated.message_id)


@pytest.mark.parametrize("role", ROLES)
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, api: Api, role: str) -> None:
    case.call_and_validate(app=api.app, headers={"Authorization": f"Bearer {api.tokens[role]}"},
                           checks=[not_a_server_error])
