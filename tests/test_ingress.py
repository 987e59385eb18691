"""The SMTP submission ingress: real clients (Python's smtplib, Nodemailer, swaks) hand mail to it
over STARTTLS with an API token, it lands in the tenant's outbox, and the worker delivers it to a
real SMTP server. Every refusal the issue names is driven by a client and checked by its reply."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.ingress import IngressServer, from_bytes, self_signed, server_context
from mailgate.message import MessageError
from smtp_servers import RecordingServer, ServerConfig, serve, serve_in_thread

NODE_DIR = Path(__file__).parent / "node"
MAILGATE = str(Path(sys.executable).with_name("mailgate"))


@dataclass
class Ingress:
    mg: Mailgate
    server: IngressServer
    peer: RecordingServer
    cafile: Path
    token: str

    @property
    def port(self) -> int:
        return self.server.port

    def connect(self, *, tls: bool = True, login: tuple[str, str] | None = None) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        smtp.ehlo("client.example")
        if tls:
            smtp.starttls(context=ssl.create_default_context(cafile=str(self.cafile)))
            smtp.ehlo("client.example")
        if login is not None:
            smtp.login(*login)
        return smtp


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


@contextlib.asynccontextmanager
async def ingress(mg: Mailgate, certificate: tuple[Path, Path], **options: Any) -> AsyncIterator[Ingress]:
    async with serve(ServerConfig()) as peer:
        await mg.tenants.add("acme")
        await mg.tenants.add("globex")
        await mg.servers.set("global", {
            "from_address": "no-reply@example.com", "from_policy": "any",
            "smtp": {"host": peer.host, "port": peer.port, "security": "none"},
        })  # fmt: skip
        token, _ = await mg.api_tokens.create("sender", "acme")
        async with IngressServer(mg, "127.0.0.1", 0, server_context(*certificate), **options) as server:
            yield Ingress(mg, server, peer, certificate[0], token)


async def stored(mg: Mailgate) -> list[dict[str, Any]]:
    found = await mg.queue.list_messages(tenant_id=None, status=None, limit=100, before=None)
    return [m.to_dict() for m in found]


def note(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "Alerts <alerts@acme.example>")
    msg["To"] = headers.pop("To", "Bob <bob@example.org>")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    if msg["Subject"] is None:
        msg["Subject"] = "Disk almost full"
    msg.set_content("The disk of db-1 is 91% full.\n")
    return msg


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def drain(mg: Mailgate) -> None:
    for _ in range(20):
        await mg.run_worker(until_idle=True)
        by = (await mg.queue.stats())["by_status"]
        if not by["queued"] + by["deferred"] + by["sending"]:
            return
        await asyncio.sleep(0.05)


# ---- end to end --------------------------------------------------------------------------------------


async def test_smtplib_submits_over_starttls_and_the_worker_delivers_to_a_real_peer(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:
        msg = note(Cc="Carol <carol@example.org>", Bcc="dave@example.org", X_Ticket="T-42")
        msg.add_alternative("<p>The disk of <b>db-1</b> is 91% full.</p>", subtype="html")
        msg.add_attachment(b"%PDF-1.4 report", maintype="application", subtype="pdf", filename="report.pdf")

        def send() -> tuple[dict[str, Any], list[str]]:
            with ing.connect(login=("acme", ing.token)) as smtp:
                features = list(smtp.esmtp_features)
                return smtp.send_message(msg), features

        refused, features = await in_thread(send)
        assert refused == {}
        assert {"pipelining", "8bitmime", "smtputf8", "size", "auth"} <= set(features)
        [row] = await stored(mg)
        assert row["tenant"] == "acme" and row["status"] == "queued" and row["subject"] == "Disk almost full"
        await drain(mg)
        [got] = ing.peer.messages
    assert sorted(got.rcpt_tos) == ["bob@example.org", "carol@example.org", "dave@example.org"]
    parsed = got.parsed()
    assert parsed["Bcc"] is None and "dave@" not in got.content.decode()  # Bcc: envelope only
    assert parsed["X-Ticket"] == "T-42" and parsed["Subject"] == "Disk almost full"
    assert str(parsed["From"]) == "Alerts <alerts@acme.example>"
    assert "91% full" in parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "<b>db-1</b>" in parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "report.pdf" and attachment.get_content() == b"%PDF-1.4 report"


async def test_auth_login_and_a_token_alone_with_an_empty_user(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:

        def both() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with ing.connect() as smtp:
                smtp.user, smtp.password = "acme", ing.token
                login = smtp.auth("LOGIN", smtp.auth_login)
                smtp.sendmail("a@acme.example", ["bob@example.org"], note().as_bytes(policy=SMTP))
            with ing.connect() as smtp:
                plain = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0\0{ing.token}".encode()).decode())
                smtp.sendmail("a@acme.example", ["bob@example.org"], note().as_bytes(policy=SMTP))
            return login, plain

        login, plain = await in_thread(both)
        assert login[0] == 235 and plain[0] == 235
        assert len(await stored(mg)) == 2


async def test_pipelined_commands_are_answered_in_order(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:

        def pipelined() -> list[int]:
            with ing.connect(login=("acme", ing.token)) as smtp:
                smtp.send(b"MAIL FROM:<a@acme.example>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<eve@example.org>\r\n"
                          b"DATA\r\n")  # fmt: skip
                codes = [smtp.getreply()[0] for _ in range(4)]
                smtp.send(note(To="bob@example.org, eve@example.org").as_bytes(policy=SMTP) + b".\r\n")
                codes.append(smtp.getreply()[0])
                return codes

        assert await in_thread(pipelined) == [250, 250, 250, 354, 250]
        [row] = await stored(mg)
        assert row["recipients"]["pending"] == 2


def _node_ready() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "nodemailer" / "package.json").exists():
        return f"nodemailer is not installed: npm install --prefix {NODE_DIR} (.ci/run does)"
    return None


@pytest.mark.skipif(_node_ready() is not None, reason=_node_ready() or "")
async def test_nodemailer_submits_and_the_message_is_delivered(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    script = """
const nodemailer = require("nodemailer");
const fs = require("fs");
const [port, token, ca] = process.argv.slice(1);
const t = nodemailer.createTransport({host: "127.0.0.1", port: Number(port), secure: false, requireTLS: true,
    tls: {ca: fs.readFileSync(ca), servername: "localhost"}, auth: {user: "acme", pass: token}});
