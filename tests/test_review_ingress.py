"""The SMTP submission ingress against untrusted senders: a message's MIME parts and header fields
bounded and parsed off the event loop. Real clients (smtplib) on 127.0.0.1, as in test_ingress."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailgate import Mailgate
from mailgate.ingress import from_bytes, self_signed
from test_ingress import in_thread, ingress, note, stored


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("smtp-cert"))


def plain(user: str, token: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{token}".encode()).decode()


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
