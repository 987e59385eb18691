"""Mechanism auto falls back: a password mechanism the server refuses for itself (504, or 535
not blaming something else) is followed by the next one both sides have; once per pool, never
with an explicit mechanism, and never past a reply that says the mechanism is not the problem."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.config import Config
from mailgate.diagnostics.catalogue import explain_smtp_error
from mailgate.message import Envelope
from mailgate.settings.document import parse_server
from mailgate.smtp import PasswordAuth, SMTPClient, SMTPConfig
from mailgate.smtp.errors import SMTPAuthError
from mailgate.transports.pool import Pools

USER, PASSWORD = "user@example.com", "correct horse battery staple"
MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
DOVECOT_HASHES = "535 5.7.8 Error: authentication failed: authentication failure"  # CRAM-MD5 over hashed passwords
NOT_SUPPORTED = "504 5.5.4 Unrecognized authentication type"


class _Server:
    """An aiosmtpd server that offers CRAM-MD5 but refuses it with `cram_reply` (504 at once, else
    after the challenge, as Dovecot does when it keeps only password hashes), and checks LOGIN and
    PLAIN against PASSWORD. `attempts` holds every AUTH: (mechanism, accepted)."""

    def __init__(self, cram_reply: str, offered: set[str]) -> None:
        self.cram_reply = cram_reply
        self.offered = offered
        self.attempts: list[tuple[str, bool]] = []
        self.port = 0

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        if not self.cram_reply.startswith("504"):
            await server.challenge_auth("<1896.697170952@mx.test>")
        self.attempts.append(("CRAM-MD5", False))
        if self.cram_reply.startswith("504"):
            await server.push(self.cram_reply)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=self.cram_reply)

    def check(self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        ok = data.login.decode() == USER and data.password.decode() == PASSWORD
        self.attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: queued as 4F3kQj1xyz"


@asynccontextmanager
async def refusing(cram_reply: str, offered: set[str] | None = None) -> AsyncIterator[_Server]:
    handler = _Server(cram_reply, offered or {"CRAM-MD5", "LOGIN"})
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        return SMTP(handler, hostname="mx.test", auth_require_tls=False, authenticator=handler.check,
                    auth_exclude_mechanism={"CRAM-MD5", "PLAIN", "LOGIN"} - handler.offered, loop=loop)  # fmt: skip

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    handler.port = server.sockets[0].getsockname()[1]
    try:
        yield handler
    finally:
        server.close()


def config(server: _Server, password: str = PASSWORD, mechanism: str = "auto") -> SMTPConfig:
    return SMTPConfig("127.0.0.1", server.port, security="none", protocol_timeout=5,
                      auth=PasswordAuth(USER, password, mechanism))  # fmt: skip


async def login(server: _Server, **kw: Any) -> SMTPClient:
    client = SMTPClient(config(server, **kw))
    try:
        await client.connect()
    finally:
        await client.quit()
    return client


@pytest.mark.parametrize("refusal", [DOVECOT_HASHES, NOT_SUPPORTED])
async def test_a_refused_cram_md5_falls_back_to_login(refusal: str) -> None:
    async with refusing(refusal) as server:
        client = await login(server)
    assert server.attempts == [("CRAM-MD5", False), ("LOGIN", True)]
    assert client.auth_mechanism == "LOGIN"
    assert [(t.mechanism, t.code) for t in client.auth_tries] == [("CRAM-MD5", int(refusal[:3])), ("LOGIN", 235)]


async def test_the_fallback_goes_to_plain_before_login() -> None:
    async with refusing(DOVECOT_HASHES, {"CRAM-MD5", "PLAIN", "LOGIN"}) as server:
        client = await login(server)
    assert server.attempts == [("CRAM-MD5", False), ("PLAIN", True)] and client.auth_mechanism == "PLAIN"


async def test_an_explicit_mechanism_never_falls_back() -> None:
    async with refusing(DOVECOT_HASHES) as server:
        with pytest.raises(SMTPAuthError) as e:
            await login(server, mechanism="CRAM-MD5")
    assert server.attempts == [("CRAM-MD5", False)] and e.value.code == 535


@pytest.mark.parametrize(
    "reply",
    [
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit "
        "https://aka.ms/smtp_auth_disabled for more information.",
        "535 5.7.3 Authentication unsuccessful",
        "454 4.7.0 Temporary authentication failure",
    ],
)
async def test_no_fallback_when_the_reply_blames_something_else(reply: str) -> None:
    async with refusing(reply) as server:
        with pytest.raises(SMTPAuthError) as e:
            await login(server)
    assert server.attempts == [("CRAM-MD5", False)]
    assert (e.value.code, e.value.transient) == (int(reply[:3]), reply.startswith("4"))
    assert e.value.tries == ()


@pytest.mark.parametrize("refusal", [DOVECOT_HASHES, NOT_SUPPORTED])
async def test_a_wrong_password_refused_by_every_mechanism_is_the_credentials_failure(refusal: str) -> None:
    async with refusing(refusal) as server:
        with pytest.raises(SMTPAuthError) as e:
            await login(server, password="wrong")
    assert server.attempts == [("CRAM-MD5", False), ("LOGIN", False)]
    err = e.value
    assert (err.code, err.enhanced, err.mechanism, err.transient) == (535, "5.7.8", "LOGIN", False)
    assert [t.mechanism for t in err.tries] == ["CRAM-MD5", "LOGIN"]
    explained = explain_smtp_error(err)
    assert "every mechanism" in explained.cause and f"CRAM-MD5 ({refusal[:9]}" in explained.cause
    assert "LOGIN (535" in explained.cause and "password" in explained.fix and explained.broken


def pool_server(server: _Server, password: str = PASSWORD) -> Any:
    return parse_server({"kind": "smtp", "from_address": "no-reply@example.com",
                         "smtp": {"host": "127.0.0.1", "port": server.port, "security": "none"},
                         "auth": {"method": "password", "username": USER, "password": password},
                         "connection": {"protocol_timeout": 5}})  # fmt: skip


async def _send_through(pools: Pools, doc: Any) -> object:
    async with pools.get(1, 1, doc).transport() as transport:
        try:
            return await transport.send(Envelope("a@example.com", ("b@example.com",)), MESSAGE)
        except SMTPAuthError as e:
            return e


async def test_a_pool_falls_back_once_not_per_connection() -> None:
    async with refusing(DOVECOT_HASHES) as server:
        pools = Pools()
        try:
            results = await asyncio.gather(*(_send_through(pools, pool_server(server)) for _ in range(3)))
            later = await _send_through(pools, pool_server(server))  # a kept connection, or a new one: LOGIN
        finally:
            await pools.aclose()
    assert all(not isinstance(r, Exception) for r in [*results, later])
    assert server.attempts.count(("CRAM-MD5", False)) == 1
    assert server.attempts.count(("LOGIN", True)) == 3


async def test_connections_waiting_for_a_refused_round_do_not_try_again() -> None:
    async with refusing(DOVECOT_HASHES) as server:
        pools = Pools()
        try:
            results = await asyncio.gather(*(_send_through(pools, pool_server(server, "wrong")) for _ in range(3)))
        finally:
            await pools.aclose()
    assert all(isinstance(r, SMTPAuthError) and len(r.tries) == 2 for r in results)
    assert server.attempts == [("CRAM-MD5", False), ("LOGIN", False)]  # two failed sign-ins, not six


async def test_the_test_email_shows_each_try(tmp_path: Path) -> None:
    config = Config(tenant_networks="loopback")
    async with (
        Mailgate.open(f"sqlite:///{tmp_path}/m.db", secret_keys=TEST_KEY, actor="admin", config=config) as mg,
        refusing(DOVECOT_HASHES) as server,
    ):
        await mg.tenants.add("acme", may_use_own_server=True)
        await mg.servers.set("acme", pool_server(server).model_dump(mode="json") | {
            "auth": {"method": "password", "username": USER, "password": PASSWORD}})  # fmt: skip
        report = await mg.test_server("acme", "admin@acme.example", dry_run=True)
    auth = next(s for s in report.to_dict()["steps"] if s["name"] == "auth")
    assert report.ok and auth["details"]["used"] == "LOGIN"
    assert auth["details"]["tries"] == [
        {"mechanism": "CRAM-MD5", "code": 535, "reply": DOVECOT_HASHES},
        {"mechanism": "LOGIN", "code": 235, "reply": "235 2.7.0 Authentication successful"},
    ]
    assert PASSWORD not in str(report.to_dict())