t.sendMail({from: "Shop <shop@acme.example>", to: "bob@example.org", bcc: "eve@example.org",
    subject: "Ihre Bestellung – Nr. 7", text: "Danke für Ihre Bestellung.", html: "<p>Danke für Ihre Bestellung.</p>",
    attachments: [{filename: "rechnung.txt", content: "Summe: 12 €"}]})
  .then(info => { console.log(JSON.stringify({response: info.response})); })
  .catch(err => { console.log(JSON.stringify({error: String(err), code: err.responseCode})); process.exit(1); });
"""
    async with ingress(mg, certificate) as ing:
        proc = await asyncio.create_subprocess_exec(
            "node", "-e", script, str(ing.port), ing.token, str(ing.cafile), cwd=NODE_DIR,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out, err)
        assert json.loads(out)["response"].startswith("250 2.0.0 Ok: queued as ")
        await drain(mg)
        [got] = ing.peer.messages
    assert sorted(got.rcpt_tos) == ["bob@example.org", "eve@example.org"]
    parsed = got.parsed()
    assert parsed["Subject"] == "Ihre Bestellung – Nr. 7" and parsed["Bcc"] is None
    assert parsed.get_body(("plain",)).get_content().strip() == "Danke für Ihre Bestellung."  # type: ignore[union-attr]
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "rechnung.txt" and attachment.get_payload(decode=True) == "Summe: 12 €".encode()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")
async def test_swaks_submits_with_starttls_and_auth_plain(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", f"127.0.0.1:{ing.port}", "-tls", "--auth", "PLAIN", "--auth-user", "acme",
            "--auth-password", ing.token, "--from", "ops@acme.example", "--to", "bob@example.org",
            "--header", "Subject: swaks says hello", "--body", "sent by swaks",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out.decode()[-2000:], err.decode()[-2000:])
        assert b"250 2.0.0 Ok: queued as" in out
        await drain(mg)
        [got] = ing.peer.messages
    assert got.rcpt_tos == ["bob@example.org"] and got.parsed()["Subject"] == "swaks says hello"


# ---- refusals ------------------------------------------------------------------------------------


async def test_auth_needs_starttls_first_and_mail_needs_auth(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:

        def attempts() -> tuple[Any, ...]:
            with ing.connect(tls=False) as smtp:
                features = set(smtp.esmtp_features)
                auth = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0acme\0{ing.token}".encode()).decode())
                mail = smtp.docmd("MAIL", "FROM:<a@acme.example>")
            with ing.connect() as smtp:
                mail_after_tls = smtp.docmd("MAIL", "FROM:<a@acme.example>")
            return features, auth, mail, mail_after_tls

        features, auth, mail, mail_after_tls = await in_thread(attempts)
    assert "auth" not in features and "starttls" in features  # never offered in clear
    assert auth[0] == 530 and mail[0] == 530
    assert mail_after_tls[0] == 530 and b"5.7.0" in mail_after_tls[1]


async def test_a_bad_token_another_tenant_and_a_tenant_admin_token_are_refused(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:
        admin, _ = await mg.api_tokens.create("tenant-admin", "acme")
        revoked, info = await mg.api_tokens.create("sender", "acme")
        await mg.api_tokens.revoke(info.id)

        def tries() -> list[int]:
            codes = []
            for user, password in (("acme", "mgt_" + "x" * 43), ("globex", ing.token), ("acme", admin),
                                   ("acme", revoked), ("acme", "")):  # fmt: skip
                with ing.connect() as smtp:
                    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                    codes.append(smtp.docmd("AUTH", "PLAIN " + blob)[0])
            return codes

        def one_connection() -> list[int]:
            with ing.connect() as smtp:  # three tries, then the connection is closed
                blob = base64.b64encode(b"\0acme\0mgt_wrong").decode()
                return [smtp.docmd("AUTH", "PLAIN " + blob)[0] for _ in range(4)]

        assert await in_thread(tries) == [535] * 5
        ing.server.auth_failures.clear()  # five failures from 127.0.0.1 lock it out (test_review_ingress)
        assert await in_thread(one_connection) == [535, 535, 535, 421]
        assert await stored(mg) == []


async def test_a_token_revoked_during_a_session_sends_no_more(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:
        smtp = await in_thread(lambda: ing.connect(login=("acme", ing.token)))
        try:
            [info] = [t for t in await mg.api_tokens.list() if t.role == "sender"]
            await mg.api_tokens.revoke(info.id)
            reply = await in_thread(smtp.docmd, "MAIL", "FROM:<a@acme.example>")
        finally:
            await in_thread(smtp.close)
    assert reply[0] == 535


async def test_a_message_over_the_size_limit_gets_552(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate, max_size=50_000) as ing:
        big = note()
        big.set_content(("x" * 70 + "\n") * 1000)

        def sends() -> tuple[Any, Any, Any]:
            with ing.connect(login=("acme", ing.token)) as smtp:
                # SIZE=… announced: refused at MAIL.
                declared = smtp.docmd("MAIL", "FROM:<a@acme.example> SIZE=60000")
                smtp.rset()
                # Not announced: refused once the data is in.
                smtp.docmd("MAIL", "FROM:<a@acme.example>")
                smtp.docmd("RCPT", "TO:<bob@example.org>")
                data = smtp.data(big.as_bytes(policy=SMTP))
                small = smtp.sendmail("a@acme.example", ["bob@example.org"], note().as_bytes(policy=SMTP))
            return declared, data, small

        declared, data, small = await in_thread(sends)
    assert declared[0] == 552 and data[0] == 552 and small == {}, (declared, data)
    assert len(await stored(mg)) == 1


async def test_sending_disabled_gets_550_5_7_1(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:
        await mg.servers.disable("global")

        def send() -> Any:
            with ing.connect(login=("acme", ing.token)) as smtp:
                smtp.docmd("MAIL", "FROM:<a@acme.example>")
                smtp.docmd("RCPT", "TO:<bob@example.org>")
                return smtp.data(note().as_bytes(policy=SMTP))

        code, reply = await in_thread(send)
    assert code == 550 and reply.startswith(b"5.7.1 ")
    assert await stored(mg) == []


async def test_a_database_that_is_away_gets_451_4_3_0_and_the_same_message_goes_later(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    async with Mailgate.open(f"sqlite:///{tmp_path}/m.db", secret_keys=TEST_KEY) as mg, ingress(mg, certificate) as ing:
        async with mg.db.sessions() as s:
            pages = int((await s.execute(text("PRAGMA page_count"))).scalar_one())

        def full(dbapi_connection: Any, _record: Any) -> None:  # SQLITE_FULL, as on a full disk
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA max_page_count = {pages}")
            cursor.close()

        msg = note()
        msg.set_content(("x" * 70 + "\n") * 3000)  # needs new pages

        def send(smtp: smtplib.SMTP) -> Any:
            smtp.docmd("MAIL", "FROM:<a@acme.example>")
            smtp.docmd("RCPT", "TO:<bob@example.org>")
            return smtp.data(msg.as_bytes(policy=SMTP))

        smtp = await in_thread(lambda: ing.connect(login=("acme", ing.token)))
        try:
            event.listen(mg.db.engine.sync_engine, "connect", full)
            await mg.db.engine.dispose()
            away = await in_thread(send, smtp)
            event.remove(mg.db.engine.sync_engine, "connect", full)
            await mg.db.engine.dispose()
            back = await in_thread(send, smtp)
        finally:
            await in_thread(smtp.close)
        assert away[0] == 451 and away[1].startswith(b"4.3.0 mailgate's database can't be used just now")
        assert b"sqlite" not in away[1].lower()
        assert back[0] == 250
        assert len(await stored(mg)) == 1


async def test_the_per_token_rate_and_the_connection_limit(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate, token_rate=1.0, max_connections=1) as ing:

        def sends() -> tuple[list[int], int]:
            with ing.connect(login=("acme", ing.token)) as smtp:
                codes = []
                for _ in range(3):  # a burst of 2, then the rate
                    codes.append(smtp.docmd("MAIL", "FROM:<a@acme.example>")[0])
                    smtp.rset()
                try:
                    smtplib.SMTP("127.0.0.1", ing.port, timeout=10).close()
                    second = 220
                except smtplib.SMTPConnectError as e:
                    second = e.smtp_code
            return codes, second

        codes, second = await in_thread(sends)
    assert codes == [250, 250, 451] and second == 421


async def test_bad_addresses_and_too_many_recipients(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:

        def session() -> list[int]:
            with ing.connect(login=("acme", ing.token)) as smtp:
                codes = [smtp.docmd("MAIL", "FROM:<not an address>")[0], smtp.docmd("MAIL", "FROM:<a@acme.example>")[0]]
                codes.append(smtp.docmd("RCPT", "TO:<bob@@example.org>")[0])
                replies = [smtp.docmd("RCPT", f"TO:<r{i}@example.org>")[0] for i in range(1001)]
                codes += [replies.count(250), replies[-1]]
            return codes

        assert await in_thread(session) == [553, 250, 553, 1000, 452]


async def test_a_message_mailgate_cannot_send_as_given_gets_554(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:
        raw = b"From: a@acme.example\r\nTo: bob@example.org\r\nSubject: bell \x07 in the subject\r\n\r\nhi\r\n"

        def send() -> Any:
            with ing.connect(login=("acme", ing.token)) as smtp:
                smtp.docmd("MAIL", "FROM:<a@acme.example>")
                smtp.docmd("RCPT", "TO:<bob@example.org>")
                return smtp.data(raw)

        code, reply = await in_thread(send)
    assert code == 554 and reply.startswith(b"5.6.0 subject: contains a control character")
    assert await stored(mg) == []


# ---- parsing -------------------------------------------------------------------------------------------


def test_the_envelope_decides_who_gets_it() -> None:
    raw = (b"From: Ops <ops@acme.example>\r\nTo: bob@example.org, carol@example.org\r\nCc: dan@example.org\r\n"
           b"Bcc: secret@example.org\r\nSubject: x\r\nMessage-ID: <abc@acme.example>\r\n\r\nhi\r\n")  # fmt: skip
    m = from_bytes(raw, ["bob@example.org", "dan@example.org", "eve@example.org"])
    assert [a.address for a in m.to] == ["bob@example.org"]  # carol is not in the envelope
    assert [a.address for a in m.cc] == ["dan@example.org"]
    assert [a.address for a in m.bcc] == ["eve@example.org"]  # the Bcc header is not used
    assert m.message_id == "<abc@acme.example>" and m.from_ is not None and m.from_.name == "Ops"


def test_raw_utf8_headers_are_read_as_utf8() -> None:
    raw = "From: Jörg <jörg@bücher.example>\r\nTo: bob@example.org\r\nSubject: Grüße\r\n\r\nhallo\r\n".encode()
    m = from_bytes(raw, ["bob@example.org"])
    assert m.subject == "Grüße" and m.from_ is not None and m.from_.address == "jörg@bücher.example"


def test_two_from_mailboxes_are_refused() -> None:
    with pytest.raises(MessageError, match="more than one mailbox"):
        from_bytes(b"From: a@x.example, b@x.example\r\nTo: c@example.org\r\n\r\nhi\r\n", ["c@example.org"])


# ---- `mailgate serve --smtp-port`, as the operator runs it ------------------------------------------


def test_serve_with_smtp_port_takes_mail_and_its_worker_delivers_it(
    tmp_path: Path, env: dict[str, str], certificate: tuple[Path, Path]
) -> None:
    from test_serve import Served

    smtp_port = free_port()
    served = Served(tmp_path, env, ["--smtp-port", str(smtp_port), "--smtp-cert", str(certificate[0]),
                                    "--smtp-key", str(certificate[1])])  # fmt: skip
    try:
        assert f"SMTP submission on 127.0.0.1:{smtp_port}" in served.output()
        with serve_in_thread() as peer:
            served.cli("tenants", "add", "acme")
            doc = {
                "from_address": "no-reply@example.com",
                "smtp": {"host": peer.host, "port": peer.port, "security": "none"},
            }
            (tmp_path / "g.json").write_text(json.dumps(doc))
            served.cli("servers", "set", "global", "--file", str(tmp_path / "g.json"))
            token = json.loads(served.cli("tokens", "create", "--role", "sender", "--tenant", "acme", "--json"))[
                "token"
            ]
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
                smtp.starttls(context=ssl.create_default_context(cafile=str(certificate[0])))
                smtp.login("acme", token)
                smtp.send_message(note(Subject="Through the operator's ingress"))
            [got] = peer.wait_for_messages_sync(1, timeout=30)
        assert got.parsed()["Subject"] == "Through the operator's ingress" and got.rcpt_tos == ["bob@example.org"]
    finally:
        assert served.stop() == 0
    assert token not in served.output()


def test_serve_refuses_an_smtp_port_without_a_certificate(tmp_path: Path, env: dict[str, str]) -> None:
    done = subprocess.run([MAILGATE, "serve", "--port", str(free_port()), "--smtp-port", str(free_port())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "needs a TLS certificate: set MAILGATE_SMTP_CERT and MAILGATE_SMTP_KEY" in done.stderr


def test_demo_offers_smtp_submission_on_loopback_with_a_self_signed_certificate(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from test_serve import Served

    served = Served(tmp_path, env, ["--demo"])
    try:
        found = re.search(r"SMTP submission on 127\.0\.0\.1:(\d+) with a self-signed certificate", served.output())
        assert found, served.output()
        with smtplib.SMTP("127.0.0.1", int(found.group(1)), timeout=10) as smtp:
            smtp.ehlo("client.example")
            assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            smtp.starttls(context=context)
            smtp.ehlo("client.example")
            assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
    finally:
        assert served.stop() == 0


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    drop = ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MAILGATE_SECRET_KEYS": TEST_KEY,
            "MAILGATE_POLL_INTERVAL": "0.1"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_line_breaks_hidden_in_encoded_words_are_refused_not_written() -> None:
    for header in ("Subject: =?utf-8?q?Hi=0D=0ABcc:_victim@example.org?=",
                   "X-Campaign: =?utf-8?q?a=0D=0AReply-To:_evil@example.org?=",
                   "From: =?utf-8?q?Ops=0D=0ABcc:_x@example.org?= <ops@acme.example>"):  # fmt: skip
        raw = f"{header}\r\nTo: bob@example.org\r\n\r\nhi\r\n".encode()
        with pytest.raises(MessageError) as refused:
            from_bytes(raw, ["bob@example.org"])
        assert "line break" in str(refused.value) or "control character" in str(refused.value), header
