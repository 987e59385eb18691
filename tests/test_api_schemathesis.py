"""Property-based tests of the HTTP API: schemathesis makes requests from the app's OpenAPI
document (valid ones and invalid ones) for every operation, sends them to the app in-process
(ASGI, no network) with a real API token of each role, and no answer may be a 5xx.

Every test (one operation, one role) gets a fresh SQLite database holding a tenant, a global mail
server, the tenant's own mail server (delegated OAuth, so the consent routes get past "not
delegated"), one queued message and a token per role; its examples share it, changes and all.
Random strings would only ever find "no such tenant" and "no such message", so hooks put the
tenant's id and the message's id into a share of the generated path parameters, queries and
bodies, offer submissions and server documents that are valid but for the fuzzed fields, reuse an
idempotency key, and try an id one past the 64-bit range (the schema sets no maximum).

An error inside the app reaches the test as the exception itself, not as a 500: starlette re-raises
it after answering 500, for the server's log (the test client does the same). It fails the test
just as well, with the app's traceback.
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
MESSAGE_ID = 1  # the one message in the database
# Ids are 64-bit integers in the database, but the schema sets no maximum: the first id past them.
PAST_BIGINT = 2**63
ROLES = ("system-admin", "tenant-admin", "sender")
GLOBAL_SERVER = {
    "kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
    "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"}, "auth": {"method": "none"},
}  # fmt: skip
TENANT_SERVER = {
    "kind": "smtp", "enabled": True, "from_address": "mail@acme.example",
    "smtp": {"host": "127.0.0.1", "port": 2587, "security": "none"},
    "auth": {"method": "oauth2", "username": "mail@acme.example", "token": {
        "grant": "delegated", "client_id": "mailgate-test", "token_url": "http://127.0.0.1:9/token",
        "authorize_url": "http://127.0.0.1:9/authorize",
    }},
}  # fmt: skip

# The document the app serves at /openapi.json (making it needs no database).
schema = schemathesis.openapi.from_dict(create_app(config=Config()).openapi())


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> Any:
    """As generated, or naming the tenant and the message that exist, or an id past 64 bits."""
    if not isinstance(path_parameters, dict):
        return st.just(path_parameters)
    variants = [path_parameters]
    if "tenant" in path_parameters:
        variants.append({**path_parameters, "tenant": TENANT})
    if "message_id" in path_parameters:
        variants += [{**path_parameters, "message_id": MESSAGE_ID}, {**path_parameters, "message_id": PAST_BIGINT}]
    return st.sampled_from(variants)


@schema.hook
def flatmap_query(context: schemathesis.HookContext, query: Any) -> Any:
    """As generated, or naming the tenant that exists, or a `before` id past 64 bits."""
    if not isinstance(query, dict):
        return st.just(query)
    variants = [query]
    if "tenant" in query:
        variants.append({**query, "tenant": TENANT})
    if context.operation is not None and context.operation.label == "GET /v1/messages":
        variants.append({**query, "before": PAST_BIGINT})
    return st.sampled_from(variants)


@schema.hook
def flatmap_headers(context: schemathesis.HookContext, headers: Any) -> Any:
    """As generated, or an idempotency key used before (the replay answers the first message)."""
    if context.operation is None or context.operation.label != "POST /v1/messages":
        return st.just(headers)
    return st.sampled_from([headers, {**(headers or {}), "idempotency-key": "used-again"}])


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
    """As generated, or made valid where a random value would always be refused."""
    if not isinstance(body, dict):
        return st.just(body)
    label = context.operation.label if context.operation is not None else ""
    if label == "POST /v1/messages":
        # An existing tenant and a real recipient; the subject, text, headers… stay fuzzed.
        addressed = {**body, "tenant": TENANT, "to": ["someone@example.com"]}
        bare = {k: v for k, v in addressed.items() if k not in ("from", "cc", "bcc", "reply_to", "attachments")}
        return st.sampled_from([body, addressed, bare])
    if label in ("PUT /v1/servers/global", "PUT /v1/tenants/{tenant}/server"):
        return st.sampled_from([body, GLOBAL_SERVER, TENANT_SERVER, {**GLOBAL_SERVER, "from_name": str(body)[:256]}])
    if "tenant" in body:
        return st.sampled_from([body, {**body, "tenant": TENANT}])
    return st.just(body)


@dataclass(frozen=True)
class Api:
    app: Any
    tokens: dict[str, str]  # role → API token


async def _populate(url: str) -> dict[str, str]:
    async with Mailgate.open(url, secret_keys=TEST_KEY, actor="tester") as mg:
        await mg.tenants.add(TENANT, may_use_own_server=True)
        await mg.servers.set("global", GLOBAL_SERVER)
        await mg.servers.set(TENANT, TENANT_SERVER)
        await mg.system.update(support_address="help@operator.example")  # support requests get past 409
        message_id = await mg.submit(TENANT, Message(to=["someone@example.com"], subject="hello", text="hi"))
        assert message_id == MESSAGE_ID
        return {
            role: (await mg.api_tokens.create(role, None if role == "system-admin" else TENANT))[0] for role in ROLES
        }


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path}/m.db"
    tokens = asyncio.run(_populate(url))
    # The app opens its own service at start-up (on schemathesis's event loop thread, which runs
    # the app's lifespan), reading the secret keys from the environment as `mailgate serve` does.
    monkeypatch.setenv("MAILGATE_SECRET_KEYS", TEST_KEY)
    yield Api(create_app(database_url=url, config=Config()), tokens)


FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same cases every run
    database=None,  # nothing saved under .hypothesis/
    # A fresh database per test, not per example, is the point; and an app round trip per example is slow.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PUBLIC = ["/healthz", "/readyz", "/v1/oauth/callback"]  # the routes that need no token


@pytest.mark.parametrize("role", ROLES)
@schema.exclude(path=PUBLIC).parametrize()
@FUZZ
def test_no_server_errors(case: schemathesis.Case, api: Api, role: str) -> None:
    case.call_and_validate(
        app=api.app, headers={"Authorization": f"Bearer {api.tokens[role]}"}, checks=[not_a_server_error]
    )


# Parametrized, if only once: unparametrized, each operation's test would get the same node id (on
# pytest 9.2, schemathesis's items take it from the function's name, without the operation).
@pytest.mark.parametrize("role", ["no token"])
@schema.include(path=PUBLIC).parametrize()
@FUZZ
def test_no_server_errors_without_a_token(case: schemathesis.Case, api: Api, role: str) -> None:
    case.call_and_validate(app=api.app, checks=[not_a_server_error])
