"""The SMTP submission ingress, second review: MIME parts or a header's comments nested too deep,
a TLS handshake that never completes, and AUTH mechanism names in lower case. Real clients (smtplib, raw sockets) on
127.0.0.1, as in test_ingress."""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mailgate import Mailgate
from mailgate.ingress import self_signed
from test_ingress import in_thread, ingress, stored
from test_review_ingress import TOP, _chain


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


# ---- 1. MIME parts nested too deep ---------------------------------------------------------------------


def _forwarded(depth: int) -> bytes:
    """A message/rfc822 part inside a message/rfc822 part, `depth` of them around one text part."""
    return b"Content-Type: message/rfc822\r\n\r\n" * depth + b"Content-Type: text/plain\r\n\r\nhi\r\n"


def _one_session(ing: Any, messages: list[bytes]) -> tuple[list[tuple[int, bytes]], int]:
    """Each message sent in one authenticated session: the DATA replies, and then NOOP's code."""
    replies = []
    with ing.connect(login=("acme", ing.token)) as smtp:
        for raw in messages:
            smtp.docmd("MAIL", "FROM:<a@acme.example>")
            smtp.docmd("RCPT", "TO:<bob@example.org>")
            replies.append(smtp.data(raw))
        return replies, smtp.noop()[0]


async def test_parts_nested_more_than_20_deep_get_554_and_no_error_is_logged(
    mg: Mailgate, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # The message itself is 0 deep; _chain(n) and _forwarded(n) put a text part n deep.
    too_deep = [TOP + _chain(21, b"a"), TOP + _forwarded(21), TOP + _chain(300, b"b"), TOP + _forwarded(300),
                TOP + _chain(1_000, b"c"), TOP + _chain(5_000, b"d"), TOP + _forwarded(5_000)]  # fmt: skip
    deepest_allowed = [TOP + _chain(20, b"e"), TOP + _forwarded(20)]
    async with ingress(mg, certificate) as ing:
        replies, noop = await in_thread(_one_session, ing, too_deep + deepest_allowed)
        refused = (554, b"5.6.0 message: has MIME parts nested more than 20 deep")
        assert replies[: len(too_deep)] == [refused] * len(too_deep), replies
        assert [code for code, _ in replies[len(too_deep) :]] == [250, 250], replies
        assert noop == 250  # the session goes on
        assert len(await stored(mg)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_header_with_comments_nested_too_deep_gets_554_and_no_error_is_logged(
    mg: Mailgate, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def nested(depth: int) -> bytes:  # folded: a line of DATA is at most 1,000 bytes
        whole, rest = divmod(depth, 500)
        middle = [b"(" * rest + b")" * rest] if rest else []
        return b"\r\n ".join([b"(" * 500] * whole + middle + [b")" * 500] * whole)

    head = b"To: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
    messages = [
        b"From: a@acme.example " + nested(1_000) + b"\r\n" + head + b"\r\nhi\r\n",
        b"From: a@acme.example\r\n" + head + b"Content-Transfer-Encoding: 7bit " + nested(300) + b"\r\n\r\nhi\r\n",
        b"From: a@acme.example\r\n" + head + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        + b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf " + nested(5_000)
        + b"\r\n\r\nhi\r\n--b--\r\n",
        b"From: a@acme.example (a (comment)) \r\n" + head + b"\r\nhi\r\n",  # an ordinary one
    ]  # fmt: skip
    async with ingress(mg, certificate) as ing:
        replies, noop = await in_thread(_one_session, ing, messages)
    refused = (554, b"5.6.0 message: has a header with comments nested too deep to be read")
    assert replies[:3] == [refused] * 3, replies
    assert replies[3][0] == 250 and noop == 250, replies
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- 2. a TLS handshake that never completes ------------------------------------------------------------


def _starttls(port: int, then: bytes = b"") -> bytes:
    """EHLO, STARTTLS and its 220 on a raw socket, then `then` and nothing more: what the server
    sends next, b"" once it has closed the connection (a 10 s socket timeout otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as replies:
        assert replies.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.example\r\n")
        for _ in range(50):  # bounded: the EHLO reply's lines
            if replies.readline()[:4] == b"250 ":
                break
        sock.sendall(b"STARTTLS\r\n")
        assert replies.readline().startswith(b"220 ")
        sock.sendall(then)
        return sock.recv(100)


def _taken_again(port: int) -> int:
    """The reply to NOOP on a new connection, once the server has let the last one go (with
    max_connections_per_address=1, 421 at the greeting until then; bounded: 100 × 0.05 s)."""
    for _ in range(100):
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                return smtp.noop()[0]
        except smtplib.SMTPConnectError:
            time.sleep(0.05)
    return 421


@pytest.mark.parametrize("stalled_by", ["handshake timeout", "auth deadline", "a failed handshake"])
async def test_a_handshake_that_stalls_or_fails_is_closed_and_its_connection_let_go(
    mg: Mailgate,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stalled_by: str,
) -> None:
    caplog.set_level(logging.INFO)
    then = b""
    if stalled_by == "handshake timeout":
        monkeypatch.setattr("mailgate.ingress.TLS_HANDSHAKE_TIMEOUT", 1.0)  # AUTH_DEADLINE stays 30 s
    elif stalled_by == "auth deadline":  # connected, then STARTTLS just before the deadline
        monkeypatch.setattr("mailgate.ingress.AUTH_DEADLINE", 1.0)  # TLS_HANDSHAKE_TIMEOUT stays 10 s
    else:
        then = b"\x16\x03\x01\x00\x05hello" * 4  # not a TLS ClientHello
    async with ingress(mg, certificate, max_connections_per_address=1) as ing:
        after_starttls = await in_thread(_starttls, ing.port, then)
        again = await in_thread(_taken_again, ing.port)
    assert after_starttls == b""  # closed, nothing said in clear
    assert again == 250
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- 3. AUTH mechanism names in lower case ---------------------------------------------------------------


async def test_auth_mechanism_names_are_taken_in_any_case(mg: Mailgate, certificate: tuple[Path, Path]) -> None:
    async with ingress(mg, certificate) as ing:
        blob = base64.b64encode(f"\0acme\0{ing.token}".encode()).decode()

        def sessions() -> list[tuple[int, bytes]]:
            replies = []
            with ing.connect() as smtp:
                replies.append(smtp.docmd("AUTH", "plain " + blob))
            with ing.connect() as smtp:
                replies.append(smtp.docmd("auth", "Plain"))  # 334, then the answer
                replies.append(smtp.docmd(blob))
            with ing.connect() as smtp:
                replies.append(smtp.docmd("AUTH", "login " + base64.b64encode(b"acme").decode()))
                replies.append(smtp.docmd(base64.b64encode(ing.token.encode()).decode()))
            with ing.connect() as smtp:
                replies.append(smtp.docmd("AUTH", "cram-md5"))  # still not offered
            return replies

        replies = await in_thread(sessions)
    assert [code for code, _ in replies] == [235, 334, 235, 334, 235, 504], replies
