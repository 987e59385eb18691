"""Four small fixes from a review: a batch item that is not a JSON object is answered alone; a
Message-ID mailgate made follows the From into the server's domain when the server sends as its
own address; an attachment keeps its charset (API, Django, `mailgate send --attach`, the SMTP
ingress); `mailgate serve --demo` says how to send through its SMTP ingress. Real peers only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP, default
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_KEY
from mailgate import Mailgate, Message, MessageError
from mailgate.config import Config
from mailgate.ingress import IngressServer, self_signed, server_context
from mailgate.message import Attachment
from mailgate.settings.document import parse_server
from smtp_servers import ServerConfig, serve, serve_in_thread
from test_batch import URL, api, count, message
from test_from_policy import server_doc
from test_serve import Served

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
SENDER = "no-reply@operator.example"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05)


# ---- 1. a batch item that is not a JSON object -------------------------------------------------------


async def test_a_batch_item_that_is_not_an_object_is_answered_alone_and_the_others_are_stored(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        body = {"messages": [message(0), 42, "a message", None, [message(4)], True, message(6)]}
        reply = await http.post(URL, json=body, headers=sender)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r.get("status") for r in results] == ["queued", None, None, None, None, None, "queued"]
        for i, kind in [(1, "a number"), (2, "a string"), (3, "null"), (4, "an array"), (5, "a boolean")]:
            assert results[i] == {"error": {
                "status": 422, "code": "invalid_input", "message": "the message is not valid",
                "problems": [{"field": f"messages[{i}]", "problem": f"is {kind}, not a JSON object (a message)"}],
            }}, results[i]  # fmt: skip
        # Shaped as the error of an object that is not a valid message.
        bad = (await http.post(URL, json={"messages": [message(9, colour="red")]}, headers=sender)).json()["results"][0]
        assert bad["error"].keys() == results[1]["error"].keys()
        assert bad["error"]["message"] == results[1]["error"]["message"]
        assert await count(mg) == 2


# ---- 2. mailgate's Message-ID follows a rewritten From ---------------------------------------------


def _split(message_id: str) -> tuple[str, str]:
    unique, _, domain = message_id.strip("<>").rpartition("@")
    return unique, domain


def ceo(**kw: Any) -> Message:
    return Message(from_="The CEO <ceo@bank.example>", to="alice@example.org", subject="Wire", text="now", **kw)


@pytest.fixture
async def fast(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="admin", config=FAST) as opened:
        await opened.tenants.add("acme")
        yield opened


async def drain(mg: Mailgate) -> None:
    for _ in range(40):
        await mg.run_worker(until_idle=True)
        by = (await mg.queue.stats())["by_status"]
        if not by["queued"] + by["deferred"] + by["sending"]:
            return
        await asyncio.sleep(0.06)


def test_fill_in_moves_the_made_message_id_to_the_servers_domain_and_keeps_a_given_one() -> None:
    doc = parse_server({"from_address": SENDER, "smtp": {"host": "smtp.example.com"}})
    made = ceo()
    assert made.message_id is not None and _split(made.message_id)[1] == "bank.example"
    sent = doc.fill_in(made, policy="fixed")
    assert sent.message_id == doc.fill_in(made, policy="fixed").message_id  # the same at every attempt
    assert _split(sent.message_id or "") == (_split(made.message_id)[0], "operator.example")
    assert doc.fill_in(made, policy="any").message_id == made.message_id  # its own From: its own domain
    given = ceo(message_id="<wire.7@bank.example>")
    assert doc.fill_in(given, policy="fixed").message_id == "<wire.7@bank.example>"
    stored = Message.from_dict(json.loads(json.dumps(made.to_dict())))  # as the outbox keeps it
    assert doc.fill_in(stored, policy="fixed").message_id == sent.message_id


async def test_the_global_server_sends_mailgates_message_id_in_its_own_domain_on_every_attempt(
    fast: Mailgate,
) -> None:
    replies = iter(["451 4.3.0 Try again later"])
    async with serve(ServerConfig(data_reply=lambda m: next(replies, None))) as server:
        await fast.servers.set("global", server_doc(server))  # the global server: fixed by default
        made = ceo()
        pk = await fast.submit("acme", made)
        await drain(fast)
        first, second = await asyncio.wait_for(server.wait_for_messages(2), 5)
    record = (await fast.queue.get(pk)).to_dict()
    assert record["status"] == "sent" and record["attempts"] == 2
    ids = [m.parsed()["Message-ID"] for m in (first, second)]
    assert ids[0] == ids[1] == record["message_id"], (ids, record["message_id"])
    assert _split(ids[0]) == (_split(made.message_id or "")[0], "operator.example")
    assert first.parsed()["From"] == f"Operator <{SENDER}>"


async def test_a_from_the_domains_stopped_allowing_takes_the_message_id_along(fast: Mailgate) -> None:
    async with serve(ServerConfig()) as server:
        await fast.servers.set("global", server_doc(server, from_policy="domains", from_domains=["bank.example"]))
        pk = await fast.submit("acme", ceo())
        await fast.submit("acme", ceo(message_id="<wire.7@bank.example>"))
        stored = (await fast.queue.get(pk)).to_dict()["message_id"]
        assert _split(stored)[1] == "bank.example"  # its own From is allowed at the submit
        await fast.servers.set("global", server_doc(server, from_policy="domains", from_domains=["acme.example"]))
        await drain(fast)
        received = await asyncio.wait_for(server.wait_for_messages(2), 5)
    assert {m.parsed()["From"] for m in received} == {f"Operator <{SENDER}>"}
    # mailgate's own follows the From; the sender's own is sent as given.
    unique = _split(stored)[0]
    assert {m.parsed()["Message-ID"] for m in received} == {f"<{unique}@operator.example>", "<wire.7@bank.example>"}


# ---- 3. an attachment's charset -----------------------------------------------------------------------

LATIN = "Café, crème brûlée: 12 €\n"


def attachment_parts(raw: bytes) -> list[EmailMessage]:
    parsed = BytesParser(policy=default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return list(parsed.iter_attachments())


@pytest.mark.parametrize(
    "content_type",
    ["text/plain; charset=iso-8859-15", 'text/plain;charset="ISO-8859-15"', "text/plain; Charset=latin-9"],
)
def test_an_attachment_may_say_its_charset_and_the_recipient_reads_it(content_type: str) -> None:
    data = LATIN.encode("iso-8859-15")
    m = Message(from_="a@example.com", to="b@example.org", text="x",
                attachments=[Attachment("menu.txt", content_type, data)])  # fmt: skip
    [part] = attachment_parts(m.compose())
    assert part.get_content_type() == "text/plain" and part.get_filename() == "menu.txt"
    assert part.get_content_charset() == "iso-8859-15"  # as mail clients name it
    assert part.get_content() == LATIN and part.get_payload(decode=True) == data


@pytest.mark.parametrize(
    ("content_type", "why"),
    [
        ("text/plain; charset=klingon", "not a charset mailgate knows"),
        ("text/plain; charset=rot13", "not a charset mailgate knows"),  # a codec, but not a text encoding
        ("text/plain; charset=unicode_escape", "not a charset mailgate knows"),  # Python's only
        ("text/plain; name=evil.exe", "charset is the one parameter taken"),
        ("text/plain; charset=utf-8; format=flowed", "charset is the one parameter taken"),
        ("text/plain; charset=utf-8\r\nBcc: x@example.org", "charset is the one parameter taken"),
        ('text/plain; charset="utf-8', "charset is the one parameter taken"),
        ("text/plain; charset=" + "u" * 41, "charset is the one parameter taken"),
    ],
)
def test_any_other_parameter_or_charset_is_refused(content_type: str, why: str) -> None:
    with pytest.raises(MessageError, match=why) as e:
        Message(from_="a@example.com", to="b@example.org", attachments=[Attachment("a.txt", content_type, b"x")])
    assert e.value.field == "attachments[0].content_type"


async def test_the_api_takes_a_charset_and_the_recipient_reads_the_text(mg: Mailgate) -> None:
    import base64

    async with api(mg) as (http, _, sender, peer):
        att = {"filename": "menu.txt", "content_type": "text/plain; charset=iso-8859-15",
               "content_base64": base64.b64encode(LATIN.encode("iso-8859-15")).decode()}  # fmt: skip
        reply = await http.post("/v1/messages", headers=sender,
                                json={"to": ["r@example.org"], "text": "menu", "attachments": [att]})  # fmt: skip
        assert reply.status_code == 202, reply.text
        await mg.run_worker(until_idle=True)
        [received] = await asyncio.wait_for(peer.wait_for_messages(1), 5)
    [part] = attachment_parts(received.content)
    assert part.get_content_charset() == "iso-8859-15" and part.get_content() == LATIN


def test_mailgate_send_labels_a_utf8_text_file_and_leaves_other_bytes_unlabelled(tmp_path: Path) -> None:
    notes, legacy = tmp_path / "notes.txt", tmp_path / "legacy.txt"
    notes.write_text("Grüße aus Köln\n", encoding="utf-8")
    legacy.write_bytes(LATIN.encode("iso-8859-15"))  # not UTF-8: what it is, mailgate can't know
    with serve_in_thread(ServerConfig()) as server:
        doc = tmp_path / "server.json"
        doc.write_text(json.dumps(server_doc(server)))
        out = subprocess.run([MAILGATE, "send", "--server", str(doc), "--to", "a@example.org", "--text", "see",
                              "--attach", str(notes), "--attach", str(legacy)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        [received] = server.wait_for_messages_sync(1)
    first, second = attachment_parts(received.content)
    assert first.get_content_charset() == "utf-8" and first.get_content() == "Grüße aus Köln\n"
    assert second.get_content_charset() is None and second.get_payload(decode=True) == LATIN.encode("iso-8859-15")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


async def test_the_smtp_ingress_keeps_a_parts_own_charset(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with serve(ServerConfig()) as peer:
        await mg.tenants.add("acme")
        smtp = {"host": peer.host, "port": peer.port, "security": "none"}
        await mg.servers.set("global", {"from_address": SENDER, "from_policy": "any", "smtp": smtp})
        token, _ = await mg.api_tokens.create("sender", "acme")
        async with IngressServer(mg, "127.0.0.1", 0, server_context(*certificate)) as ingress:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "alerts@acme.example", "bob@example.org", "Menu"
            msg.set_content("The menu is attached.\n")
            msg.add_attachment(LATIN, subtype="plain", charset="iso-8859-15", filename="menu.txt")
            msg.add_attachment("naïve\n", subtype="csv", charset="utf-8", filename="list.csv")

            def submit() -> None:
                with smtplib.SMTP("127.0.0.1", ingress.port, timeout=10) as smtp:
                    smtp.starttls(context=ssl.create_default_context(cafile=str(certificate[0])))
                    smtp.login("acme", token)
                    smtp.send_message(msg)

            await asyncio.to_thread(submit)
            await mg.run_worker(until_idle=True)
            [received] = await asyncio.wait_for(peer.wait_for_messages(1), 5)
    menu, listed = attachment_parts(received.content)
    # (smtplib sent the lines with CRLF, as SMTP does: that is the text as it arrived)
    assert menu.get_content_charset() == "iso-8859-15" and menu.get_content() == LATIN.replace("\n", "\r\n")
    assert listed.get_content_charset() == "utf-8" and listed.get_content() == "naïve\r\n"


# ---- the Django backend, through a real `mailgate serve` -------------------------------------------


@pytest.fixture(scope="module")
def served_django(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    django = pytest.importorskip("django")
    from served import served_with_smtp

    with served_with_smtp(tmp_path_factory.mktemp("serve")) as served:
        os.environ["TEST_MAILGATE_URL"], os.environ["TEST_MAILGATE_TOKEN"] = served.url, served.sender
        os.environ["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
        django.setup()
        from django.conf import settings
        from django.test.utils import override_settings
        from django.utils.functional import empty

        try:
            with override_settings(MAILGATE_URL=served.url, MAILGATE_TOKEN=served.sender):
                yield served
        finally:
            # Django reads its settings module once a process: forgotten, so that test_django_backend's
            # settings name its own `mailgate serve`, not this one (stopped by then).
            settings._wrapped = empty
            sys.modules.pop("django_project.settings", None)
            del os.environ["TEST_MAILGATE_URL"], os.environ["TEST_MAILGATE_TOKEN"]


def _delivered(served: Any, subject: str) -> EmailMessage:
    served.smtp.wait_until_sync(lambda: any(m.parsed()["Subject"] == subject for m in served.smtp.messages), 20)
    [found] = [m for m in served.smtp.messages if m.parsed()["Subject"] == subject]
    parsed = BytesParser(policy=default).parsebytes(found.content)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_django_writes_a_text_attachment_in_the_messages_encoding_and_labels_it(served_django: Any) -> None:
    from django.core.mail import EmailMessage as DjangoMessage

    email = DjangoMessage("Menu in Latin-9", "The menu is attached.", "news@example.com", ["bob@example.org"])
    email.encoding = "iso-8859-15"
    email.attach("menu.txt", LATIN, "text/plain")
    email.attach("data.bin", b"\x00\x01", "application/octet-stream")
    assert email.send() == 1
    menu, data = _delivered(served_django, "Menu in Latin-9").iter_attachments()
    assert menu.get_content_charset() == "iso-8859-15" and menu.get_payload(decode=True) == LATIN.encode("iso-8859-15")
    assert menu.get_content() == LATIN
    assert data.get_content_charset() is None and data.get_payload(decode=True) == b"\x00\x01"


def test_django_writes_a_text_attachment_in_default_charset_without_an_encoding(served_django: Any) -> None:
    from django.core.mail import EmailMessage as DjangoMessage
    from django.test.utils import override_settings

    with override_settings(DEFAULT_CHARSET="utf-8"):
        email = DjangoMessage("Menu in UTF-8", "The menu is attached.", "news@example.com", ["bob@example.org"])
        email.attach("menu.txt", LATIN, "text/plain")
        assert email.send() == 1
    [menu] = _delivered(served_django, "Menu in UTF-8").iter_attachments()
    assert menu.get_content_charset() == "utf-8" and menu.get_content() == LATIN


# ---- 4. `mailgate serve --demo` says how to use its SMTP ingress -------------------------------------


@pytest.fixture
def env() -> dict[str, str]:
    drop = ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MAILGATE_SECRET_KEYS": TEST_KEY,
            "MAILGATE_POLL_INTERVAL": "0.1"}  # fmt: skip


@contextlib.contextmanager
def demo(tmp_path: Path, env: dict[str, str]) -> Iterator[Served]:
    served = Served(tmp_path, env, ["--demo"])
    try:
        yield served
    finally:
        if served.process.poll() is None:
            served.stop()


def test_serve_demo_prints_how_to_send_through_its_smtp_ingress_and_that_works(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with demo(tmp_path, env) as served:
        deadline = time.monotonic() + 30
        while "to send by SMTP" not in served.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        out = served.output()
        found = re.search(r"to send by SMTP: host (\S+), port (\d+); STARTTLS is required and its certificate is "
                          r"self-signed: tell the client not to verify it \(demo only\); user demo, password a "
                          r"sender token of tenant demo, made \(and shown once\) with:\n +(\S+) (tokens create "
                          r"--role sender --tenant demo)\n", out)  # fmt: skip
        assert found is not None, out
        host, port, command = found.group(1), int(found.group(2)), found.group(4).split()
        token = served.cli(*command).splitlines()[0]  # the command as printed, run in its directory
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        msg = EmailMessage(policy=SMTP)
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", "someone@example.com", "By SMTP"
        msg.set_content("Through the demo's SMTP ingress.\n")
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.starttls(context=unverified)
            smtp.login("demo", token)
            assert smtp.send_message(msg) == {}
        queued = json.loads(served.cli("queue", "list", "--json"))
        assert any(m["subject"] == "By SMTP" for m in queued), queued
