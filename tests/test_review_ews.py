"""Review of the EWS transport: what a hostile or broken Exchange (or Autodiscover answer) could do.

Each test ran against the code before its fix and failed there: a UTF-16 reply with a DTD and an
entity was read (the "<!DOCTYPE" check looked at bytes), replies of any depth and size of tree were
parsed, a server trickling its reply held the sender past every timeout, a BackOffMilliseconds of
400 digits raised OverflowError (fractions and negatives were dropped), pyspnego logged every NTLM
token at DEBUG, the user name Exchange echoed reached the attempt log, an Autodiscover candidate
the destination policy refuses ended Autodiscover instead of being skipped, an EWS URL that
Autodiscover named was used if it was http (to loopback), too long, not printable or with
user:password@ (and ews.url took user:password@ too), and an ews.url httpx can't request raised
its own exception out of the transport.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import test_ews
import test_graph
from fakes.ews import AUTODISCOVER_PATH, FakeEWS
from fakes.identity import HTTPResponse
from mailgate import Mailgate
from mailgate.destinations import DestinationPolicy, parse_networks
from mailgate.errors import SettingsError
from mailgate.settings.document import parse_server
from mailgate.transports.ews import EWSError, EWSTransport
from test_ews import ACCOUNT, MAILBOX, PASSWORD, autodiscover_doc, ews_doc
from test_graph import deliver, note, status

mg = test_graph.mg
ews = test_ews.ews


@contextlib.asynccontextmanager
async def transport_of(
    doc: dict[str, Any], policy: DestinationPolicy | None = None, *, url: str | None = None, **kw: Any
) -> AsyncIterator[EWSTransport]:
    """An EWSTransport of `doc` over mailgate's own (guarded, with `policy`) clients. `url`: an
    ews.url the settings refuse, put in past them (a document stored before they did)."""
    from mailgate._http import new_client

    server = parse_server(doc)
    if url is not None:
        assert server.ews is not None
        server = server.model_copy(update={"ews": server.ews.model_copy(update={"url": url})})
    http = new_client(policy)
    transport = EWSTransport(server, http, new_http=lambda: new_client(policy), **kw)
    try:
        yield transport
    finally:
        await transport.aclose()
        await http.aclose()


def rewriting(change: Callable[[str], str], encoding: str = "utf-8") -> Callable[[HTTPResponse], HTTPResponse]:
    def rewrite(response: HTTPResponse) -> HTTPResponse:
        return dataclasses.replace(response, body=change(response.body.decode()).encode(encoding))

    return rewrite


# ---- 1. XML replies are parsed safely ---------------------------------------------------------

DECLARATION = '<?xml version="1.0" encoding="utf-8"?>'


def _utf16_with_an_entity(body: str) -> str:
    """The reply in UTF-16, its success spelled by an entity its DTD declares."""
    body = body.replace('ResponseClass="Success"', 'ResponseClass="&ok;"')
    return body.replace(DECLARATION, '<?xml version="1.0" encoding="utf-16"?>'
                                     '<!DOCTYPE s:Envelope [<!ENTITY ok "Success">]>')  # fmt: skip


def _deep(body: str) -> str:
    return body.replace("<s:Header>", "<s:Header>" + "<x>" * 50 + "</x>" * 50)


def _many(body: str) -> str:
    return body.replace("<s:Header>", "<s:Header>" + "<x/>" * 10_001)


@pytest.mark.parametrize(
    ("change", "encoding"),
    [
        pytest.param(_utf16_with_an_entity, "utf-16", id="utf16-dtd-entity"),
        pytest.param(_deep, "utf-8", id="50-levels"),
        pytest.param(_many, "utf-8", id="10001-elements"),
    ],
)
async def test_a_reply_with_a_dtd_in_any_encoding_or_too_large_a_tree_is_not_read(
    ews: FakeEWS, change: Callable[[str], str], encoding: str
) -> None:
    ews.rewrite = rewriting(change, encoding)
    async with transport_of(ews_doc(ews, scheme="basic")) as transport:
        with pytest.raises(EWSError) as refused:
            await transport.check_mailbox()  # GetFolder: a success, but for the DTD or the tree's size
    assert "not as EWS does" in refused.value.message and not refused.value.transient


# ---- 2. an overall deadline per request -------------------------------------------------------


async def test_a_server_trickling_its_reply_meets_the_requests_deadline(ews: FakeEWS) -> None:
    # A piece every 0.2 s, for 12 s: every read gets something within protocol_timeout (2 s),
    # the whole takes longer than connect_timeout + protocol_timeout (3 s).
    ews.rewrite = lambda response: dataclasses.replace(response, trickle=12.0)
    doc = ews_doc(ews, scheme="basic")
    doc["connection"] = {"connect_timeout": 1, "protocol_timeout": 2}
    async with transport_of(doc) as transport:
        with pytest.raises(EWSError) as lost:
            await transport.check_mailbox()
    assert "the request's deadline" in lost.value.message and lost.value.transient


# ---- 4. the EWS URL Autodiscover names; ews.url without user:password@ ------------------------


@pytest.mark.parametrize(
    "found",
    [
        pytest.param(None, id="http-to-loopback"),  # the fake's own URL, plain http
        pytest.param("https://notify:secret@127.0.0.1:1/EWS/Exchange.asmx", id="user-password"),
        pytest.param("https://127.0.0.1:1/EWS/" + "a" * 2000, id="too-long"),
        pytest.param("https://127.0.0.1:1/EWS/\u200bExchange.asmx", id="not-printable"),
    ],
)
async def test_an_autodiscovered_url_is_used_only_if_https_printable_short_and_without_credentials(
    ews: FakeEWS, found: str | None
) -> None:
    ews.autodiscover_ews_url = found
    candidates = [ews.url + AUTODISCOVER_PATH]
    async with transport_of(autodiscover_doc(ews), autodiscover_urls=lambda domain: candidates) as transport:
        with pytest.raises(EWSError) as refused:
            await transport.check_mailbox()
        assert transport.url is None
    assert "Autodiscover found no EWS URL" in refused.value.message and "which mailgate does not use" in \
        refused.value.message  # fmt: skip
    assert not [r for r in ews.requests if r.path == "/EWS/Exchange.asmx"]


def test_an_ews_url_with_user_and_password_is_refused_at_save(ews: FakeEWS) -> None:
    doc = ews_doc(ews)
    doc["ews"]["url"] = doc["ews"]["url"].replace("http://", "http://notify:secret@", 1)
    with pytest.raises(SettingsError) as refused:
        parse_server(doc)
    assert [f for f, _ in refused.value.problems] == ["ews.url"] and "user:password@" in refused.value.problems[0][1]


# ---- 5. BackOffMilliseconds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("9" * 400, 3600, id="huge"),
        pytest.param("2500.5", 3, id="fraction"),
        pytest.param("-7.5", 0, id="negative-fraction"),
    ],
)
async def test_back_off_milliseconds_is_clamped_to_whole_seconds(ews: FakeEWS, value: str, seconds: int) -> None:
    ews.fail_next("ErrorServerBusy", back_off_ms=value, operation="GetFolder")
    async with transport_of(ews_doc(ews, scheme="basic")) as transport:
        with pytest.raises(EWSError) as busy:
            await transport.check_mailbox()
    assert busy.value.transient and busy.value.ews_code == "ErrorServerBusy"
    assert busy.value.retry_after == seconds and isinstance(busy.value.retry_after, int)


# ---- 6. pyspnego's DEBUG log ------------------------------------------------------------------


async def test_ntlm_tokens_never_reach_a_debug_log(ews: FakeEWS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's DEBUG records
    async with transport_of(ews_doc(ews)) as transport:
        await transport.check_mailbox()
    tokens = [r.headers["authorization"].partition(" ")[2] for r in ews.requests if "authorization" in r.headers]
    assert len(tokens) == 2 and ews.ntlm_handshakes == 1  # negotiate and authenticate went out
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [t for t in tokens if t in logged]


# ---- 7. credentials Exchange echoes -----------------------------------------------------------


async def test_the_user_name_and_password_exchange_echoes_are_redacted(ews: FakeEWS, mg: Mailgate) -> None:
    await mg.servers.set("global", ews_doc(ews))
    user = ACCOUNT.rpartition("\\")[2]
    ews.fail_next("ErrorInvalidRecipients", operation="CreateItem",
                  text=f"{ACCOUNT.lower()} ({user}, {PASSWORD}) may not send from {MAILBOX}")  # fmt: skip
    [pk] = await deliver(mg, note())
    assert await status(mg, pk) == "failed"
    text = (await mg.queue.get(pk)).attempts[-1]["text"]
    assert "ErrorInvalidRecipients" in text and MAILBOX in text  # the rest of Exchange's text is kept
    assert not re.search(rf"\b{user}\b", text, re.IGNORECASE) and PASSWORD not in text
    assert text.count("[redacted]") == 3


# ---- 8. Autodiscover skips a host the destination policy refuses ------------------------------


async def test_autodiscover_skips_a_candidate_the_destination_policy_refuses(ews: FakeEWS) -> None:
    policy = DestinationPolicy("tenant", parse_networks("127.0.0.1/32"))  # the fake's address only
    candidates = ["https://10.255.255.1/autodiscover/autodiscover.xml", ews.url + AUTODISCOVER_PATH]
    async with transport_of(autodiscover_doc(ews), policy, autodiscover_urls=lambda domain: candidates) as transport:
        with pytest.raises(EWSError) as none:
            await transport.check_mailbox()  # the fake names its own http URL: not used (https only)
    message = none.value.message
    assert "10.255.255.1" in message and "private network" in message and "MAILGATE_TENANT_NETWORKS" in message
    assert [r for r in ews.requests if r.path == AUTODISCOVER_PATH]  # the second candidate was asked


# ---- 9. a URL httpx can't request -------------------------------------------------------------


async def test_an_ews_url_httpx_refuses_is_a_broken_server_not_an_exception(ews: FakeEWS) -> None:
    bad = "https://\uff0e\uff0e/EWS/Exchange.asmx"  # printable, a host name IDNA can't encode
    doc = ews_doc(ews)
    doc["ews"]["url"] = bad
    with pytest.raises(SettingsError, match=r"ews\.url"):  # as ews.url, refused at save
        parse_server(doc)
    # Named by Autodiscover, it reaches the transport: was httpx2.InvalidURL out of it.
    ews.autodiscover_ews_url = bad
    candidates = [ews.url + AUTODISCOVER_PATH]
    async with transport_of(autodiscover_doc(ews), autodiscover_urls=lambda domain: candidates) as transport:
        with pytest.raises(EWSError) as broken:
            await transport.check_mailbox()
    assert "The EWS URL" in broken.value.message and not broken.value.transient


async def test_an_ews_url_with_a_port_out_of_range_is_refused_at_save_and_never_requested(
    ews: FakeEWS, mg: Mailgate
) -> None:
    doc = ews_doc(ews)
    url = doc["ews"]["url"] = "http://127.0.0.1:99999/EWS/Exchange.asmx"
    with pytest.raises(SettingsError) as refused:
        await mg.servers.set("global", doc)
    assert [f for f, _ in refused.value.problems] == ["ews.url"] and "port" in refused.value.problems[0][1]
    async with transport_of(ews_doc(ews), url=url) as transport:  # was an ExceptionGroup (OverflowError)
        with pytest.raises(EWSError) as broken:
            await transport.check_mailbox()
    assert "The EWS URL is not a URL" in broken.value.message and "ews.url" in broken.value.message
    assert not broken.value.transient and not ews.requests
