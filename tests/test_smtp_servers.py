"""Proof that the test SMTP servers (smtp_servers.py) and certificates (certs.py) behave
as documented, using the stdlib smtplib as a known-good client.

smtplib blocks, so against in-loop servers it runs in a worker thread via
asyncio.to_thread. Async tests rely on asyncio_mode = "auto".
"""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

import certs
from smtp_servers import (
    EXCHANGE_BAD_CREDENTIALS,
    GMAIL_BAD_CREDENTIALS,
    RecordingServer,
    ScriptedServer,
    ServerConfig,
    default_ca_file,
    scripted,
    scripted_in_thread,
    serve,
    serve_in_thread,
    xoauth2_payload,
)

CLIENT_TIMEOUT = 5.0
USER = ServerConfig().username
PASSWORD = ServerConfig().password
SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"
# The line starting with a dot checks that recorded content is un-dot-stuffed.
MESSAGE = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: test\r\n\r\nHello.\r\n.leading dot\r\n"
# Realistic OAuth2 access tokens run to a few KB, far over aiosmtpd's default
# 1001-byte line limit.
TOKEN = "ya29." + "x" * 3000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.PKI:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


def connect(server: RecordingServer | ScriptedServer, timeout: float = CLIENT_TIMEOUT) -> smtplib.SMTP:
    # An explicit local_hostname spares smtplib a possibly slow getfqdn().
    return smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=timeout)


def trusting(ca_file: Path | None) -> ssl.SSLContext:
    assert ca_file is not None
    return ssl.create_default_context(cafile=ca_file)


def xoauth2(token: str) -> Callable[..., str]:
    """smtplib authobject: the XOAUTH2 payload first, then an empty line."""
    calls = 0

    def authobject(challenge: bytes | None = None) -> str:
        nonlocal calls
        calls += 1
        return xoauth2_payload(USER, token) if calls == 1 else ""

    return authobject


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one (possibly multi-line) SMTP reply: (code, raw lines)."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
        assert line, "server closed the connection"
        lines += line
        if line[3:4] != b"-":
            return int(line[:3]), lines


# --- plain sessions ---------------------------------------------------------


async def test_plain_send_is_recorded() -> None:
    async with serve() as server:

        def send_twice() -> None:
            with connect(server) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                smtp.sendmail(SENDER, ["other@example.com"], MESSAGE)

        await asyncio.to_thread(send_twice)
        first, second = await server.wait_for_messages(2)
        await server.wait_until(lambda: server.connections[0].closed)

    assert (first.mail_from, first.rcpt_tos, first.content) == (SENDER, [RECIPIENT], MESSAGE)
    assert first.parsed()["Subject"] == "test"
    assert (first.tls, first.auth_mechanism, first.mail_options) == (False, None, [])
    assert first.reply == f"250 2.0.0 Ok: queued as {first.queue_id}"
    assert second.rcpt_tos == ["other@example.com"]
    assert first.queue_id != second.queue_id
    assert (server.connection_count, server.session_count) == (1, 1)
    assert server.commands[:5] == [
        "ehlo client.test",
        f"mail FROM:<{SENDER}>",
        f"rcpt TO:<{RECIPIENT}>",
        "data",
        f"mail FROM:<{SENDER}>",
    ]
    assert server.commands[-1] == "QUIT"


async def test_wait_for_messages_times_out() -> None:
    async with serve() as server:
        with pytest.raises(TimeoutError):
            await server.wait_for_messages(1, timeout=0.05)


# --- TLS ----------------------------------------------------------------------


async def test_starttls_verifies_with_ca_file_and_unlocks_auth() -> None:
    async with serve(ServerConfig(security="starttls", auth={"PLAIN"})) as server:

        def send() -> tuple[bool, bool]:
            with connect(server) as smtp:
                smtp.ehlo()
                auth_before_tls = smtp.has_extn("auth")
                smtp.starttls(context=trusting(server.ca_file))
                smtp.ehlo()
                auth_after_tls = smtp.has_extn("auth")
                smtp.login(USER, PASSWORD)
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                return auth_before_tls, auth_after_tls

        assert await asyncio.to_thread(send) == (False, True)
        [message] = await server.wait_for_messages(1)

    assert server.ca_file == default_ca_file()
    assert (message.tls, message.auth_mechanism, message.auth_login) == (True, "PLAIN", USER)
    assert server.connections[0].tls
    assert server.session_count == 2  # EHLO before and after STARTTLS
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert f"AUTH PLAIN {plain}" in server.commands


