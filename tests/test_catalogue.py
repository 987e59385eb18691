"""Every entry of the error catalogue's token-endpoint and Graph tables, provoked against the fake
identity provider and the fake Graph (real HTTP on 127.0.0.1, the services' documented replies),
and the SMTP session's against scripted SMTP servers, and the explanation that comes back checked.
The SMTP reply table is covered by test_testmail.py; a test here makes sure no entry of any table
is left without its case."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider
from mailgate import Message
from mailgate.diagnostics.catalogue import AADSTS, GRAPH, OAUTH, SESSION, explain_failure
from mailgate.oauth.cache import TokenCache, graph_token_source
from mailgate.oauth.tokens import TokenError
from mailgate.settings.document import TokenSourceSettings, parse_server
from mailgate.transports.graph import GraphError, GraphTransport
from mailgate.transports.smtp import SMTPTransport
from smtp_servers import MTA, ScriptedMTA, scripted_mta

TENANT_ID = "7f0c2b9e-0000-4000-8000-00000000c0de"
APP = "22222222-3333-4444-5555-666666666666"
SECRET = "Gr~aph.secret-value_0123456789"
MAILBOX = "notifications@contoso.example"

# The `error` Entra ID sends with each AADSTS code (reference §4), and the HTTP status.
# fmt: off
AADSTS_CASES: dict[int, tuple[int, str]] = {
    7000215: (401, "invalid_client"), 7000222: (401, "invalid_client"), 7000218: (401, "invalid_client"),
    700016: (400, "unauthorized_client"), 90002: (400, "invalid_request"), 90094: (400, "invalid_grant"),
    65001: (400, "invalid_grant"), 70011: (400, "invalid_scope"), 1002012: (400, "invalid_scope"),
    70000: (400, "invalid_grant"),
    700082: (400, "invalid_grant"), 70008: (400, "invalid_grant"), 50173: (400, "invalid_grant"),
    50076: (400, "invalid_grant"), 50079: (400, "invalid_grant"), 53003: (400, "invalid_grant"),
    530035: (400, "invalid_grant"), 54005: (400, "invalid_grant"), 501481: (400, "invalid_grant"),
    50148: (400, "invalid_grant"), 50194: (400, "invalid_request"), 50034: (400, "invalid_grant"),
    50126: (400, "invalid_grant"), 700024: (401, "invalid_client"), 700027: (401, "invalid_client"),
    50196: (400, "invalid_request"), 90024: (503, "temporarily_unavailable"), 90006: (500, "server_error"),
    50033: (503, "temporarily_unavailable"),
}
# (status, message) Graph sends with each code (reference §5.8).
GRAPH_CASES: dict[str, tuple[int, str]] = {
    "ErrorAccessDenied": (403, "Access to OData is disabled."),
    "InvalidAuthenticationToken": (401, "Access token has expired or is not yet valid."),
    "MailboxNotEnabledForRESTAPI": (404, "The mailbox is either inactive, soft-deleted, or is hosted on-premise."),
    "MailboxNotSupportedForRESTAPI": (404, "REST API is not yet supported for this mailbox."),
    "ErrorInvalidUser": (404, "The requested user 'x@contoso.example' is invalid."),
    "ErrorSendAsDenied": (403, "The user account which was used to submit this request does not have the right to "
                               "send mail on behalf of the specified sending account."),
    "ErrorInvalidRecipients": (400, "At least one recipient isn't valid."),
    "ErrorTooManyRecipients": (400, "The message has too many recipients."),
    "ErrorMimeContentInvalidBase64String": (400, "Invalid base64 string for MIME content."),
    "ErrorMessageSizeExceeded": (400, "The message exceeds the maximum supported size."),
    "RequestEntityTooLarge": (413, "The request entity is too large."),
    "ErrorQuotaExceeded": (403, "The process failed to get the correct properties."),
    "ApplicationThrottled": (429, "Application is over its resource limit."),
    "TooManyRequests": (429, "Too many requests."),
    "ServiceUnavailable": (503, "The service is temporarily unavailable."),
}
# fmt: on


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(APP, SECRET, roles=("Mail.Send",))
        yield fake


@pytest.fixture
async def cache() -> AsyncIterator[TokenCache]:
    c = TokenCache(attempts=1)  # one request: the refusal itself, not the retries of a transient one
    yield c
    await c.aclose()


def _source(idp: FakeIdentityProvider) -> Any:
    from mailgate.oauth.cache import TokenSource
    from mailgate.oauth.endpoints import smtp_endpoint

    token = TokenSourceSettings.model_validate({"grant": "client_credentials", "provider": "microsoft",
                                                "authority": idp.url, "directory_id": TENANT_ID, "client_id": APP,
                                                "client_secret": SECRET})  # fmt: skip
    return TokenSource(smtp_endpoint(token), "client_credentials")


@pytest.mark.parametrize("code", list(AADSTS_CASES))
async def test_each_aadsts_code_is_explained(idp: FakeIdentityProvider, cache: TokenCache, code: int) -> None:
    status, error = AADSTS_CASES[code]
    idp.fail_next(1, status=status, error=error, aadsts=code)
    with pytest.raises(TokenError) as e:
        await cache.get(_source(idp))
    assert e.value.error_codes == [code]
    assert e.value.explanation is AADSTS[code]
    assert e.value.transient == AADSTS[code].transient
    assert AADSTS[code].cause in e.value.message and SECRET not in e.value.message


@pytest.mark.parametrize("error", list(OAUTH))
async def test_each_oauth_error_is_explained(idp: FakeIdentityProvider, cache: TokenCache, error: str) -> None:
    status = 503 if OAUTH[error].transient else 400
    idp.fail_next(1, status=status, error=error, aadsts=None)  # a provider without AADSTS codes (Google, generic)
    with pytest.raises(TokenError) as e:
        await cache.get(_source(idp))
    assert e.value.explanation is OAUTH[error]


@pytest.fixture
def graph(idp: FakeIdentityProvider) -> Iterator[FakeGraph]:
    with FakeGraph(idp) as fake:
        fake.add_mailbox(MAILBOX)
        yield fake


@pytest.mark.parametrize("code", list(GRAPH_CASES))
async def test_each_graph_error_is_explained(
    idp: FakeIdentityProvider, graph: FakeGraph, cache: TokenCache, code: str
) -> None:
    server = parse_server({"kind": "graph", "from_address": MAILBOX,
                           "graph": {"authority": idp.url, "endpoint": graph.url, "directory_id": TENANT_ID,
                                     "client_id": APP, "client_secret": SECRET, "mailbox": MAILBOX}})  # fmt: skip
    transport = GraphTransport(server, cache.handle(graph_token_source(server)), cache.http)
    status, text = GRAPH_CASES[code]
    graph.refuse_next(status, code, text, count=2 if status == 401 else 1)  # a 401 is retried once, new token
    message = Message(from_=MAILBOX, to="alice@example.org", subject="s", text="t")
    explanation = GRAPH[code]
    try:
        delivery = await transport.send(message.envelope(), message)
    except GraphError as e:
        assert e.graph_code == code and e.explanation is explanation
        assert e.transient == explanation.transient  # a 401 again with a fresh token is for good
    else:  # a refusal of this message only: every recipient gets the explanation
        assert not explanation.broken and not explanation.transient
        [result] = delivery.results
        assert result.code == status and explanation.cause in result.text


# Each SESSION entry: the server that provokes it, and settings of the mail server's smtp section.
SESSION_CASES: dict[str, tuple[MTA, dict[str, Any]]] = {
    "helo": (MTA(reject_non_fqdn_helo=True), {"helo_name": "buildbox"}),
    "implicit_tls": (MTA(tls="implicit"), {"security": "starttls-required"}),
    "not_smtp": (MTA(greeting=lambda connection: "HTTP/1.1 400 Bad Request"), {}),
}


@pytest.mark.parametrize("entry", list(SESSION_CASES))
async def test_each_smtp_session_failure_is_explained(entry: str) -> None:
    mta, smtp = SESSION_CASES[entry]
    async with scripted_mta(mta) as server:
        doc = _smtp_server(server, **smtp)
        transport = SMTPTransport.from_server(doc)
        try:
            await transport.send(Message(from_=MAILBOX, to="alice@example.org", subject="s", text="t").envelope(),
                                 b"Subject: s\r\n\r\nt\r\n")  # fmt: skip
        except Exception as e:
            failure: object = e
        else:
            raise AssertionError("the server accepted the message")
        finally:
            await transport.aclose()
    explanation = explain_failure(failure, doc)
    assert explanation is SESSION[entry], explanation
    assert not explanation.transient and explanation.broken  # the settings must change


def _smtp_server(server: ScriptedMTA, **smtp: Any) -> Any:
    return parse_server({"kind": "smtp", "from_address": MAILBOX,
                         "smtp": {"host": server.host, "port": server.port, "security": "none", **smtp},
                         "connection": {"connect_timeout": 0.5, "protocol_timeout": 5}})  # fmt: skip


def test_no_catalogue_entry_is_without_its_case() -> None:
    assert set(AADSTS) == set(AADSTS_CASES)
    assert set(GRAPH) == set(GRAPH_CASES)
    assert set(SESSION) == set(SESSION_CASES)
