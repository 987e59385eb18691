"""The SMTP client and transport against servers that behave as Postfix 3.7, Exim 4.96 and
OpenSMTPD 6.8 do (issue 18): recipient limits, dropped batches, setup failures, the HELO name,
SIZE, implicit TLS ports, destination policy, CA certificates, echoed secrets, non-SMTP peers.

The servers are tests/smtp_servers.py's scripted MTA (their documented replies) and aiosmtpd."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import certs
from mailgate import Envelope, Outcome
from mailgate.delivery import Delivery
from mailgate.destinations import DestinationPolicy, DestinationRefused, Destinations, parse_networks
from mailgate.diagnostics.catalogue import SESSION, explain_smtp_error
from mailgate.settings.document import MailServer
from mailgate.smtp import (
    OAuth2Auth,
    PasswordAuth,
    SMTPAuthError,
    SMTPClient,
    SMTPConfig,
    SMTPConnectError,
    SMTPNotSupportedError,
    SMTPProtocolError,
    SMTPResponseError,
    SMTPSecurityError,
    SMTPTLSError,
)
from mailgate.smtp.client import MAX_CA_FILE
from mailgate.transports.pool import Pools
from mailgate.transports.smtp import Reuse, SMTPTransport
from smtp_servers import (
    EXIM_TOO_MANY_RECIPIENTS,
    MTA,
    OPENSMTPD_TOO_MANY_RECIPIENTS,
    POSTFIX_TOO_MANY_RECIPIENTS,
    ScriptedMTA,
    default_pki,
    raw_peer,
    scripted_mta,
)
from test_outbox import Opener, note, open_mg
from test_outbox import server_doc as server_doc_dict

__all__ = ["open_mg"]  # the fixture

FROM = "no-reply@example.com"


def config(server: ScriptedMTA, **kw: Any) -> SMTPConfig:
    kw.setdefault("host", server.host)
    kw.setdefault("security", "none")
    kw.setdefault("helo_name", "client.example.com")
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("protocol_timeout", 5)
    return SMTPConfig(port=server.port, **kw)


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


# ---- item 9: recipients beyond the server's limit --------------------------------------------------


def server_doc(server: ScriptedMTA, **smtp: Any) -> MailServer:
    return MailServer.model_validate({
        "from_address": FROM,
        "smtp": {"host": server.host, "port": server.port, "security": "none", "helo_name": "client.example.com",
                 **smtp},
        "connection": {"connect_timeout": 5, "protocol_timeout": 5},
    })  # fmt: skip


def many(n: int, start: int = 0) -> tuple[str, ...]:
    return tuple(f"r{i}@example.org" for i in range(start, start + n))


BODY = b"Subject: many\r\nFrom: no-reply@example.com\r\n\r\nhello\r\n"


async def test_postfix_past_its_limit_and_overshoot_gets_every_recipient_and_the_pool_keeps_the_limit() -> None:
    # smtpd_recipient_limit 5; 2 RCPTs past it are free, then each counts as an error; at 5 errors
    # the session ends with "421 4.7.0 … Error: too many errors".
    postfix = MTA(recipient_limit=5, overshoot_limit=2, hard_error_limit=5)
    pools = Pools()
    async with scripted_mta(postfix) as server:
        pool = pools.get(1, 1, server_doc(server))
        async with pool.transport() as first:
            delivery = await first.send(Envelope(FROM, many(35)), BODY)
            async with pool.transport() as other:  # another connection of the same pool
                later = await other.send(Envelope(FROM, many(12, 100)), BODY)
        await pools.aclose()
    assert delivery.all_accepted and later.all_accepted
    dropped, retried, fresh = server.sessions
    # It read 5 good RCPTs, 2 free and 5 counted past the limit, then ended the session.
    assert dropped.rcpt_counts == [12] and dropped.replies[-1].startswith("421 4.7.0")
    assert retried.rcpt_counts == [5] * 7 and fresh.rcpt_counts == [5, 5, 2]
    assert not any("too many" in reply for reply in retried.replies + fresh.replies)
    assert sorted(r for m in server.delivered for r in m.rcpt_tos) == sorted(many(35) + many(12, 100))


@pytest.mark.parametrize("too_many", [POSTFIX_TOO_MANY_RECIPIENTS, EXIM_TOO_MANY_RECIPIENTS,
                                      OPENSMTPD_TOO_MANY_RECIPIENTS])  # fmt: skip
async def test_each_mtas_too_many_recipients_splits_and_teaches_the_limit(too_many: str) -> None:
    async with scripted_mta(MTA(recipient_limit=2, too_many_recipients=too_many)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(Envelope(FROM, many(5)), BODY)
            assert smtp.recipient_limit.learnt == 2
    assert delivery.all_accepted
    assert server.sessions[0].rcpt_counts == [5, 2, 1]


async def test_mailbox_full_452_4_2_2_defers_that_recipient_and_splits_nothing() -> None:
    def full(address: str) -> str | None:
        full = address.startswith("full")
        return f"452 4.2.2 <{address}>: Recipient address rejected: Mailbox full" if full else None

    async with scripted_mta(MTA(rcpt_reply=full)) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(Envelope(FROM, ("a@example.org", "full@example.org", "b@example.org")), BODY)
            assert smtp.recipient_limit.learnt is None
    by = {r.recipient: r for r in delivery.results}
    assert (by["full@example.org"].outcome, by["full@example.org"].enhanced) == (Outcome.TRANSIENT, "4.2.2")
    assert by["a@example.org"].accepted and by["b@example.org"].accepted
    assert server.sessions[0].rcpt_counts == [3]


async def test_never_more_than_100_recipients_in_a_transaction_before_a_limit_is_known() -> None:
    async with scripted_mta(MTA()) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(Envelope(FROM, many(250)), BODY)
    assert delivery.all_accepted
    assert server.sessions[0].rcpt_counts == [100, 100, 50]


async def test_without_pipelining_no_rcpt_goes_past_the_first_too_many() -> None:
    postfix = MTA(pipelining=False, recipient_limit=5, overshoot_limit=0, hard_error_limit=3)
    async with scripted_mta(postfix) as server:
        async with SMTPClient(config(server)) as smtp:
            delivery = await smtp.send(Envelope(FROM, many(12)), BODY)
    assert delivery.all_accepted
    assert server.sessions[0].rcpt_counts == [6, 5, 2]


# ---- item 1: the destination policy, before any connection ---------------------------------------

LOOPBACK_FOR_TENANTS = Destinations(tenant=DestinationPolicy("tenant", parse_networks("loopback")))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "::ffff:127.0.0.1"])
async def test_a_tenant_server_pointing_at_loopback_is_refused_before_any_connection(host: str) -> None:
    pools = Pools(destinations=Destinations())
    async with scripted_mta(MTA()) as server:
        pool = pools.get(7, 1, server_doc(server, host=host), scope="acme")
        with pytest.raises(DestinationRefused, match="loopback") as refused:
            async with pool.transport() as transport:
                await transport.send(envelope(), BODY)
        await pools.aclose()
    assert server.sessions == []  # not even a TCP connection
    assert not refused.value.transient


@pytest.mark.parametrize(("scope", "destinations"), [("acme", LOOPBACK_FOR_TENANTS), ("global", Destinations())])
async def test_loopback_is_reached_where_the_policy_allows_it(scope: str, destinations: Destinations) -> None:
    pools = Pools(destinations=destinations)
    async with scripted_mta(MTA()) as server:
        pool = pools.get(7, 1, server_doc(server, host="localhost"), scope=scope)
        async with pool.transport() as transport:
            delivery = await transport.send(envelope(), BODY)
        await pools.aclose()
    assert delivery.all_accepted and len(server.sessions) == 1


async def test_the_certificate_is_checked_against_the_name_not_the_address_connected_to(tmp_path: Path) -> None:
    ca = certs.make_ca("mailgate name-only CA")
    named = ca.issue(hostnames=["localhost"], ips=[])  # no 127.0.0.1 in it
    policy = LOOPBACK_FOR_TENANTS.tenant
    async with scripted_mta(MTA(tls="implicit", ssl_context=named.server_context())) as server:
        cfg = config(server, host="localhost", security="tls", ca_file=str(ca.write(tmp_path)), resolve=policy.resolve)
        async with SMTPClient(cfg) as smtp:
            assert (await smtp.send(envelope(), BODY)).all_accepted
            assert smtp.tls_active


# ---- item 10: a connection dropped in the middle of a batch ---------------------------------------


def batch(n: int, **rcpts: tuple[str, ...]) -> list[tuple[Envelope, bytes]]:
    """n messages; message i goes to rcpts[f"m{i}"] or to one recipient of its own."""
    return [(Envelope(FROM, rcpts.get(f"m{i}", (f"to{i}@example.org",))), BODY) for i in range(n)]


def outcomes(result: object) -> list[tuple[Outcome, bool]]:
    assert isinstance(result, Delivery), result
    return [(r.outcome, r.uncertain) for r in result.results]


ACCEPTED, IN_DOUBT, LATER = (Outcome.ACCEPTED, False), (Outcome.TRANSIENT, True), (Outcome.TRANSIENT, False)


async def test_messages_answered_before_the_drop_keep_their_250_and_only_the_one_in_flight_is_in_doubt() -> None:
    # max_messages_per_connection 3: messages 1-3 on one connection, which the server drops after
    # reading message 3's body; message 4 needs a new connection, which the server refuses.
    too_many = "421 4.7.0 mx.scripted.test Error: too many connections from 127.0.0.1"
    mta = MTA(drop_after_body=3, greeting=lambda i: None if i == 0 else too_many)
    async with scripted_mta(mta) as server:
        transport = SMTPTransport(config(server), reuse=Reuse(max_messages=3))
        results = await transport.send_many(list(batch(4)))
        await transport.aclose()
    assert [outcomes(r) for r in results[:3]] == [[ACCEPTED], [ACCEPTED], [IN_DOUBT]]
    assert isinstance(results[3], SMTPConnectError) and results[3].transient and results[3].code == 421
    assert [m.rcpt_tos for m in server.delivered] == [["to0@example.org"], ["to1@example.org"]]


async def test_a_message_that_cannot_be_built_fails_alone_and_nothing_goes_twice() -> None:
    # Two messages a connection: the bad third one is in the second chunk, after the first went.
    # (A stored message of an older version can hold a lone surrogate; submit refuses one now.)
    from mailgate import Message

    good = [Message(from_=FROM, to=f"to{i}@example.org", subject=f"m{i}", text="t") for i in range(5)]
    bad = Message.from_dict({**good[2].to_dict(), "subject": "m2 \ud800"})
    async with scripted_mta() as server:
        transport = SMTPTransport(config(server), reuse=Reuse(max_messages=2))
        results = await transport.send_many([(m.envelope(), m) for m in (*good[:2], bad, *good[3:])])
        await transport.aclose()
    assert isinstance(results[2], UnicodeEncodeError)
    assert [outcomes(r) for i, r in enumerate(results) if i != 2] == [[ACCEPTED]] * 4
    assert sorted(rcpt for m in server.delivered for rcpt in m.rcpt_tos) == [
        "to0@example.org", "to1@example.org", "to3@example.org", "to4@example.org"]  # fmt: skip


async def test_a_250_that_arrived_just_before_the_server_hung_up_still_counts() -> None:
    # Exim (and SES) answer the message, then "421 too many messages in this connection" to the
    # next MAIL of the same pipelined group, and close.
    async with scripted_mta(MTA(max_mail_commands=2)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many(batch(4))
    assert [outcomes(r) for r in results] == [[ACCEPTED], [ACCEPTED], [LATER], [LATER]]
    assert len(server.delivered) == 2


async def test_the_too_many_recipients_pass_after_a_drop_leaves_the_rest_transient() -> None:
    # One recipient per transaction; the server drops after the 4th body: the first of the later
    # transactions for the recipients refused as too many.
    mta = MTA(recipient_limit=1, drop_after_body=4)
    two = ("a@example.org", "b@example.org")
    async with scripted_mta(mta) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many(batch(3, m0=two, m1=two))
    assert [outcomes(r) for r in results] == [[ACCEPTED, IN_DOUBT], [ACCEPTED, LATER], [ACCEPTED]]


async def test_without_pipelining_a_drop_leaves_the_later_messages_transient() -> None:
    async with scripted_mta(MTA(pipelining=False, drop_after_body=2)) as server:
        async with SMTPClient(config(server)) as smtp:
            results = await smtp.send_many(batch(3))
    assert [outcomes(r) for r in results] == [[ACCEPTED], [IN_DOUBT], [LATER]]


# ---- item 11: a refused set-up ends with QUIT and a TLS close_notify ------------------------------

WRONG = PasswordAuth("user@example.com", "not the password")


async def test_a_refused_password_over_tls_ends_with_quit_and_close_notify() -> None:
    async with scripted_mta(MTA(tls="implicit", auth=True)) as server:
        with pytest.raises(SMTPAuthError, match=r"535 5\.7\.8"):
            await SMTPClient(config(server, security="tls", ca_file=str(server.ca_file), auth=WRONG)).connect()
        await server.wait_until(lambda: server.sessions[0].ended is not None)
    [session] = server.sessions
    assert session.verbs == ["EHLO", "AUTH", "QUIT"]
    assert session.ended == "close_notify"


async def test_no_auth_in_common_after_starttls_ends_with_quit_and_close_notify() -> None:
    async with scripted_mta(MTA(tls="starttls", auth=False)) as server:
        cfg = config(server, security="starttls-required", ca_file=str(server.ca_file), auth=WRONG)
        with pytest.raises(SMTPAuthError, match="does not offer authentication"):
            await SMTPClient(cfg).connect()
        await server.wait_until(lambda: server.sessions[0].ended is not None)
    [session] = server.sessions
    assert session.verbs == ["EHLO", "STARTTLS", "EHLO", "QUIT"]
    assert session.ended == "close_notify"


async def test_starttls_required_but_not_offered_ends_with_quit() -> None:
    async with scripted_mta(MTA(tls="none")) as server:
        with pytest.raises(SMTPSecurityError, match="does not offer STARTTLS"):
            await SMTPClient(config(server, security="starttls-required")).connect()
        await server.wait_until(lambda: server.sessions[0].ended is not None)
    [session] = server.sessions
    assert session.verbs == ["EHLO", "QUIT"]
    assert session.ended == "eof"


# ---- item 12: the HELO name -------------------------------------------------------------------------

POSTFIX_FQDN_HELO = MTA(reject_non_fqdn_helo=True)  # reject_non_fqdn_helo_hostname, smtpd_delay_reject=yes


async def test_a_refused_helo_name_is_the_servers_refusal_of_mailgate_not_of_the_recipients() -> None:
    async with scripted_mta(POSTFIX_FQDN_HELO) as server:
        async with SMTPClient(config(server, helo_name="buildbox")) as smtp:
            with pytest.raises(SMTPResponseError, match="Helo command rejected") as refused:
                await smtp.send(envelope("a@example.org", "b@example.org"), BODY)
            assert smtp.is_connected  # the session is fine: it is the settings that are not
        transport = SMTPTransport(config(server, helo_name="buildbox"))
        results = await transport.send_many(batch(2))
        await transport.aclose()
    e = refused.value
    assert (e.code, e.enhanced, e.transient) == (504, "5.5.2", False)
    assert "buildbox" in e.message
    assert all(isinstance(r, SMTPResponseError) and not r.transient for r in results)
    explanation = explain_smtp_error(e)
    assert explanation is SESSION["helo"] and explanation.broken and "smtp.helo_name" in explanation.fix
    assert server.delivered == []


async def test_the_worker_marks_a_server_that_refuses_the_helo_name_broken(open_mg: Opener) -> None:
    mg = await open_mg()
    async with scripted_mta(POSTFIX_FQDN_HELO) as server:
        await mg.tenants.add("acme")
        await mg.servers.set(
            "global",
            server_doc_dict(
                server, smtp={"host": server.host, "port": server.port, "security": "none", "helo_name": "buildbox"}
            ),
        )
        pk = await mg.submit("acme", note())
        await mg.run_worker(until_idle=True)
        resolution = await mg.resolve("acme")
    assert resolution.broken_reason is not None and "Set smtp.helo_name" in resolution.broken_reason
    detail = (await mg.queue.get(pk)).to_dict()
    assert detail["status"] == "deferred" and "refused us for good" in detail["last_error"]


@pytest.mark.parametrize(("hostname", "listen", "greeted"), [
    ("buildbox", "127.0.0.1", "[127.0.0.1]"),
    ("buildbox", "::1", "[IPv6:::1]"),
    ("mailer.example.com", "127.0.0.1", "mailer.example.com"),
])  # fmt: skip
async def test_the_default_helo_name_is_fully_qualified_or_our_address_literal(
    monkeypatch: pytest.MonkeyPatch, hostname: str, listen: str, greeted: str
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    async with scripted_mta(POSTFIX_FQDN_HELO, host=listen) as server:
        async with SMTPClient(config(server, helo_name=None)) as smtp:
            assert (await smtp.send(envelope(), BODY)).all_accepted
    assert server.sessions[0].helo == greeted


# ---- item 14: starttls-required against an implicit TLS port ------------------------------------


async def test_starttls_against_an_implicit_tls_port_says_to_use_tls_without_waiting_out_the_timeout() -> None:
    async with scripted_mta(MTA(tls="implicit")) as server:
        cfg = config(server, security="starttls-required", connect_timeout=0.5, protocol_timeout=30)
        async with asyncio.timeout(10):  # far less than protocol_timeout
            with pytest.raises(SMTPSecurityError, match="implicit TLS") as e:
                await SMTPClient(cfg).connect()
    assert "set security to tls" in e.value.message and "465" in e.value.message
    assert not e.value.transient
    assert explain_smtp_error(e.value) is SESSION["implicit_tls"]


async def test_a_slow_greeting_still_works_after_the_port_was_checked_for_tls() -> None:
    async with scripted_mta(MTA(greeting_delay=0.8)) as server:
        async with SMTPClient(config(server, connect_timeout=0.5)) as smtp:
            assert (await smtp.send(envelope(), BODY)).all_accepted
    # The session's connection, and the check's, which offered TLS and got no handshake.
    assert len(server.sessions) == 2 and sum(s.tls_hello for s in server.sessions) == 1


# ---- item 2: the CA certificate as text; a CA file read safely -----------------------------------


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_a_ca_certificate_given_as_text_verifies_the_server(tls: str) -> None:
    pem = certs_pem()
    security = "tls" if tls == "implicit" else "starttls-required"
    async with scripted_mta(MTA(tls=tls)) as server:  # type: ignore[arg-type]
        async with SMTPClient(config(server, host="localhost", security=security, ca_certificate=pem)) as smtp:
            assert smtp.tls_active and (await smtp.send(envelope(), BODY)).all_accepted


async def test_a_ca_file_that_is_a_fifo_fails_at_once_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer, forever
    async with scripted_mta(MTA(tls="implicit")) as server:
        async with asyncio.timeout(5):
            with pytest.raises(SMTPTLSError, match="not a regular file"):
                await SMTPClient(config(server, security="tls", ca_file=str(fifo))).connect()


@pytest.mark.parametrize("path", ["/dev/zero", "."])
async def test_a_ca_file_that_is_a_device_or_a_directory_is_refused(path: str) -> None:
    async with scripted_mta(MTA(tls="implicit")) as server:
        async with asyncio.timeout(5):
            with pytest.raises(SMTPTLSError, match="not a regular file"):
                await SMTPClient(config(server, security="tls", ca_file=path)).connect()


async def test_an_empty_ca_file_trusts_nothing_rather_than_every_public_ca(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    async with scripted_mta(MTA(tls="implicit")) as server:
        with pytest.raises(SMTPTLSError, match="CA certificate is empty"):
            await SMTPClient(config(server, security="tls", ca_file=str(empty))).connect()


async def test_a_ca_file_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    pem = certs_pem()
    big = tmp_path / "bundle.pem"
    big.write_text(pem * (MAX_CA_FILE // len(pem) + 1))  # valid PEM all the way, just too much of it
    async with scripted_mta(MTA(tls="implicit")) as server:
        with pytest.raises(SMTPTLSError, match="larger than 1 MiB"):
            await SMTPClient(config(server, security="tls", ca_file=str(big))).connect()
        assert server.sessions == []  # refused before connecting


async def test_a_missing_ca_file_says_only_that_it_cannot_be_read(tmp_path: Path) -> None:
    async with scripted_mta(MTA(tls="implicit")) as server:
        with pytest.raises(SMTPTLSError) as e:
            await SMTPClient(config(server, security="tls", ca_file=str(tmp_path / "none.pem"))).connect()
    assert e.value.message == "the CA file (smtp.ca_file) cannot be read"


def certs_pem() -> str:
    return default_pki().ca.cert_pem.decode("ascii")


# ---- item 7: a server that echoes a secret ------------------------------------------------------

SECRET_PASSWORD = "s3cret-Passw0rd!"
RIGHT = PasswordAuth("user@example.com", SECRET_PASSWORD)


def secret_forms(password: str = SECRET_PASSWORD) -> list[str]:
    b64 = base64.b64encode
    return [password, b64(password.encode()).decode(), b64(f"\0user@example.com\0{password}".encode()).decode()]


@pytest.mark.parametrize("echo", ["535 5.7.8 password {password} is wrong",
                                  "535 5.7.8 Error: authentication failed: {payload}"])  # fmt: skip
async def test_a_refusal_that_echoes_the_password_or_its_payload_shows_neither(echo: str) -> None:
    log: list[str] = []
    async with scripted_mta(MTA(auth=True, auth_reply=echo)) as server:
        with pytest.raises(SMTPAuthError) as e:
            await SMTPClient(config(server, auth=RIGHT), protocol_log=log.append).connect()
    shown = " ".join([str(e.value), e.value.reply or "", *log])
    assert "[redacted]" in shown
    assert not any(secret in shown for secret in secret_forms())


async def test_replies_after_auth_that_echo_the_password_are_scrubbed_in_the_delivery() -> None:
    log: list[str] = []
    echo = MTA(
        auth=True, password=SECRET_PASSWORD, rcpt_reply=lambda a: f"550 5.1.1 <{a}> unknown; by {SECRET_PASSWORD}"
    )
    async with scripted_mta(echo) as server:
        async with SMTPClient(config(server, auth=RIGHT), protocol_log=log.append) as smtp:
            delivery = await smtp.send(envelope(), BODY)
    [result] = delivery.results
    assert result.code == 550 and "[redacted]" in result.text
    assert not any(secret in " ".join([str(delivery.to_dict()), *log]) for secret in secret_forms())


async def test_an_xoauth2_token_echoed_by_the_server_is_scrubbed() -> None:
    token = "ya29.a0AfH6SMBx-echoed-token"
    blob = base64.b64encode(f"user=user@example.com\x01auth=Bearer {token}\x01\x01".encode()).decode()

    async def source() -> str:
        return token

    log: list[str] = []
    echo = MTA(auth=True, auth_reply="535 5.7.3 Authentication unsuccessful: {payload}")
    async with scripted_mta(echo) as server:
        with pytest.raises(SMTPAuthError) as e:
            await SMTPClient(
                config(server, auth=OAuth2Auth("user@example.com", source)), protocol_log=log.append
            ).connect()
    assert server.sessions[0].commands[1] == f"AUTH XOAUTH2 {blob}"  # it did go, and came back
    shown = " ".join([str(e.value), e.value.reply or "", *log])
    assert "[redacted]" in shown and token not in shown and blob not in shown


# ---- item 1: peers that are not SMTP servers; bounded replies ---------------------------------------

NOT_SMTP = {
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n400 Bad Request",
    "redis": b"-ERR unknown command 'EHLO', with args beginning with: 'client.example.com'\r\n",
    "binary": random.Random(18).randbytes(300),
}


@pytest.mark.parametrize("peer", list(NOT_SMTP))
async def test_a_peer_that_is_not_an_smtp_server_is_named_without_echoing_what_it_said(peer: str) -> None:
    log: list[str] = []
    async with raw_peer(NOT_SMTP[peer]) as (host, port):
        cfg = SMTPConfig(host, port, security="none", connect_timeout=2, protocol_timeout=5)
        with pytest.raises(SMTPProtocolError) as e:
            await SMTPClient(cfg, protocol_log=log.append).connect()
    assert e.value.message == (
        f"the server at {host}:{port} did not answer as an SMTP server (its first line is not an SMTP reply)"
    )
    assert explain_smtp_error(e.value) is SESSION["not_smtp"]
    assert [line for line in log if line.startswith("S:")] == [line for line in log if "not an SMTP reply" in line]


@pytest.mark.parametrize(("greeting", "check"), [
    (b"220 " + b"x" * 5000 + b"\r\n", lambda text: len(text) <= 512 and text.endswith("\u2026")),
    (b"220 mx \x1b[2J\x1b[31mred\x07 ESMTP\r\n", lambda text: text.isprintable() and "red" in text),
])  # fmt: skip
async def test_reply_text_is_bounded_and_printable(greeting: bytes, check: Callable[[str], bool]) -> None:
    async with raw_peer(greeting) as (host, port):
        client = SMTPClient(SMTPConfig(host, port, security="none", connect_timeout=2, protocol_timeout=5))
        await client.open()
        reply = await client.read_greeting()
        client.close()
    assert reply.code == 220 and check(reply.text)


async def test_an_endless_multi_line_reply_is_refused() -> None:
    async with raw_peer(b"220-mx.example.com and so on\r\n" * 1000) as (host, port):
        with pytest.raises(SMTPProtocolError, match="more than 100 lines"):
            await SMTPClient(SMTPConfig(host, port, security="none", connect_timeout=2, protocol_timeout=5)).connect()


async def test_a_quit_cancelled_while_it_waits_still_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def never_answers_quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example.com ESMTP\r\n")
        await reader.readline()
        writer.write(b"250 mx.example.com\r\n")
        while await reader.read(1024):  # QUIT, and no answer: until the client hangs up
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(never_answers_quit, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SMTPClient(SMTPConfig("127.0.0.1", port, security="none", helo_name="client.example.com"))
    await client.connect()
    quitting = asyncio.create_task(client.quit())
    await asyncio.sleep(0.2)
    quitting.cancel()
    async with asyncio.timeout(3):  # QUIT alone would wait 5 s
        await closed.wait()
    server.close()