async def test_starttls_required_refuses_mail_before_tls() -> None:
    async with serve(ServerConfig(security="starttls-required")) as server:

        def talk() -> tuple[int, int]:
            with connect(server) as smtp:
                smtp.ehlo()
                before = smtp.mail(SENDER)[0]
                smtp.starttls(context=trusting(server.ca_file))
                smtp.ehlo()
                after = smtp.mail(SENDER)[0]
                return before, after

        assert await asyncio.to_thread(talk) == (530, 250)


async def test_implicit_tls_with_auth() -> None:
    async with serve(ServerConfig(security="tls", auth={"LOGIN"})) as server:

        def send() -> bool:
            with smtplib.SMTP_SSL(
                server.host,
                server.port,
                local_hostname="client.test",
                timeout=CLIENT_TIMEOUT,
                context=trusting(server.ca_file),
            ) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                return smtp.has_extn("starttls")

        assert await asyncio.to_thread(send) is False
        [message] = await server.wait_for_messages(1)

    assert (message.tls, message.auth_mechanism) == (True, "LOGIN")


@pytest.mark.parametrize(
    ("kind", "verify_error"),
    [("good", None), ("wrong-host", "mismatch"), ("expired", "certificate has expired")],
)
async def test_certificates_verify_as_intended(pki: certs.PKI, kind: str, verify_error: str | None) -> None:
    cert = {
        "good": pki.server,
        "wrong-host": pki.ca.issue(hostnames=["wrong.example"], ips=[]),
        "expired": pki.ca.issue(not_before=certs.days_ago(30), not_after=certs.days_ago(1)),
    }[kind]
    config = ServerConfig(security="tls", ssl_context=cert.server_context(), ca_file=pki.ca_file)
    async with serve(config) as server:

        def handshake() -> str | None:
            try:
                with smtplib.SMTP_SSL(
                    server.host,
                    server.port,
                    local_hostname="client.test",
                    timeout=CLIENT_TIMEOUT,
                    context=trusting(server.ca_file),
                ) as smtp:
                    smtp.noop()
            except ssl.SSLCertVerificationError as error:
                return error.verify_message
            return None

        result = await asyncio.to_thread(handshake)

    if verify_error is None:
        assert result is None
    else:
        assert result is not None
        assert verify_error in result


def test_cert_files_are_written(tmp_path: Path, pki: certs.PKI) -> None:
    ca_file = pki.ca.write(tmp_path)
    cert_file, key_file = pki.server.write(tmp_path)
    assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    context = certs.server_context(cert_file, key_file)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


# --- AUTH ---------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_password_mechanisms(mechanism: str) -> None:
    config = ServerConfig(auth={mechanism}, auth_require_tls=False)
    async with serve(config) as server:

        def login(password: str) -> int:
            with connect(server) as smtp:
                try:
                    return smtp.login(USER, password)[0]
                except smtplib.SMTPAuthenticationError as error:
                    return error.smtp_code

        assert await asyncio.to_thread(login, PASSWORD) == 235
        assert await asyncio.to_thread(login, "wrong password") == 535

    assert [(a.mechanism, a.login, a.success) for a in server.auth_attempts] == [
        (mechanism, USER, True),
        (mechanism, USER, False),
    ]
    assert all(c.startswith(f"AUTH {mechanism}") for c in server.commands if c.startswith("AUTH"))


async def test_auth_not_offered_without_tls_by_default() -> None:
    async with serve(ServerConfig(auth={"PLAIN"})) as server:

        def ehlo() -> bool:
            with connect(server) as smtp:
                smtp.ehlo()
                return smtp.has_extn("auth")

        assert await asyncio.to_thread(ehlo) is False


