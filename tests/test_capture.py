"""The capture SMTP server of `serve --demo`: what it keeps of each message, how many it keeps, and
that it listens on loopback only and really stops."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from mailgate import Attachment, Message
from mailgate.capture import MAX_MESSAGE_SIZE, CaptureServer
from mailgate.smtp import SMTPClient, SMTPConfig

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def send_raw(capture: CaptureServer, raw: bytes, *, sender: str = "app@example.com", to: str = "a@example.com") -> None:
    """One message over smtplib: blocking, so tests call it via asyncio.to_thread."""
    with smtplib.SMTP(capture.host, capture.port, local_hostname="client.example", timeout=5) as smtp:
        smtp.sendmail(sender, [to], raw)


def send_email(capture: CaptureServer, msg: EmailMessage, mail_options: list[str]) -> None:
    with smtplib.SMTP(capture.host, capture.port, local_hostname="client.example", timeout=5) as smtp:
        smtp.send_message(msg, mail_options=mail_options)


def numbered(n: int) -> bytes:
    return f"From: app@example.com\r\nTo: a@example.com\r\nSubject: number {n}\r\n\r\nbody {n}\r\n".encode()


async def test_mailgate_message_is_kept_with_its_parts_decoded() -> None:
    message = Message(
        from_="App <app@example.com>",
        to=["Zoë <zoe@example.com>", "bob@example.com"],
        subject="Ihr Passwort: Grüße 🔑",
        text="Hallo Zoë,\nhier ist der Link.",
        html="<p>Hallo <b>Zoë</b></p>",
        attachments=[Attachment("Bericht März.png", "image/png", PNG)],
    )
    raw = message.compose()
    async with CaptureServer() as capture:
        config = SMTPConfig(capture.host, capture.port, security="none", connect_timeout=5, protocol_timeout=5)
        async with SMTPClient(config) as smtp:
            delivery = await smtp.send(message.envelope(), raw)
        [captured] = capture.messages()
    assert delivery.all_accepted
    assert captured.id == 1
    assert captured.mail_from == "app@example.com"
    assert captured.rcpt_tos == ("zoe@example.com", "bob@example.com")
    assert captured.subject == "Ihr Passwort: Grüße 🔑"
    assert captured.from_header == "App <app@example.com>"
    assert captured.to_header == "Zoë <zoe@example.com>, bob@example.com"
    assert captured.text == "Hallo Zoë,\nhier ist der Link."
    assert captured.html is not None and "<p>Hallo <b>Zoë</b></p>" in captured.html
    assert captured.attachments == (("Bericht März.png", "image/png", len(PNG)),)
    assert captured.raw == raw and captured.size == len(raw)
    assert captured.received_at.tzinfo is UTC
    assert abs((datetime.now(UTC) - captured.received_at).total_seconds()) < 5


async def test_smtputf8_message_with_raw_utf8_headers_is_kept() -> None:
    msg = EmailMessage(policy=email.policy.SMTPUTF8)
    msg["From"] = "Jürgen <jürgen@exämple.de>"
    msg["To"] = "zoë@exämple.de"
    msg["Subject"] = "Grüße aus Köln"
    msg.set_content("Schöne Grüße", cte="8bit")
    async with CaptureServer() as capture:
        await asyncio.to_thread(send_email, capture, msg, ["SMTPUTF8"])
        [captured] = capture.messages()
    assert "Subject: Grüße aus Köln".encode() in captured.raw  # raw UTF-8, not an encoded word
    assert captured.mail_from == "jürgen@exämple.de"
    assert captured.rcpt_tos == ("zoë@exämple.de",)
    assert captured.subject == "Grüße aus Köln"
    assert captured.from_header == "Jürgen <jürgen@exämple.de>"
    assert captured.text == "Schöne Grüße\n"
    assert captured.html is None
    assert captured.attachments == ()


async def test_ids_follow_arrival_and_the_newest_comes_first() -> None:
    async with CaptureServer() as capture:
        for n in (1, 2, 3):
            await asyncio.to_thread(send_raw, capture, numbered(n))
        newest_first = capture.messages()
    assert [m.id for m in newest_first] == [3, 2, 1]
    assert [m.subject for m in newest_first] == ["number 3", "number 2", "number 1"]
    assert capture.get(2) is newest_first[1]
    assert capture.get(4) is None


async def test_only_the_newest_keep_messages_are_kept() -> None:
    async with CaptureServer(keep=2) as capture:
        for n in (1, 2, 3):
            await asyncio.to_thread(send_raw, capture, numbered(n))
        kept = capture.messages()
    assert [m.subject for m in kept] == ["number 3", "number 2"]
    assert capture.get(1) is None
    assert capture.get(3) is kept[0]


async def test_clear_empties_the_list_but_ids_go_on() -> None:
    async with CaptureServer() as capture:
        await asyncio.to_thread(send_raw, capture, numbered(1))
        capture.clear()
        assert capture.messages() == [] and capture.get(1) is None
        await asyncio.to_thread(send_raw, capture, numbered(2))
        [after] = capture.messages()
    assert after.id == 2  # a link to message 1 must not show another message


async def test_message_the_email_parser_chokes_on_is_kept_unparsed() -> None:
    raw = b"From: app@example.com\r\nTo: <\r\nSubject: broken\r\n\r\nbody\r\n"
    try:
        str(email.message_from_bytes(raw, policy=email.policy.default)["to"])
    except Exception:
        pass
    else:
        pytest.skip("this Python's email parser reads the header that older ones choke on")
    async with CaptureServer() as capture:
        await asyncio.to_thread(send_raw, capture, raw)
        await asyncio.to_thread(send_raw, capture, numbered(2))  # the server is still fine
        after, unparsed = capture.messages()
    assert unparsed.subject == "(could not parse)"
    assert unparsed.text is None and unparsed.html is None
    assert unparsed.raw == raw and unparsed.mail_from == "app@example.com"
    assert after.subject == "number 2"


async def test_message_without_headers_is_kept_with_empty_subject() -> None:
    raw = b"\xff\xfe not a mail at all\r\n"
    async with CaptureServer() as capture:
        await asyncio.to_thread(send_raw, capture, raw)
        [captured] = capture.messages()
    assert captured.subject == "" and captured.from_header == "" and captured.to_header == ""
    assert captured.raw == raw


def ehlo_and_mail(capture: CaptureServer, *mail_options: str) -> tuple[dict[str, str], int]:
    """EHLO, then MAIL FROM with `mail_options`: (the extensions offered, MAIL's reply code)."""
    with smtplib.SMTP(capture.host, capture.port, local_hostname="client.example", timeout=5) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("app@example.com", list(mail_options))
        return dict(smtp.esmtp_features), code


async def test_message_over_the_size_limit_is_refused() -> None:
    async with CaptureServer() as capture:
        extensions, code = await asyncio.to_thread(ehlo_and_mail, capture, f"SIZE={MAX_MESSAGE_SIZE + 1}")
        assert capture.messages() == []
    assert MAX_MESSAGE_SIZE == 10 * 1024 * 1024
    assert extensions["size"] == str(MAX_MESSAGE_SIZE)
    assert code == 552


def send_without_size(capture: CaptureServer, raw: bytes) -> int:
    """MAIL FROM without SIZE, then the data: DATA's reply code."""
    with smtplib.SMTP(capture.host, capture.port, local_hostname="client.example", timeout=5) as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        smtp.rcpt("a@example.com")
        code, _ = smtp.data(raw)
        return code


async def test_message_data_over_the_size_limit_is_refused() -> None:
    line = b"x" * 998 + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + line * (MAX_MESSAGE_SIZE // len(line) + 1)
    async with CaptureServer() as capture:
        code = await asyncio.to_thread(send_without_size, capture, raw)
        assert capture.messages() == []
    assert code == 552


async def test_no_auth_and_no_starttls_are_offered() -> None:
    async with CaptureServer() as capture:
        extensions, code = await asyncio.to_thread(ehlo_and_mail, capture)
    assert code == 250
    assert "auth" not in extensions and "starttls" not in extensions
    assert "smtputf8" in extensions and "8bitmime" in extensions


async def test_message_bodies_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with CaptureServer() as capture:
        await asyncio.to_thread(send_raw, capture, b"Subject: reset\r\n\r\nhttps://app.example/reset?token=s3cr3t\r\n")
        assert len(capture.messages()) == 1
    assert "mail.log" in {r.name for r in caplog.records}  # aiosmtpd did log the session
    assert "s3cr3t" not in caplog.text


async def test_port_zero_binds_a_free_port() -> None:
    async with CaptureServer(port=0) as first, CaptureServer("localhost") as second:
        assert first.port != 0 and second.port not in (0, first.port)
        assert second.host == "127.0.0.1"
        await asyncio.to_thread(send_raw, second, numbered(1))
        assert first.messages() == [] and len(second.messages()) == 1


async def test_a_port_in_use_raises_oserror() -> None:
    async with CaptureServer() as first:
        with pytest.raises(OSError):
            await CaptureServer(port=first.port).start()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "mail.example.com", ""])
def test_a_host_that_is_not_loopback_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        CaptureServer(host)


async def test_after_aclose_connections_are_refused_and_aclose_again_is_fine() -> None:
    capture = CaptureServer()
    await capture.start()
    await capture.aclose()
    await capture.aclose()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(capture.host, capture.port)


async def test_aclose_ends_an_open_session() -> None:
    capture = CaptureServer()
    await capture.start()
    reader, writer = await asyncio.open_connection(capture.host, capture.port)
    try:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
        await asyncio.wait_for(capture.aclose(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hung up
    finally:
        writer.close()
