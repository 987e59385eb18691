"""The SMTP submission ingress against untrusted senders: connections per client address, time to
authenticate, and a message's MIME parts and header fields bounded and parsed off the event loop.
Real clients (smtplib) on 127.0.0.1, as in test_ingress."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailgate import Mailgate
from mailgate.ingress import from_bytes, self_signed
from test_ingress import in_thread, ingress, note, stored

ADDRESS_LIMIT = 10


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


def plain(user: str, token: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{token}".encode()).decode()


# ---- 1. connections from one client address -----------------------------------------------------


async def test_an_eleventh_connection_from_one_address_gets_421_at_the_greeting(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    async with ingress(mg, certificate) as ing:  # max_connections stays 100

        def connections() -> tuple[int, bytes, int]:
            with contextlib.ExitStack() as open_ones:
                held = [open_ones.enter_context(smtplib.SMTP("127.0.0.1", ing.port, timeout=10))
                        for _ in range(ADDRESS_LIMIT)]  # fmt: skip
                try:
                    smtplib.SMTP("127.0.0.1", ing.port, timeout=10).close()
                    refused = (220, b"")
                except smtplib.SMTPConnectError as e:
                    refused = (e.smtp_code, e.smtp_error)
                held[0].quit()
                # Taken again once the server has seen one of them go (bounded: 100 × 0.05 s).
                for _ in range(100):
                    try:
                        with smtplib.SMTP("127.0.0.1", ing.port, timeout=10) as again:
                            return refused[0], refused[1], again.noop()[0]
                    except smtplib.SMTPConnectError:
                        time.sleep(0.05)
                return refused[0], refused[1], 421

        code, text, after_one_left = await in_thread(connections)
    assert code == 421 and text.startswith(b"4.7.0 Too many connections from your address")
    assert after_one_left == 250


def test_connections_are_counted_by_ipv4_address_and_by_ipv6_64() -> None:
    from mailgate.ingress import client_address

    assert client_address(("2001:db8:1:2::1", 50000, 0, 0)) == client_address(("2001:db8:1:2:ffff::9", 1, 0, 0))
    assert client_address(("2001:db8:1:2::1", 50000, 0, 0)) != client_address(("2001:db8:1:3::1", 50000, 0, 0))
    assert client_address(("::ffff:192.0.2.7", 25, 0, 0)) == client_address(("192.0.2.7", 26)) == "192.0.2.7"
    assert client_address(("192.0.2.7", 25)) != client_address(("192.0.2.8", 25))


# ---- 2. time to authenticate ---------------------------------------------------------------------


async def test_a_connection_that_does_not_authenticate_in_time_gets_421_and_is_closed(
    mg: Mailgate, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailgate.ingress.AUTH_DEADLINE", 2.0, raising=False)
    async with ingress(mg, certificate) as ing:

        def sessions() -> tuple[tuple[int, bytes], tuple[int, bytes], bool, int]:
            with ing.connect(login=("acme", ing.token)) as signed_in, contextlib.ExitStack() as idle:
                idle_tls = idle.enter_context(contextlib.closing(ing.connect()))  # EHLO, STARTTLS, EHLO, no more
                idle_clear = idle.enter_context(contextlib.closing(smtplib.SMTP("127.0.0.1", ing.port, timeout=10)))
                told_tls, told_clear = idle_tls.getreply(), idle_clear.getreply()
                closed = idle_clear.sock is not None and idle_clear.sock.recv(1) == b""
                # Connected before the other two, so past the deadline as well: authenticated, it stays.
                return told_tls, told_clear, closed, signed_in.noop()[0]

        told_tls, told_clear, closed, noop = await in_thread(sessions)
    assert told_tls[0] == 421 and told_tls[1].startswith(b"4.7.0 Not authenticated within 2 seconds")
    assert told_clear[0] == 421 and closed
    assert noop == 250


# ---- 6. a message's MIME parts and header fields -------------------------------------------------------


def _chain(depth: int, tag: bytes) -> bytes:
    """A multipart nested `depth` deep around one text part: one part for the message, `depth`+1 parts."""
    head = b"".join(b"Content-Type: multipart/mixed; boundary=%s%d\r\n\r\n--%s%d\r\n" % (tag, i, tag, i)
                    for i in range(depth))  # fmt: skip
    tail = b"".join(b"\r\n--%s%d--\r\n" % (tag, i) for i in reversed(range(depth)))
    return head + b"Content-Type: text/plain\r\n\r\nhi" + tail


TOP = b"From: a@acme.example\r\nTo: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"


async def test_more_than_500_mime_parts_or_5000_header_fields_get_554(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    # Two chains of 260 multiparts: 524 parts, but one body and one attachment (under message.py's bounds).
    parts = (TOP + b"Content-Type: multipart/mixed; boundary=top\r\n\r\n--top\r\n" + _chain(260, b"a")
             + b"\r\n--top\r\n" + _chain(260, b"c") + b"\r\n--top--\r\n")  # fmt: skip
    received = TOP + b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 5_001 + b"\r\nhi\r\n"
    in_a_part = (TOP + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
                 + b"X-A: 1\r\n" * 5_001 + b"\r\nhi\r\n--b--\r\n")  # fmt: skip
    fine = TOP + b"Content-Type: multipart/mixed; boundary=top\r\n\r\n--top\r\n" + _chain(200, b"a") + b"\r\n--top--"
    async with ingress(mg, certificate) as ing:

        def sends() -> list[tuple[int, bytes]]:
            replies = []
            with ing.connect(login=("acme", ing.token)) as smtp:
                for raw in (parts, received, in_a_part, fine):
                    smtp.docmd("MAIL", "FROM:<a@acme.example>")
                    smtp.docmd("RCPT", "TO:<bob@example.org>")
                    replies.append(smtp.data(raw))
            return replies

        replies = await in_thread(sends)
        assert replies[0] == (554, b"5.6.0 message: has more than 500 MIME parts"), replies[0]
        assert replies[1] == (554, b"5.6.0 message: has more than 5,000 header fields"), replies[1]
        assert replies[2] == (554, b"5.6.0 message: has more than 5,000 header fields"), replies[2]
        assert replies[3][0] == 250, replies[3]
        assert len(await stored(mg)) == 1


class _HeldParses(ThreadPoolExecutor):
    """The loop's executor, holding a message's parse (asyncio.to_thread of from_bytes) until told."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self.parsing, self.go = threading.Event(), threading.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if from_bytes in getattr(fn, "args", ()):  # to_thread submits partial(context.run, from_bytes, …)

            def held() -> Any:
                self.parsing.set()
                self.go.wait(30)
                return fn(*args, **kwargs)

            return super().submit(held)
        return super().submit(fn, *args, **kwargs)


async def test_a_message_is_parsed_off_the_event_loop_while_other_clients_are_answered(
    mg: Mailgate, certificate: tuple[Path, Path]
) -> None:
    executor = _HeldParses()
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        async with ingress(mg, certificate) as ing:

            def send() -> dict[str, Any]:
                with ing.connect(login=("acme", ing.token)) as smtp:
                    return smtp.send_message(note())

            sending = asyncio.ensure_future(in_thread(send))
            for _ in range(500):  # bounded: 500 × 0.02 s
                if executor.parsing.is_set() or sending.done():
                    break
                await asyncio.sleep(0.02)
            assert executor.parsing.is_set(), "the message was not parsed in the loop's executor"

            def another_client() -> int:
                with smtplib.SMTP("127.0.0.1", ing.port, timeout=10) as smtp:
                    return smtp.noop()[0]

            assert await in_thread(another_client) == 250  # answered while the message is being parsed
            executor.go.set()
            assert await sending == {}
        assert len(await stored(mg)) == 1
    finally:
        executor.go.set()