async def test_auth_required_refuses_mail_until_authenticated() -> None:
    config = ServerConfig(security="starttls", auth={"PLAIN"}, auth_required=True)
    async with serve(config) as server:

        def talk() -> tuple[int, int]:
            with connect(server) as smtp:
                smtp.starttls(context=trusting(server.ca_file))
                smtp.ehlo()
                before = smtp.mail(SENDER)[0]
                smtp.login(USER, PASSWORD)
                return before, smtp.mail(SENDER)[0]

        assert await asyncio.to_thread(talk) == (530, 250)


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial-response", "two-step"])
async def test_xoauth2_good_token(initial_response: bool) -> None:
    config = ServerConfig(auth={"XOAUTH2"}, tokens={TOKEN}, auth_require_tls=False)
    async with serve(config) as server:

        def authenticate() -> tuple[int, bytes]:
            with connect(server) as smtp:
                smtp.ehlo()
                reply = smtp.auth("XOAUTH2", xoauth2(TOKEN), initial_response_ok=initial_response)
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                return reply

        assert await asyncio.to_thread(authenticate) == (235, b"2.7.0 Authentication successful")
        [message] = await server.wait_for_messages(1)

    assert (message.auth_mechanism, message.auth_login) == ("XOAUTH2", USER)
    [attempt] = server.auth_attempts
    assert (attempt.success, attempt.challenge_answer) == (True, None)
    assert max(len(command) for command in server.commands) > 4000  # the token went through


async def test_xoauth2_bad_token_gmail_style() -> None:
    config = ServerConfig(auth={"XOAUTH2"}, tokens={TOKEN}, auth_require_tls=False)
    async with serve(config) as server:

        def authenticate() -> smtplib.SMTPAuthenticationError:
            with connect(server) as smtp:
                smtp.ehlo()
                with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                    smtp.auth("XOAUTH2", xoauth2("expired-token"))
                return failure.value

        error = await asyncio.to_thread(authenticate)

    assert error.smtp_code == 535
    assert error.smtp_error == (
        b"5.7.8 Username and Password not accepted. For more information, go to\n"
        b"5.7.8  https://support.google.com/mail/?p=BadCredentials"
    )
    [attempt] = server.auth_attempts
    assert (attempt.success, attempt.login) == (False, USER)
    assert attempt.answered_challenge_with_empty_line
    replies = server.connections[0].replies
    challenge = next(reply for reply in replies if reply.startswith("334 "))
    assert json.loads(base64.b64decode(challenge[4:])) == {
        "status": "401",
        "schemes": "bearer",
        "scope": "https://mail.google.com/",
    }
    assert GMAIL_BAD_CREDENTIALS in replies
    assert "" in server.commands  # the client's empty acknowledgement line


async def test_xoauth2_bad_token_exchange_style() -> None:
    config = ServerConfig(auth={"XOAUTH2"}, tokens={TOKEN}, xoauth2_style="exchange", auth_require_tls=False)
    async with serve(config) as server:

        def authenticate() -> smtplib.SMTPAuthenticationError:
            with connect(server) as smtp:
                smtp.ehlo()
                with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                    smtp.auth("XOAUTH2", xoauth2("expired-token"))
                return failure.value

        error = await asyncio.to_thread(authenticate)

    assert (error.smtp_code, error.smtp_error) == (535, EXCHANGE_BAD_CREDENTIALS[4:].encode())
    assert not any(reply.startswith("334") for reply in server.connections[0].replies)
    assert server.auth_attempts[0].challenge_answer is None


# --- EHLO extensions and pipelining -----------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True])
async def test_ehlo_extensions(pipelining: bool) -> None:
    config = ServerConfig(pipelining=pipelining, size=1000, smtputf8=True)
    async with serve(config) as server:

        def ehlo() -> dict[str, str]:
            with connect(server) as smtp:
                smtp.ehlo()
                return smtp.esmtp_features

        features = await asyncio.to_thread(ehlo)

    assert ("pipelining" in features) is pipelining
    assert features["size"] == "1000"
    assert {"8bitmime", "smtputf8", "enhancedstatuscodes"} <= features.keys()
    assert not {"auth", "starttls"} & features.keys()


async def test_default_ehlo_extensions() -> None:
    async with serve() as server:

        def ehlo() -> dict[str, str]:
            with connect(server) as smtp:
                smtp.ehlo()
                return smtp.esmtp_features

        features = await asyncio.to_thread(ehlo)

    assert set(features) == {"8bitmime", "enhancedstatuscodes", "help"}


async def test_without_pipelining_each_command_is_its_own_chunk() -> None:
    async with serve() as server:

        def send() -> None:
            with connect(server) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT, "other@example.com"], MESSAGE)

        await asyncio.to_thread(send)
        await server.wait_for_messages(1)

    chunks = server.chunks[0]
    assert f"mail FROM:<{SENDER}>\r\n".encode() in chunks
    assert f"rcpt TO:<{RECIPIENT}>\r\n".encode() in chunks
    assert b"data\r\n" in chunks


