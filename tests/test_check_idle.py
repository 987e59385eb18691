"""check_idle_after 0 (Genesys' value): a kept connection answers a NOOP before every reuse; with
a longer idle time a connection used again at once is not checked."""

from __future__ import annotations

from mailgate import Message
from mailgate.message import Envelope
from mailgate.settings.document import MailServer, parse_server
from mailgate.transports.pool import Pools
from smtp_servers import RecordingServer, ServerConfig, serve

ENVELOPE = Envelope("no-reply@example.com", ("alice@example.org",))


def server_doc(server: RecordingServer, check_idle_after: float) -> MailServer:
    return parse_server({"from_address": "no-reply@example.com",
                         "smtp": {"host": server.host, "port": server.port, "security": "none"},
                         "connection": {"check_idle_after": check_idle_after, "pool_size": 1,
                                        "protocol_timeout": 2}})  # fmt: skip


async def verbs_of_two_messages(check_idle_after: float) -> list[str]:
    """The commands of one connection that carried two messages, one right after the other."""
    async with serve(ServerConfig()) as server:
        pools = Pools()
        pool = pools.get(1, 1, server_doc(server, check_idle_after))
        try:
            for i in range(2):
                async with pool.transport() as transport:
                    message = Message(from_="no-reply@example.com", to="alice@example.org", subject=f"note {i}")
                    assert (await transport.send(ENVELOPE, message)).all_accepted
        finally:
            await pools.aclose()
    assert server.connection_count == 1 and len(server.messages) == 2
    return [c.split()[0].upper() for c in server.connections[0].commands]


async def test_check_idle_after_0_sends_a_noop_before_every_reuse() -> None:
    verbs = await verbs_of_two_messages(0)
    mails = [i for i, v in enumerate(verbs) if v == "MAIL"]
    assert verbs.count("NOOP") == 1  # before the second message, not before the first (a new connection)
    assert mails[0] < verbs.index("NOOP") < mails[1], verbs


async def test_check_idle_after_30_reuses_a_busy_connection_without_a_noop() -> None:
    verbs = await verbs_of_two_messages(30)
    assert verbs.count("MAIL") == 2 and "NOOP" not in verbs
