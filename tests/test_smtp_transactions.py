"""Message transactions: pipelining, per-recipient outcomes, splitting on 452, failures in the
middle, SIZE / 8BITMIME / SMTPUTF8, and the protocol log's redaction."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from mailgate import Envelope, Message, Outcome
from mailgate.smtp import (
    OAuth2Auth,
    PasswordAuth,
    SMTPClient,
    SMTPConfig,
    SMTPNotSupportedError,
)
from mailgate.transports.smtp import SMTPTransport
from smtp_servers import RecordingServer, ServerConfig, scripted, serve

USER = "user@example.com"
PASSWORD = "correct horse battery staple"


def config(server: RecordingServer, **kw: Any) -> SMTPConfig:
    kw.setdefault("security", server.config.security)
    kw.setdefault("ca_file", str(server.ca_file) if server.ca_file else None)
    return SMTPConfig(server.host, server.port, helo_name="client.example", connect_timeout=5, protocol_timeout=5, **kw)


def message(to: Any = "rcpt@example.com", **kw: Any) -> Message:
    kw.setdefault("subject", "test")
    kw.setdefault("text", "hello")
    return Message(from_=USER, to=to, **kw)


def octets(data: bytes) -> int:
    """What SIZE= declares (RFC 1870): the message with the final CRLF the client adds."""
    return len(data if data.endswith(b"\r\n") else data + b"\r\n")


def commands(server: RecordingServer) -> list[str]:
    return [c.split()[0].upper() if c else "" for c in server.commands]


# ---- pipelining ---------------------------------------------------------------------------------


async def test_pipelining_sends_mail_rcpts_and_data_in_one_write() -> None:
    m = message(["a@example.com", "b@example.com", "c@example.com"])
    async with serve(ServerConfig(pipelining=True, size=10_000)) as server:
        async with SMTPClient(config(server)) as smtp:
            assert smtp.pipelining
            delivery = await smtp.send(m.envelope(), m.compose())
        chunks = server.connections[0].chunks
    assert delivery.all_accepted
    batch = [c for c in chunks if c.startswith(b"MAIL FROM")]
    assert batch == [
        b"MAIL FROM:<user@example.com> SIZE=" + str(octets(m.compose())).encode() + b"\r\n"
        b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    ]


async def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    m = message(["a@example.com", "b@example.com"])
    async with serve(ServerConfig(pipelining=False)) as server:
        async with SMTPClient(config(server)) as smtp:
            assert not smtp.pipelining
            delivery = await smtp.send(m.envelope(), m.compose())
        chunks = server.connections[0].chunks
    assert delivery.all_accepted
    starts = [c.split(b" ")[0].split(b":")[0] for c in chunks]
    assert starts[1:5] == [b"MAIL", b"RCPT", b"RCPT", b"DATA\r\n"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_several_messages_share_one_connection(pipelining: bool) -> None:
    async with serve(ServerConfig(pipelining=pipelining)) as server:
        async with SMTPClient(config(server)) as smtp:
            for i in range(5):
                m = message(f"r{i}@example.com", text=f"body {i}")
                assert (await smtp.send(m.envelope(), m.compose())).all_accepted
        received = await server.wait_for_messages(5)
    assert server.connection_count == 1
    assert [r.rcpt_tos for r in received] == [[f"r{i}@example.com"] for i in range(5)]


# ---- per-recipient outcomes ---------------------------------------------------------------------


def refuse_bad(address: str, index: int) -> str | None:
    if address.startswith("bad"):
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    if address.startswith("full"):
        return "452 4.2.2 Mailbox full"
    return None


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refused_recipients_do_not_stop_the_others(pipelining: bool) -> None:
    m = message(["good1@example.com", "bad@example.com", "full@example.com", "good2@example.com"])
    async with serve(ServerConfig(pipelining=pipelining, rcpt_reply=refuse_bad)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(m.envelope(), m.compose())
        (received,) = await server.wait_for_messages(1)
    by = {r.recipient: r for r in delivery.results}
    assert by["good1@example.com"].outcome is Outcome.ACCEPTED
    assert by["good2@example.com"].outcome is Outcome.ACCEPTED
    assert (by["bad@example.com"].outcome, by["bad@example.com"].code, by["bad@example.com"].enhanced) == (
        Outcome.PERMANENT,
        550,
        "5.1.1",
    )
    assert "User unknown" in by["bad@example.com"].text
    assert (by["full@example.com"].outcome, by["full@example.com"].enhanced) == (Outcome.TRANSIENT, "4.2.2")
    assert received.rcpt_tos == ["good1@example.com", "good2@example.com"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_too_many_recipients_go_in_further_transactions(pipelining: bool) -> None:
    def two_per_transaction(address: str, index: int) -> str | None:
        return "452 4.5.3 Too many recipients" if index >= 2 else None

    rcpts = [f"r{i}@example.com" for i in range(5)]
    async with serve(ServerConfig(pipelining=pipelining, rcpt_reply=two_per_transaction)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(message(rcpts).envelope(), message(rcpts).compose())
        received = await server.wait_for_messages(3)
    assert delivery.all_accepted
    assert [r.rcpt_tos for r in received] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
    assert server.connection_count == 1


async def test_too_many_recipients_with_no_progress_stops_as_transient() -> None:
    async with serve(ServerConfig(pipelining=True, rcpt_reply=lambda a, i: "452 4.5.3 Too many recipients")) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(
                message(["a@example.com", "b@example.com"]).envelope(), b"Subject: x\r\n\r\nx\r\n"
            )
            assert smtp.is_connected
    assert [r.outcome for r in delivery.results] == [Outcome.TRANSIENT, Outcome.TRANSIENT]
    assert commands(server).count("MAIL") == 1
    assert server.messages == []


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 Try again later", Outcome.TRANSIENT), ("554 5.6.0 Message rejected", Outcome.PERMANENT)],
)
async def test_final_reply_after_data_applies_to_every_accepted_recipient(reply: str, outcome: Outcome) -> None:
    async with serve(ServerConfig(pipelining=True, data_reply=lambda msg: reply)) as server:
        async with SMTPClient(config(server)) as smtp:
            m = message(["a@example.com", "b@example.com"])
            delivery = await smtp.send(m.envelope(), m.compose())
            assert {(r.outcome, r.code) for r in delivery.results} == {(outcome, int(reply[:3]))}
            # The connection is still good for the next message.
            assert smtp.is_connected


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_from_refused_fails_every_recipient_and_rset_keeps_the_connection(pipelining: bool) -> None:
    def send_as_denied(address: str, options: list[str]) -> str | None:
        if address == "other@example.com":
            return "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
        return None

    async with serve(ServerConfig(pipelining=pipelining, mail_reply=send_as_denied)) as server:
        async with SMTPClient(config(server)) as smtp:
            m = message(["a@example.com", "b@example.com"])
            refused = await smtp.send(m.envelope(mail_from="other@example.com"), m.compose())
            accepted = await smtp.send(m.envelope(), m.compose())
        (received,) = await server.wait_for_messages(1)
    assert {(r.outcome, r.enhanced) for r in refused.results} == {(Outcome.PERMANENT, "5.7.60")}
    assert accepted.all_accepted
    assert "RSET" in commands(server)
    assert received.mail_from == USER


async def test_all_recipients_refused_sends_no_body_and_resets() -> None:
    async with serve(ServerConfig(pipelining=True, rcpt_reply=refuse_bad)) as server:
        async with SMTPClient(config(server)) as smtp:
            m = message(["bad1@example.com", "bad2@example.com"])
            delivery = await smtp.send(m.envelope(), m.compose())
            assert smtp.is_connected
    assert {r.outcome for r in delivery.results} == {Outcome.PERMANENT}
    assert server.messages == []
    assert commands(server)[-2:] == ["RSET", "QUIT"]


# ---- failures in the middle ---------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["aiosmtpd", "scripted"])
async def test_connection_dropped_after_data_is_transient_and_marked_uncertain(fixture: str) -> None:
    m = message(["a@example.com", "b@example.com"])
    if fixture == "aiosmtpd":
        async with serve(ServerConfig(pipelining=True, drop_after_data=True)) as server:
            async with SMTPClient(config(server)) as smtp:
                delivery = await smtp.send(m.envelope(), m.compose())
                assert not smtp.is_connected
    else:
        async with scripted("drop-after-data") as scripted_server:
            async with SMTPClient(SMTPConfig(scripted_server.host, scripted_server.port, security="none")) as smtp:
                delivery = await smtp.send(m.envelope(), m.compose())
    assert [(r.outcome, r.uncertain) for r in delivery.results] == [(Outcome.TRANSIENT, True)] * 2
    assert "may have been accepted" in delivery.results[0].text


async def test_a_server_that_goes_silent_mid_transaction_times_out_as_transient() -> None:
    m = message()
    async with scripted("silent-after-ehlo") as server:
        async with SMTPClient(SMTPConfig(server.host, server.port, security="none", protocol_timeout=0.3)) as smtp:
            delivery = await smtp.send(m.envelope(), m.compose())
            assert not smtp.is_connected
    (result,) = delivery.results
    assert (result.outcome, result.uncertain, result.code) == (Outcome.TRANSIENT, False, None)
    assert "did not answer within 0.3 s" in result.text


# ---- SIZE, 8BITMIME, SMTPUTF8 -------------------------------------------------------------------


async def test_size_is_declared_and_an_oversize_message_is_refused_before_mail() -> None:
    async with serve(ServerConfig(size=2000)) as server:
        async with SMTPClient(config(server)) as smtp:
            assert smtp.max_size == 2000
            small = message()
            assert (await smtp.send(small.envelope(), small.compose())).all_accepted
            big = message(text="x" * 3000)
            with pytest.raises(SMTPNotSupportedError, match="accepts at most 2,000 \\(SIZE\\)") as e:
                await smtp.send(big.envelope(), big.compose())
            assert smtp.is_connected
        (received,) = await server.wait_for_messages(1)
    assert f"SIZE={octets(small.compose())}" in received.mail_options
    assert commands(server).count("MAIL") == 1
    assert not e.value.transient


INTERNATIONAL = {"from_": "jörg@exämple.de", "to": ["用户@例子.广告"], "subject": "Grüße", "text": "Hallo"}


async def test_smtputf8_is_used_for_internationalized_addresses_when_offered() -> None:
    m = Message(**INTERNATIONAL)  # type: ignore[arg-type]
    async with serve(ServerConfig(smtputf8=True, pipelining=True)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(m.envelope(), m.compose())
        (received,) = await server.wait_for_messages(1)
    assert delivery.all_accepted
    assert "SMTPUTF8" in received.mail_options
    assert received.mail_from == "jörg@exämple.de"
    assert received.rcpt_tos == ["用户@例子.广告"]
    assert received.parsed()["To"].addresses[0].addr_spec == "用户@例子.广告"


async def test_smtputf8_needed_but_not_offered_is_refused_before_anything_is_sent() -> None:
    m = Message(**INTERNATIONAL)  # type: ignore[arg-type]
    async with serve(ServerConfig(smtputf8=False)) as server, SMTPClient(config(server)) as smtp:
        with pytest.raises(SMTPNotSupportedError, match="does not offer SMTPUTF8"):
            await smtp.send(m.envelope(), m.compose())
    assert "MAIL" not in commands(server)


async def test_8bit_body_is_declared_with_body_8bitmime() -> None:
    raw = (
        "Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n"
    )
    async with serve(ServerConfig()) as server:
        async with SMTPClient(config(server)) as smtp:
            assert (await smtp.send(Envelope(USER, ("a@example.com",)), raw.encode())).all_accepted
        (received,) = await server.wait_for_messages(1)
    assert "BODY=8BITMIME" in received.mail_options
    assert "SMTPUTF8" not in received.mail_options
    assert received.content.endswith("Grüße\r\n".encode())


async def test_8bit_body_to_a_server_without_8bitmime_is_refused() -> None:
    async with serve(ServerConfig(eightbitmime=False)) as server, SMTPClient(config(server)) as smtp:
        with pytest.raises(SMTPNotSupportedError, match="8BITMIME"):
            await smtp.send(Envelope(USER, ("a@example.com",)), "Subject: x\r\n\r\nGrüße\r\n".encode())
    assert "MAIL" not in commands(server)


async def test_leading_dots_and_bare_line_feeds_arrive_intact() -> None:
    raw = b"Subject: dots\r\n\r\n.one dot\n..two dots\r\n.\r\nlast"
    async with serve(ServerConfig(pipelining=True)) as server:
        async with SMTPClient(config(server)) as smtp:
            assert (await smtp.send(Envelope(USER, ("a@example.com",)), raw)).all_accepted
        (received,) = await server.wait_for_messages(1)
    assert received.content == b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nlast\r\n"


async def test_envelope_addresses_cannot_inject_commands() -> None:
    async with serve(ServerConfig()) as server, SMTPClient(config(server)) as smtp:
        with pytest.raises(ValueError, match="cannot be used in an SMTP command"):
            await smtp.send(Envelope(USER, ("a@example.com>\r\nRCPT TO:<evil@example.com",)), b"x\r\n")
    assert "MAIL" not in commands(server)


# ---- the transport composes for the server ------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "utf8_headers", "raw_utf8"), [(True, True, True), (False, True, False), (True, False, False)]
)
async def test_transport_writes_utf8_headers_only_when_offered_and_allowed(
    offered: bool, utf8_headers: bool, raw_utf8: bool
) -> None:
    m = message(subject="Grüße aus Köln")
    async with serve(ServerConfig(smtputf8=offered)) as server:
        transport = SMTPTransport(config(server), utf8_headers=utf8_headers)
        assert (await transport.send(m.envelope(), m)).all_accepted
        await transport.aclose()
        (received,) = await server.wait_for_messages(1)
    assert ("Subject: Grüße aus Köln".encode() in received.content) is raw_utf8
    assert ("SMTPUTF8" in received.mail_options) is raw_utf8
    assert received.parsed()["Subject"] == "Grüße aus Köln"


async def test_transport_reconnects_when_its_connection_is_gone() -> None:
    async with serve(ServerConfig(drop_after_data=False)) as server:
        transport = SMTPTransport(config(server))
        assert (await transport.send(message().envelope(), message())).all_accepted
        await server._abort_connections()
        await server.wait_until(lambda: all(c.closed for c in server.connections))
        # The first send notices the dead connection; the transport opens a new one for the next.
        results = [await transport.send(message().envelope(), message()) for _ in range(2)]
        await transport.aclose()
    assert results[-1].all_accepted
    assert server.connection_count == 2


# ---- protocol log ------------------------------------------------------------------------------


def _secrets_forms(user: str, secret: str) -> list[str]:
    return [
        secret,
        base64.b64encode(f"\0{user}\0{secret}".encode()).decode(),
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(f"user={user}\x01auth=Bearer {secret}\x01\x01".encode()).decode(),
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"])
async def test_protocol_log_redacts_every_secret_and_the_message_content(mechanism: str) -> None:
    secret = "S3cr3t-" + mechanism
    token_value = "ya29.token-" + mechanism
    log: list[str] = []
    cfg = ServerConfig(
        security="starttls",
        auth=frozenset({mechanism}),
        password=secret,
        tokens=frozenset({token_value}),
        pipelining=True,
    )
    creds: Any = (
        OAuth2Auth(USER, _token(token_value)) if mechanism == "XOAUTH2" else PasswordAuth(USER, secret, mechanism)
    )
    m = message(text="Your password reset link: https://app.example/reset/very-secret-reset-token")
    async with serve(cfg) as server, SMTPClient(config(server, auth=creds), protocol_log=log.append) as smtp:
        assert (await smtp.send(m.envelope(), m.compose())).all_accepted
    text = "\n".join(log)
    assert f"C: AUTH {mechanism}" in text and "[redacted]" in text
    forbidden = [*_secrets_forms(USER, secret), *_secrets_forms(USER, token_value), "very-secret-reset-token"]
    if mechanism == "CRAM-MD5":
        forbidden.append(base64.b64encode(USER.encode()).decode())
    for value in forbidden:
        assert value not in text, f"{value!r} leaked into the protocol log"
    assert "C: MAIL FROM:<user@example.com>" in text
    assert "C: [message content," in text
    assert any(line.startswith("S: 250") for line in log)


def _token(value: str) -> Any:
    async def source() -> str:
        return value

    return source


def test_cram_md5_digest_is_the_rfc_2195_example() -> None:
    # RFC 2195's worked example, computed the way auth.py computes it.
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    digest = hmac.new(b"tanstaaftanstaaf", challenge, hashlib.md5).hexdigest()
    assert digest == "b913a602c7eda7a495b4e6e7334d3890"