async def test_pipelined_commands_arrive_in_one_chunk() -> None:
    async with serve(ServerConfig(pipelining=True)) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            assert (await read_reply(reader))[0] == 220
            writer.write(b"EHLO client.test\r\n")
            assert b"250-PIPELINING\r\n" in (await read_reply(reader))[1]
            batch = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            writer.write(batch)
            assert [(await read_reply(reader))[0] for _ in range(4)] == [250, 250, 250, 354]
            writer.write(b"Subject: pipelined\r\n\r\nHi.\r\n.\r\nQUIT\r\n")
            assert [(await read_reply(reader))[0] for _ in range(2)] == [250, 221]
        finally:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLIENT_TIMEOUT)

    assert batch in server.chunks[0]
    [message] = server.messages
    assert message.rcpt_tos == ["b@example.com", "c@example.com"]
    assert message.content == b"Subject: pipelined\r\n\r\nHi.\r\n"
    assert server.commands[-1] == "QUIT"


# --- SIZE, SMTPUTF8, 8BITMIME, long lines --------------------------------------


async def test_size_is_enforced() -> None:
    async with serve(ServerConfig(size=1000)) as server:

        def send() -> int:
            with connect(server) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    smtp.sendmail(SENDER, [RECIPIENT], MESSAGE + b"x" * 2000 + b"\r\n")
                return refused.value.smtp_code

        assert await asyncio.to_thread(send) == 552
        [message] = await server.wait_for_messages(1)

    assert message.mail_options == [f"SIZE={len(MESSAGE)}"]


async def test_smtputf8_addresses_and_options_are_recorded() -> None:
    async with serve(ServerConfig(smtputf8=True)) as server:

        def send() -> None:
            with connect(server) as smtp:
                options = ["SMTPUTF8", "BODY=8BITMIME"]
                smtp.sendmail("jörg@example.com", ["zoë@example.com"], MESSAGE, mail_options=options)

        await asyncio.to_thread(send)
        [message] = await server.wait_for_messages(1)

    assert (message.mail_from, message.rcpt_tos) == ("jörg@example.com", ["zoë@example.com"])
    assert message.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]


async def test_8bitmime_can_be_withdrawn() -> None:
    async with serve(ServerConfig(eightbitmime=False)) as server:

        def talk() -> tuple[bool, int]:
            with connect(server) as smtp:
                smtp.ehlo()
                return smtp.has_extn("8bitmime"), smtp.mail(SENDER, ["BODY=8BITMIME"])[0]

        assert await asyncio.to_thread(talk) == (False, 555)


