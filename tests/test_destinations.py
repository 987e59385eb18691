"""The destination policy (src/mailgate/destinations.py) and what foreign servers may make mailgate
show: every way of writing a loopback, private or metadata address is refused for tenants before a
connection is made; the HTTP client for token endpoints and Graph connects only to checked
addresses; a token endpoint's or Graph's reply is shown only as far as it is OAuth's or Graph's,
bounded, without our secrets. The same through the HTTP API and the worker: tests/test_hostile.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mailgate._http import new_client
from mailgate.config import Config
from mailgate.destinations import DestinationPolicy, DestinationRefused, Destinations, parse_networks
from mailgate.errors import SettingsError
from mailgate.oauth import TokenError
from mailgate.oauth.endpoints import Endpoint
from mailgate.oauth.tokens import request_token

SECRET = "Qx~8Q~the-client-secret-value-1234"
LOOPBACK_FORMS = ["127.0.0.1", "127.1.2.3", "localhost", "2130706433", "0x7f.1", "0177.0.0.1", "::1", "[::1]",
                  "::ffff:127.0.0.1", "0.0.0.0"]  # fmt: skip
INTERNAL = ["10.0.0.5", "172.16.3.4", "192.168.1.1", "100.64.0.1", "169.254.169.254", "fd00:ec2::254", "fe80::1",
            "64:ff9b::a9fe:a9fe", "224.0.0.1"]  # fmt: skip


# ---- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", LOOPBACK_FORMS + INTERNAL)
async def test_tenants_may_not_reach_loopback_private_or_metadata_addresses(host: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        await Destinations().tenant.resolve(host, 25)
    assert "MAILGATE_TENANT_NETWORKS" in str(refused.value) and refused.value.transient is False


async def test_public_addresses_are_allowed_without_asking_anyone() -> None:
    assert await Destinations().tenant.resolve("8.8.8.8", 25) == ["8.8.8.8"]
    assert await Destinations().tenant.resolve("2001:4860:4860::8888", 25) == ["2001:4860:4860::8888"]


async def test_the_global_server_may_reach_loopback_and_private_networks_but_not_metadata() -> None:
    policy = Destinations().global_
    assert await policy.resolve("localhost", 25) == ["127.0.0.1"]
    assert await policy.resolve("10.1.2.3", 25) == ["10.1.2.3"]
    with pytest.raises(DestinationRefused, match=r"link-local.*MAILGATE_GLOBAL_NETWORKS"):
        await policy.resolve("169.254.169.254", 80)


async def test_the_operator_widens_a_policy_by_network_or_word() -> None:
    d = Config(tenant_networks="10.8.0.0/16, loopback", global_networks="any").destinations
    assert await d.tenant.resolve("10.8.1.2", 25) == ["10.8.1.2"]
    assert await d.tenant.resolve("127.0.0.1", 25) == ["127.0.0.1"]
    with pytest.raises(DestinationRefused):
        await d.tenant.resolve("10.9.0.1", 25)
    assert await d.global_.resolve("169.254.169.254", 80) == ["169.254.169.254"]


def test_a_bad_network_setting_is_refused_naming_it() -> None:
    with pytest.raises(SettingsError) as e:
        Config(tenant_networks="10.0.0.0/33")
    assert e.value.problems[0][0] == "tenant_networks" and "'10.0.0.0/33'" in e.value.problems[0][1]
    assert parse_networks("") == ()


# ---- the HTTP client ----------------------------------------------------------------------------


@asynccontextmanager
async def http_peer(reply: bytes | Callable[[bytes], bytes]) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw TCP peer on 127.0.0.1 that answers each request with `reply` (bytes, or made from the
    request) and closes: (its base URL, the requests it read)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            request = head + await reader.readexactly(length)
            seen.append(request)
            writer.write(reply(request) if callable(reply) else reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()


async def test_a_tenant_client_never_connects_to_loopback() -> None:
    connections = 0

    def count(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with new_client(Destinations().tenant) as http:
        for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"):
            with pytest.raises(DestinationRefused):
                await http.post(f"http://{host}:{port}/token", data={"grant_type": "client_credentials"})
    server.close()
    assert connections == 0


async def test_a_client_whose_policy_allows_loopback_connects() -> None:
    async with http_peer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as (url, seen):
        async with new_client(DestinationPolicy("tenant", parse_networks("loopback"))) as http:
            assert (await http.get(url + "/")).text == "ok"
    assert len(seen) == 1


# ---- what a token endpoint may make mailgate say ------------------------------------------------


def endpoint(url: str) -> Endpoint:
    return Endpoint("generic", url + "/token", "client-1", SECRET, "https://mail.example/.default")


def response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def refusal(reply: bytes) -> TokenError:
    async with http_peer(reply) as (url, _), new_client() as http:
        with pytest.raises(TokenError) as e:
            await request_token(http, endpoint(url), {"grant_type": "client_credentials"}, timeout=(5, 5))
    return e.value


async def test_a_token_endpoint_that_echoes_the_secret_is_not_repeated() -> None:
    body = {"error": "invalid_client", "error_description": f"AADSTS7000215: Invalid client secret {SECRET} given"}
    e = await refusal(response("401 Unauthorized", json.dumps(body).encode()))
    assert SECRET not in str(e) and "[redacted]" in str(e) and e.error == "invalid_client"


async def test_a_token_endpoints_words_are_bounded() -> None:
    body = {"error": "invalid_request" * 1000, "error_description": "x" * 100_000 + "\nsecond line",
            "error_codes": list(range(10_000)), "trace_id": "t" * 10_000}  # fmt: skip
    e = await refusal(response("400 Bad Request", json.dumps(body).encode()))
    assert len(str(e)) < 1000 and "second line" not in str(e)
    assert e.error is None and len(e.error_codes) <= 10 and e.trace_id is None


@pytest.mark.parametrize(
    "reply",
    [
        b"220 relay.internal.corp ESMTP Postfix (Debian/GNU)\r\n",  # an SMTP server's banner
        b"-ERR unknown command 'POST', with args beginning with: internal-redis\r\n",
        response("404 Not Found", b"<html><title>Jenkins internal dashboard</title></html>", "text/html"),
        response("500 Internal Server Error", b'{"detail": "internal stack trace at /srv/app.py"}'),
    ],
)
async def test_a_server_that_is_not_a_token_endpoint_is_not_quoted(reply: bytes) -> None:
    e = await refusal(reply)
    text = str(e)
    assert not any(word in text for word in ("relay.internal", "internal-redis", "Jenkins", "stack trace")), text


async def test_an_endless_token_reply_is_not_read_whole() -> None:
    huge = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
    e = await refusal(huge + b'{"error_description": "' + b"A" * 3_000_000)
    assert "did not answer as an HTTP server would (TooLarge)" in str(e) and e.transient


# ---- the test e-mail --------------------------------------------------------------------------


async def test_the_test_e_mail_explains_a_refused_destination(tmp_path: Path) -> None:
    from conftest import TEST_KEY
    from mailgate import Mailgate

    url = f"sqlite:///{tmp_path}/m.db"
    document = {"from_address": "no-reply@acme.example", "smtp": {"host": "localhost", "port": 2525,
                                                                   "security": "none"}}  # fmt: skip
    async with Mailgate.open(url, secret_keys=TEST_KEY, config=Config(tenant_networks="loopback")) as allowed:
        await allowed.tenants.add("acme", may_use_own_server=True)
        await allowed.servers.set("acme", document)  # saved while the operator allowed loopback
    async with Mailgate.open(url, secret_keys=TEST_KEY, config=Config()) as mg:
        report = (await mg.test_server("acme", "admin@acme.example")).to_dict()
        with pytest.raises(SettingsError) as saving:
            await mg.servers.set("acme", document)
    failed = next(s for s in report["steps"] if s["status"] == "failed")
    assert failed["name"] == "dns" and "localhost (127.0.0.1) is a loopback address" in failed["cause"]
    assert "MAILGATE_TENANT_NETWORKS" in failed["fix"] and "public host name" in failed["fix"]
    assert [f for f, _ in saving.value.problems] == ["smtp.host"]
