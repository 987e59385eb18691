"""Several messages pipelined on one connection (SMTPClient.send_many): each message's body goes
in the same write as the next one's MAIL/RCPT/DATA, and every message still gets its own
outcome — refusals, RSETs, "too many recipients", a message the server can't take, a connection
that drops, and the transport's limit of messages per connection. Real aiosmtpd servers."""

from __future__ import annotations

from typing import Any

from mailgate import Envelope, Message, Outcome
from mailgate.delivery import Delivery
from mailgate.settings.document import MailServer
from mailgate.smtp import SMTPClient, SMTPConfig, SMTPNotSupportedError
from mailgate.transports.smtp import SMTPTransport
from smtp_servers import RecordingServer, ServerConfig, serve

USER = "user@example.com"


def config(server: RecordingServer) -> SMTPConfig:
    return SMTPConfig(server.host, server.port, security="none", helo_name="client.example", protocol_timeout=5)


def item(i: int, to: Any = None, **kw: Any) -> tuple[Envelope, bytes]:
    m = Message(from_=USER, to=to or f"r{i}@example.com", subject=f"note {i}", text="hello", **kw)
    return m.envelope(), m.compose(utf8=m.requires_smtputf8)


def delivery(result: object) -> Delivery:
    assert isinstance(result, Delivery), result
    return result


async def test_each_body_goes_with_the_next_messages_commands() -> None:
    async with serve(ServerConfig(pipelining=True)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many([item(i) for i in range(5)])
        chunks = server.connections[0].chunks
    assert [delivery(r).all_accepted for r in results] == [True] * 5
    assert [m.parsed()["Subject"] for m in server.messages] == [f"note {i}" for i in range(5)]
    # One write per message after the first: "<body>.\r\nMAIL FROM:…RCPT TO:…DATA\r\n".
    joined = [c for c in chunks if b".\r\nMAIL FROM:<user@example.com>" in c and c.endswith(b"DATA\r\n")]
    assert len(joined) == 4


async def test_every_message_gets_its_own_outcome() -> None:
    def rcpt(address: str, index: int) -> str | None:
        return "550 5.1.1 No such user" if address.startswith("gone") else None

    batch = [
        item(0),
        item(1, to=["r1@example.com", "gone1@example.com"]),
        item(2, to="gone2@example.com"),  # no recipient left: RSET, pipelined with the next
        item(3),
    ]
    async with serve(ServerConfig(pipelining=True, rcpt_reply=rcpt)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = [delivery(r) for r in await smtp.send_many(batch)]
            assert smtp.is_connected
        verbs = [c.split()[0].upper() for c in server.commands]
    assert [[r.outcome for r in d.results] for d in results] == [
        [Outcome.ACCEPTED],
        [Outcome.ACCEPTED, Outcome.PERMANENT],
        [Outcome.PERMANENT],
        [Outcome.ACCEPTED],
    ]
    assert results[2].results[0].code == 550
    assert [m.parsed()["Subject"] for m in server.messages] == ["note 0", "note 1", "note 3"]
    assert verbs.count("RSET") == 1


async def test_too_many_recipients_still_reach_everyone() -> None:
    def rcpt(address: str, index: int) -> str | None:
        return "452 4.5.3 Too many recipients" if index >= 2 else None

    to = [f"m{i}@example.com" for i in range(5)]
    async with serve(ServerConfig(pipelining=True, rcpt_reply=rcpt)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = [delivery(r) for r in await smtp.send_many([item(0), item(1, to=to), item(2)])]
    assert [d.all_accepted for d in results] == [True, True, True]
    got = sorted(r for m in server.messages for r in m.rcpt_tos)
    assert got == sorted(["r0@example.com", "r2@example.com", *to])


async def test_a_message_the_server_cant_take_is_refused_alone() -> None:
    async with serve(ServerConfig(pipelining=True, smtputf8=False)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many([item(0), item(1, to="jörg@exämple.de"), item(2)])
    assert isinstance(results[1], SMTPNotSupportedError) and "SMTPUTF8" in str(results[1])
    assert delivery(results[0]).all_accepted and delivery(results[2]).all_accepted
    assert len(server.messages) == 2


async def test_a_dropped_connection_leaves_the_sent_message_uncertain_and_the_rest_transient() -> None:
    async with serve(ServerConfig(pipelining=True, drop_after_data=True)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = [delivery(r) for r in await smtp.send_many([item(0), item(1), item(2)])]
            assert not smtp.is_connected
    first, second, third = (d.results[0] for d in results)
    assert first.outcome is Outcome.TRANSIENT and first.uncertain and "may have been accepted" in first.text
    assert second.outcome is Outcome.TRANSIENT and not second.uncertain
    assert third.outcome is Outcome.TRANSIENT and not third.uncertain


async def test_without_pipelining_it_sends_one_by_one() -> None:
    async with serve(ServerConfig(pipelining=False)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many([item(i) for i in range(3)])
    assert [delivery(r).all_accepted for r in results] == [True] * 3
    assert not any(b".\r\nMAIL" in c for c in server.connections[0].chunks)


async def test_the_transport_keeps_to_max_messages_per_connection() -> None:
    async with serve(ServerConfig(pipelining=True)) as server:
        doc = MailServer.model_validate({
            "from_address": USER,
            "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "connection": {"max_messages_per_connection": 2, "protocol_timeout": 5},
        })  # fmt: skip
        transport = SMTPTransport.from_server(doc)
        results = await transport.send_many([item(i) for i in range(5)])
        await transport.aclose()
    assert [delivery(r).all_accepted for r in results] == [True] * 5
    assert server.connection_count == 3
    assert [sum(c.upper().startswith("MAIL") for c in conn.commands) for conn in server.connections] == [2, 2, 1]
