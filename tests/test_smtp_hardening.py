"""The SMTP client and transport against servers that behave as Postfix 3.7, Exim 4.96 and
OpenSMTPD 6.8 do (issue 18): recipient limits, dropped batches, setup failures, the HELO name,
SIZE, implicit TLS ports, destination policy, CA certificates, echoed secrets, non-SMTP peers.

The servers are tests/smtp_servers.py's scripted MTA (their documented replies) and aiosmtpd."""

from __future__ import annotations

from typing import Any

import pytest

from mailgate import Envelope
from mailgate.smtp import SMTPClient, SMTPConfig, SMTPNotSupportedError
from smtp_servers import MTA, ScriptedMTA, scripted_mta

FROM = "no-reply@example.com"


def config(server: ScriptedMTA, **kw: Any) -> SMTPConfig:
    kw.setdefault("security", "none")
    kw.setdefault("helo_name", "client.example.com")
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("protocol_timeout", 5)
    return SMTPConfig(server.host, server.port, **kw)


def envelope(*rcpts: str) -> Envelope:
    return Envelope(FROM, rcpts or ("alice@example.org",))


# ---- item 13: SIZE= is the octets that go out ----------------------------------------------------

# Bare LFs, a line that starts with a dot, no final line end: what normalization changes.
RAGGED = b"Subject: size\nFrom: no-reply@example.com\n\n.a dot\nthe end"


async def test_size_declares_exactly_the_octets_the_server_receives() -> None:
    async with scripted_mta(MTA(size=10_000)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(envelope(), RAGGED)
    assert delivery.all_accepted
    [received] = server.delivered
    [size] = [p for p in received.mail_params if p.startswith("SIZE=")]
    assert int(size[5:]) == len(received.content)
    assert received.content.endswith(b"the end\r\n") and b"\n.a dot" in received.content


async def test_the_size_limit_is_checked_with_the_same_number() -> None:
    sent = len(RAGGED.replace(b"\n", b"\r\n") + b"\r\n")
    async with scripted_mta(MTA(size=sent)) as server:
        async with SMTPClient(config(server)) as smtp:
            assert (await smtp.send(envelope(), RAGGED)).all_accepted
    async with scripted_mta(MTA(size=sent - 1)) as server:
        async with SMTPClient(config(server)) as smtp:
            with pytest.raises(SMTPNotSupportedError, match=f"{sent:,} bytes"):
                await smtp.send(envelope(), RAGGED)
    assert "MAIL" not in server.sessions[0].verbs
