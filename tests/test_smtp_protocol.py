"""Replies and their meaning (RFC 5321 4.2.1, RFC 3463), and the wire protocol against peers that
misbehave in ways the fixtures don't: small raw servers on 127.0.0.1, written here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from mailgate import Envelope, Outcome
from mailgate.smtp import (
    Reply,
    SMTPClient,
    SMTPConfig,
    SMTPDisconnectedError,
    SMTPProtocolError,
    classify,
)


@pytest.mark.parametrize(
    ("code", "enhanced", "outcome"),
    [
        (250, "2.0.0", Outcome.ACCEPTED),
        (251, None, Outcome.ACCEPTED),
        (421, "4.7.0", Outcome.TRANSIENT),
        (451, None, Outcome.TRANSIENT),
        (432, "4.3.2", Outcome.TRANSIENT),  # Exchange: too many concurrent connections
        (550, "5.1.1", Outcome.PERMANENT),
        (535, "5.7.139", Outcome.PERMANENT),
        (554, None, Outcome.PERMANENT),
        (452, "4.5.3", Outcome.TRANSIENT),  # too many recipients
        (552, "5.5.3", Outcome.TRANSIENT),  # ... which RFC 5321 says to treat as temporary
        (552, "5.3.4", Outcome.PERMANENT),  # message too big for the system: permanent
        (550, "4.7.1", Outcome.TRANSIENT),  # the enhanced code wins when both are present
        (451, "5.7.1", Outcome.PERMANENT),
    ],
)
def test_classification(code: int, enhanced: str | None, outcome: Outcome) -> None:
    assert classify(code, enhanced) is outcome


def test_enhanced_code_is_parsed_only_when_it_agrees_with_the_reply_class() -> None:
    assert Reply(550, ["5.7.60 SMTP; Client does not have permissions"]).enhanced == "5.7.60"
    assert Reply(550, ["5.7.60 SMTP; Client does not have permissions"]).message.startswith("SMTP;")
    assert Reply(535, ["5.7.139 Authentication unsuccessful"]).enhanced == "5.7.139"
    assert Reply(250, ["mx.example.com Hello"]).enhanced is None
    assert Reply(550, ["2.0.0 nonsense"]).enhanced is None
    assert Reply(250, ["2.6.0.1 not a code"]).enhanced is None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[int]:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(handler(reader, writer), 5)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: bytes = b"250 mx\r\n") -> None:
    """The start every raw server here shares: a greeting, then the answer to EHLO."""
    writer.write(b"220 mx ESMTP\r\n")
    await reader.readline()
    writer.write(ehlo)
    await writer.drain()


async def test_an_http_server_is_not_mistaken_for_smtp() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read(100)

    async with raw_server(http) as port:
        with pytest.raises(SMTPProtocolError, match="not an SMTP reply"):
            await SMTPClient(SMTPConfig("127.0.0.1", port, security="none", protocol_timeout=2)).connect()


async def test_data_injected_before_the_tls_handshake_is_refused() -> None:
    async def injecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-mx\r\n250 STARTTLS\r\n")
        await reader.readline()
        # A man in the middle appends a reply after "220 ready": it must never be read as if it
        # had come over TLS (CVE-2011-0411).
        writer.write(b"220 Ready to start TLS\r\n250 injected\r\n")
        await writer.drain()
        await reader.read(100)

    async with raw_server(injecting) as port:
        client = SMTPClient(SMTPConfig("127.0.0.1", port, security="starttls-required", protocol_timeout=2))
        with pytest.raises(SMTPProtocolError, match="after its STARTTLS reply"):
            await client.connect()


async def test_multi_line_replies_are_joined_and_ehlo_keywords_parsed() -> None:
    async def esmtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-mx.example.com ESMTP\r\n220 second greeting line\r\n")
        await reader.readline()
        writer.write(b"250-mx.example.com\r\n250-SIZE 35882577\r\n250-AUTH=LOGIN\r\n250-auth plain\r\n250 8BITMIME\r\n")
        await reader.readline()
        writer.write(b"221 2.0.0 Bye\r\n")
        await writer.drain()

    async with raw_server(esmtp) as port:
        async with SMTPClient(SMTPConfig("127.0.0.1", port, security="none", protocol_timeout=2)) as smtp:
            assert smtp.greeting is not None
            assert smtp.greeting.text == "mx.example.com ESMTP\nsecond greeting line"
            assert smtp.max_size == 35882577
            assert smtp.auth_mechanisms == ["LOGIN", "PLAIN"]
            assert "8BITMIME" in smtp.extensions


async def test_a_421_in_the_middle_of_a_session_is_reported_with_its_text() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer)
        await reader.readline()  # MAIL
        writer.write(b"421 4.7.0 Too many errors, closing connection\r\n")
        await writer.drain()

    async with raw_server(closing) as port:
        async with SMTPClient(SMTPConfig("127.0.0.1", port, security="none", protocol_timeout=2)) as smtp:
            delivery = await smtp.send(Envelope("a@example.com", ("b@example.com",)), b"Subject: x\r\n\r\nx\r\n")
    (result,) = delivery.results
    assert (result.outcome, result.code, result.enhanced) == (Outcome.TRANSIENT, 421, "4.7.0")


async def test_a_closed_client_refuses_to_send() -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer)
        await reader.read(100)

    async with raw_server(idle) as port:
        smtp = SMTPClient(SMTPConfig("127.0.0.1", port, security="none", protocol_timeout=2))
        await smtp.connect()
        smtp.close()
        with pytest.raises(SMTPDisconnectedError):
            await smtp.send(Envelope("a@example.com", ("b@example.com",)), b"x\r\n")


async def test_a_cancelled_send_drops_the_connection_instead_of_reusing_it() -> None:
    reached_data = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer)
        await reader.readline()  # MAIL: never answered
        reached_data.set()
        await reader.read(100)

    async with raw_server(slow) as port:
        smtp = SMTPClient(SMTPConfig("127.0.0.1", port, security="none", protocol_timeout=5))
        await smtp.connect()
        task = asyncio.create_task(smtp.send(Envelope("a@example.com", ("b@example.com",)), b"x\r\n"))
        await asyncio.wait_for(reached_data.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not smtp.is_connected