async def test_overlong_data_line_is_still_refused() -> None:
    # The raised AUTH line limit must not let over-long message lines through.
    async with serve() as server:

        def send() -> int:
            with connect(server) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail(SENDER, [RECIPIENT], b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n")
            return refused.value.smtp_code

        assert await asyncio.to_thread(send) == 500
    assert server.messages == []


# --- reply hooks ----------------------------------------------------------------


async def test_mail_reply_refuses_sender() -> None:
    rejected = "550 5.7.1 Sender rejected"
    config = ServerConfig(mail_reply=lambda address, options: rejected if address == SENDER else None)
    async with serve(config) as server:

        def send() -> int:
            with connect(server) as smtp, pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
            return refused.value.smtp_code

        assert await asyncio.to_thread(send) == 550
    assert server.messages == []


async def test_rcpt_reply_refuses_unknown_user() -> None:
    unknown = "550 5.1.1 <bad@example.com>: Recipient address rejected: User unknown"
    config = ServerConfig(rcpt_reply=lambda address, index: unknown if address == "bad@example.com" else None)
    async with serve(config) as server:

        def send() -> dict[str, tuple[int, bytes]]:
            with connect(server) as smtp:
                return smtp.sendmail(SENDER, ["good@example.com", "bad@example.com"], MESSAGE)

        refused = await asyncio.to_thread(send)
        [message] = await server.wait_for_messages(1)

    assert refused == {"bad@example.com": (550, unknown[4:].encode())}
    assert message.rcpt_tos == ["good@example.com"]


async def test_rcpt_reply_index_counts_per_transaction() -> None:
    too_many = "452 4.5.3 Too many recipients"
    config = ServerConfig(rcpt_reply=lambda address, index: too_many if index >= 2 else None)
    recipients = ["a@example.com", "b@example.com", "c@example.com"]
    async with serve(config) as server:

        def send_twice() -> list[dict[str, tuple[int, bytes]]]:
            with connect(server) as smtp:
                return [smtp.sendmail(SENDER, recipients, MESSAGE) for _ in range(2)]

        refusals = await asyncio.to_thread(send_twice)
        messages = await server.wait_for_messages(2)

    assert refusals == [{"c@example.com": (452, b"4.5.3 Too many recipients")}] * 2
    assert [m.rcpt_tos for m in messages] == [recipients[:2]] * 2


@pytest.mark.parametrize("reply", ["451 4.3.0 Try again later", "554 5.6.0 Message rejected"])
async def test_data_reply(reply: str) -> None:
    async with serve(ServerConfig(data_reply=lambda message: reply)) as server:

        def send() -> int:
            with connect(server) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
            return refused.value.smtp_code

        assert await asyncio.to_thread(send) == int(reply[:3])
        [message] = await server.wait_for_messages(1)

    assert (message.reply, message.accepted, message.content) == (reply, False, MESSAGE)


async def test_ehlo_not_supported_falls_back_to_helo() -> None:
    async with serve(ServerConfig(ehlo_supported=False)) as server:

        def send() -> bool:
            with connect(server) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                return smtp.does_esmtp

        assert await asyncio.to_thread(send) is False
        await server.wait_for_messages(1)

    assert server.commands[:2] == ["ehlo client.test", "helo client.test"]
    assert server.connections[0].replies[1] == "502 5.5.1 Command not implemented"


async def test_drop_after_data() -> None:
    async with serve(ServerConfig(drop_after_data=True)) as server:

        def send() -> None:
            with connect(server) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)

        await asyncio.to_thread(send)
        [message] = await server.wait_for_messages(1)
        await server.wait_until(lambda: server.connections[0].closed)

    assert (message.reply, message.content) == (None, MESSAGE)
    assert server.connections[0].replies[-1].startswith("354")


# --- scripted misbehaviour ------------------------------------------------------


async def test_scripted_greeting_421() -> None:
    async with scripted("greeting-421") as server:

        def connect_refused() -> smtplib.SMTPConnectError:
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                connect(server)
            return refused.value

        error = await asyncio.to_thread(connect_refused)

    assert (error.smtp_code, error.smtp_error) == (421, b"4.3.2 Service not available, closing transmission channel")


async def test_scripted_silent_server_times_out() -> None:
    async with scripted("silent") as server:

        def connect_times_out() -> None:
            with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
                connect(server, timeout=0.3)

        await asyncio.to_thread(connect_times_out)
        assert server.connection_count == 1


async def test_scripted_silent_after_ehlo() -> None:
    async with scripted("silent-after-ehlo") as server:

        def talk() -> int:
            with connect(server, timeout=0.3) as smtp:
                code = smtp.ehlo()[0]
                with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
                    smtp.mail(SENDER)
                return code

        assert await asyncio.to_thread(talk) == 250
        await server.wait_until(lambda: f"mail FROM:<{SENDER}>".encode() in server.received)


async def test_scripted_drop_after_data() -> None:
    async with scripted("drop-after-data") as server:

        def send() -> None:
            with connect(server) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)

        await asyncio.to_thread(send)
        await server.wait_until(lambda: server.connections[0].closed)

    assert b"Subject: test\r\n" in server.received
    assert server.received.endswith(b"\r\n.\r\n")


# --- thread variants --------------------------------------------------------------


def test_serve_in_thread() -> None:
    with serve_in_thread(ServerConfig(security="starttls", auth={"PLAIN"})) as server:
        with connect(server) as smtp:
            smtp.starttls(context=trusting(server.ca_file))
            smtp.login(USER, PASSWORD)
            smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
        [message] = server.wait_for_messages_sync(1)
        address = server.address

    assert (message.tls, message.auth_login) == (True, USER)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=1).close()


def test_scripted_in_thread() -> None:
    with scripted_in_thread("greeting-421") as server, pytest.raises(smtplib.SMTPConnectError):
        connect(server)
    assert server.connection_count == 1
