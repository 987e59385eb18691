"""The SMTP client's session: connect, TLS in every security mode, AUTH with every mechanism, and
what it refuses to do. Real aiosmtpd servers on 127.0.0.1 (tests/smtp_servers.py)."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import certs
from mailgate import Message
from mailgate.smtp import (
    OAuth2Auth,
    PasswordAuth,
    SMTPAuthError,
    SMTPClient,
    SMTPConfig,
    SMTPConnectError,
    SMTPSecurityError,
    SMTPTimeoutError,
    SMTPTLSError,
)
from smtp_servers import RecordingServer, ServerConfig, scripted, serve

PASSWORD = "correct horse battery staple"
USER = "user@example.com"
TOKEN = "ya29." + "a0AfH6SMB-realistic-token-" * 60  # about 1.6 KB, like real access tokens


def token_source(token: str = TOKEN) -> Callable[[], Awaitable[str]]:
    async def source() -> str:
        return token

    return source


def config(server: RecordingServer, **kw: Any) -> SMTPConfig:
    kw.setdefault("security", server.config.security)
    kw.setdefault("ca_file", str(server.ca_file) if server.ca_file else None)
    return SMTPConfig(server.host, server.port, helo_name="client.example", connect_timeout=5, protocol_timeout=5, **kw)


def message(**kw: Any) -> Message:
    fields: dict[str, Any] = {"from_": USER, "to": "rcpt@example.com", "subject": "test", "text": "hello"}
    fields.update(kw)
    return Message(**fields)


async def send_one(server: RecordingServer, **kw: Any) -> SMTPClient:
    m = message()
    async with SMTPClient(config(server, **kw)) as smtp:
        delivery = await smtp.send(m.envelope(), m.compose())
        assert delivery.all_accepted, delivery
    return smtp


SECURITY = ["none", "starttls", "starttls-required", "tls"]
AUTH = ["none", "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]


@pytest.mark.parametrize("security", SECURITY)
@pytest.mark.parametrize("mechanism", AUTH)
async def test_every_security_mode_with_every_auth_mechanism(security: str, mechanism: str) -> None:
    offered = frozenset() if mechanism == "none" else frozenset({mechanism})
    server_cfg = ServerConfig(
        security=security,  # type: ignore[arg-type]
        auth=offered,
        tokens=frozenset({TOKEN}),
        auth_require_tls=security != "none",
        auth_required=mechanism != "none",
    )
    creds: PasswordAuth | OAuth2Auth | None = None
    if mechanism == "XOAUTH2":
        creds = OAuth2Auth(USER, token_source())
    elif mechanism != "none":
        creds = PasswordAuth(USER, PASSWORD, mechanism)
    async with serve(server_cfg) as server:
        smtp = await send_one(server, auth=creds)
        (received,) = await server.wait_for_messages(1)
    assert received.tls == (security != "none")
    assert smtp.tls_active == (security != "none")
    assert received.auth_mechanism == (None if mechanism == "none" else mechanism)
    assert smtp.auth_mechanism == (None if mechanism == "none" else mechanism)
    assert received.rcpt_tos == ["rcpt@example.com"]
    assert b"hello" in received.content


async def test_auto_chooses_cram_md5_over_plain_and_login() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"PLAIN", "LOGIN", "CRAM-MD5"}))) as server:
        smtp = await send_one(server, auth=PasswordAuth(USER, PASSWORD))
    assert smtp.auth_mechanism == "CRAM-MD5"


async def test_auto_chooses_plain_over_login() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"PLAIN", "LOGIN"}))) as server:
        smtp = await send_one(server, auth=PasswordAuth(USER, PASSWORD))
    assert smtp.auth_mechanism == "PLAIN"


async def test_a_pinned_mechanism_is_used_even_when_a_stronger_one_is_offered() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"PLAIN", "LOGIN", "CRAM-MD5"}))) as server:
        smtp = await send_one(server, auth=PasswordAuth(USER, PASSWORD, "LOGIN"))
    assert smtp.auth_mechanism == "LOGIN"


async def test_a_pinned_mechanism_that_is_not_offered_is_a_clear_error() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"LOGIN", "XOAUTH2"}))) as server:
        with pytest.raises(SMTPAuthError, match="ask for CRAM-MD5 but the server offers AUTH LOGIN XOAUTH2"):
            await send_one(server, auth=PasswordAuth(USER, PASSWORD, "CRAM-MD5"))
        assert not any(c.upper().startswith("AUTH") for c in server.commands)


async def test_password_for_a_server_that_wants_xoauth2_names_the_offer() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"XOAUTH2"}))) as server:
        with pytest.raises(SMTPAuthError, match="offers AUTH XOAUTH2") as e:
            await send_one(server, auth=PasswordAuth(USER, PASSWORD))
    assert not e.value.transient


async def test_wrong_password_is_a_permanent_auth_error_with_the_reply() -> None:
    async with serve(ServerConfig(security="starttls", auth=frozenset({"PLAIN"}))) as server:
        with pytest.raises(SMTPAuthError) as e:
            await send_one(server, auth=PasswordAuth(USER, "wrong"))
    assert e.value.code == 535
    assert e.value.mechanism == "PLAIN"
    assert not e.value.transient
    assert server.messages == []


@pytest.mark.parametrize("security", SECURITY)
async def test_xoauth2_bad_token_answers_gmail_challenge_with_an_empty_line(security: str) -> None:
    cfg = ServerConfig(
        security=security,  # type: ignore[arg-type]
        auth=frozenset({"XOAUTH2"}),
        tokens=frozenset({TOKEN}),
        xoauth2_style="gmail",
        auth_require_tls=security != "none",
    )
    async with serve(cfg) as server:
        with pytest.raises(SMTPAuthError) as e:
            await send_one(server, auth=OAuth2Auth(USER, token_source("expired-token")))
        (attempt,) = server.auth_attempts
    assert attempt.answered_challenge_with_empty_line
    assert e.value.challenge == {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
    assert (e.value.code, e.value.enhanced) == (535, "5.7.8")
    assert "Username and Password not accepted" in (e.value.reply or "")
    assert '"status": "401"' in str(e.value)
    assert not e.value.transient


async def test_xoauth2_bad_token_on_exchange_is_535_5_7_3() -> None:
    cfg = ServerConfig(
        security="starttls", auth=frozenset({"XOAUTH2"}), tokens=frozenset({TOKEN}), xoauth2_style="exchange"
    )
    async with serve(cfg) as server:
        with pytest.raises(SMTPAuthError) as e:
            await send_one(server, auth=OAuth2Auth(USER, token_source("wrong")))
    assert (e.value.code, e.value.enhanced, e.value.challenge) == (535, "5.7.3", None)


async def test_xoauth2_sends_the_documented_initial_response() -> None:
    cfg = ServerConfig(security="starttls", auth=frozenset({"XOAUTH2"}), tokens=frozenset({TOKEN}))
    async with serve(cfg) as server:
        await send_one(server, auth=OAuth2Auth(USER, token_source()))
    (auth_line,) = [c for c in server.commands if c.upper().startswith("AUTH")]
    blob = base64.b64decode(auth_line.split()[2])
    assert blob == f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()


async def test_starttls_required_refuses_a_server_without_starttls_before_auth() -> None:
    async with serve(ServerConfig(security="none", auth=frozenset({"PLAIN"}), auth_require_tls=False)) as server:
        with pytest.raises(SMTPSecurityError, match="does not offer STARTTLS"):
            await send_one(server, security="starttls-required", auth=PasswordAuth(USER, PASSWORD))
        assert [c.split()[0].upper() for c in server.commands] == ["EHLO", "QUIT"]  # no AUTH, a polite end


async def test_optional_starttls_never_sends_a_password_in_clear() -> None:
    async with serve(ServerConfig(security="none", auth=frozenset({"PLAIN"}), auth_require_tls=False)) as server:
        with pytest.raises(SMTPSecurityError, match="unencrypted"):
            await send_one(server, security="starttls", auth=PasswordAuth(USER, PASSWORD))
        assert not any(c.upper().startswith("AUTH") for c in server.commands)
        assert all(PASSWORD.encode() not in chunk for conn in server.chunks for chunk in conn)


async def test_optional_starttls_without_credentials_sends_in_clear_when_not_offered() -> None:
    async with serve(ServerConfig(security="none")) as server:
        smtp = await send_one(server, security="starttls")
    assert not smtp.tls_active


async def test_optional_starttls_upgrades_when_offered() -> None:
    async with serve(ServerConfig(security="starttls")) as server:
        smtp = await send_one(server, security="starttls")
        (received,) = await server.wait_for_messages(1)
    assert smtp.tls_active and received.tls
    assert smtp.tls_version in ("TLSv1.2", "TLSv1.3")


async def test_capabilities_are_learnt_again_after_starttls() -> None:
    async with serve(ServerConfig(security="starttls-required", auth=frozenset({"PLAIN"}))) as server:
        smtp = await send_one(server, auth=PasswordAuth(USER, PASSWORD))
    assert "STARTTLS" not in smtp.extensions  # the second EHLO's answer, not the first's
    assert smtp.auth_mechanisms == ["PLAIN"]  # offered only after TLS


@pytest.mark.parametrize("security", ["starttls-required", "tls"])
async def test_an_untrusted_certificate_is_refused_without_a_ca_file(security: str) -> None:
    async with serve(ServerConfig(security=security)) as server:  # type: ignore[arg-type]
        with pytest.raises(SMTPTLSError, match=r"not trusted.*give its certificate as ca_certificate") as e:
            await send_one(server, ca_file=None)
    assert not e.value.transient
    assert server.messages == []


@pytest.mark.parametrize("security", ["starttls-required", "tls"])
async def test_the_same_certificate_is_trusted_with_its_ca_file(security: str) -> None:
    async with serve(ServerConfig(security=security)) as server:  # type: ignore[arg-type]
        smtp = await send_one(server)
    assert smtp.peer_certificate


async def test_verification_can_be_switched_off_explicitly() -> None:
    async with serve(ServerConfig(security="tls")) as server:
        smtp = await send_one(server, ca_file=None, verify_certificate=False)
    assert smtp.tls_active


@pytest.fixture(scope="module")
def bad_certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = certs.make_ca("mailgate bad-cert CA")
    directory = tmp_path_factory.mktemp("badcerts")
    return {
        "ca_file": str(ca.write(directory)),
        "wrong host": ca.issue(hostnames=["wrong.example"], ips=[]).server_context(),
        "expired": ca.issue(not_before=certs.days_ago(30), not_after=certs.days_ago(1)).server_context(),
    }


@pytest.mark.parametrize(("case", "reason"), [("wrong host", "mismatch"), ("expired", "expired")])
async def test_wrong_host_and_expired_certificates_are_refused(
    bad_certificates: dict[str, Any], case: str, reason: str
) -> None:
    async with serve(ServerConfig(security="starttls-required", ssl_context=bad_certificates[case])) as server:
        with pytest.raises(SMTPTLSError, match=reason):
            await send_one(server, ca_file=bad_certificates["ca_file"])


async def test_a_421_greeting_is_a_transient_connect_error() -> None:
    async with scripted("greeting-421") as server:
        with pytest.raises(SMTPConnectError) as e:
            async with SMTPClient(SMTPConfig(server.host, server.port, security="none", protocol_timeout=5)):
                pass
    assert (e.value.code, e.value.enhanced) == (421, "4.3.2")
    assert e.value.transient


async def test_a_server_that_never_answers_times_out() -> None:
    async with scripted("silent") as server:
        with pytest.raises(SMTPTimeoutError, match=r"did not answer within 0\.3 s") as e:
            async with SMTPClient(SMTPConfig(server.host, server.port, security="none", protocol_timeout=0.3)):
                pass
    assert e.value.transient


async def test_connection_refused_is_a_transient_connect_error() -> None:
    async with serve(ServerConfig()) as server:
        port = server.port
    with pytest.raises(SMTPConnectError, match=f"cannot connect to 127.0.0.1:{port}") as e:
        async with SMTPClient(SMTPConfig("127.0.0.1", port, security="none", connect_timeout=2)):
            pass
    assert e.value.transient


async def test_ehlo_refused_falls_back_to_helo() -> None:
    async with serve(ServerConfig(ehlo_supported=False)) as server:
        smtp = await send_one(server)
        assert [c.split()[0].upper() for c in server.commands[:2]] == ["EHLO", "HELO"]
    assert not smtp.esmtp and smtp.extensions == {}


async def test_noop_rset_and_quit() -> None:
    async with serve(ServerConfig()) as server:
        smtp = SMTPClient(config(server))
        await smtp.connect()
        assert (await smtp.noop()).code == 250
        assert (await smtp.rset()).code == 250
        await smtp.quit()
        assert not smtp.is_connected
        assert [c.split()[0].upper() for c in server.commands] == ["EHLO", "NOOP", "RSET", "QUIT"]


def test_credentials_never_show_in_a_config_repr() -> None:
    cfg = SMTPConfig("smtp.example.com", auth=PasswordAuth(USER, PASSWORD))
    assert PASSWORD not in repr(cfg) and USER in repr(cfg)
    oauth = SMTPConfig("smtp.example.com", auth=OAuth2Auth(USER, token_source()))
    assert "token_source" not in repr(oauth) and "source" not in repr(oauth.auth)
