"""mailgate.client against a real `mailgate serve` process whose worker delivers to a real SMTP
server: sync and async sends with attachments arrive as given; a reply lost after the commit is
retried under the same Idempotency-Key and the message goes out once; 429/503 honour Retry-After
(within a bound); errors carry the API's code and problems."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage

import httpx2
import pytest

from mailgate.client import (
    AsyncClient,
    Client,
    InvalidInput,
    NotFound,
    Submitted,
    TransportFailed,
    Unauthorized,
    Unavailable,
)
from served import Mailgate, served_with_smtp
from test_serve import free_port

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8  # binary, every byte value
LOGO = b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 100


@pytest.fixture(scope="module")
def mailgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailgate]:
    with served_with_smtp(tmp_path_factory.mktemp("serve")) as served:
        yield served


def delivered(mailgate: Mailgate, subject: str, timeout: float = 20) -> list[EmailMessage]:
    """Every message the SMTP server received with `subject`, once at least one has."""
    mailgate.smtp.wait_until_sync(
        lambda: any(m.parsed()["Subject"] == subject for m in mailgate.smtp.messages), timeout
    )
    return [p for m in mailgate.smtp.messages if (p := m.parsed())["Subject"] == subject]


def attachments_of(message: EmailMessage) -> dict[str, tuple[str, bytes, str | None]]:
    found = {}
    for part in message.walk():
        name = part.get_filename()
        if name:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found[name] = (part.get_content_type(), payload, part["Content-ID"])
    return found


# ---- a proxy that loses or refuses what it is told to ---------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    idempotency_key: str | None


Rule = Callable[[int], str]  # request number -> "forward" | "lose-reply" | "busy:<retry-after>"


@dataclass
class Proxy:
    upstream: str
    rule: Rule
    seen: list[Seen] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def proxy_for(mailgate: Mailgate) -> Iterator[Callable[[Rule], Proxy]]:
    servers: list[socketserver.ThreadingTCPServer] = []
    clients: list[httpx2.Client] = []

    def start(rule: Rule) -> Proxy:
        proxy = Proxy(mailgate.url, rule)
        upstream = httpx2.Client(base_url=mailgate.url, timeout=10)
        clients.append(upstream)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = self.rfile.readline()
                        if not line:
                            return
                        head += line
                    request_line, *lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = request_line.split(" ", 2)
                    headers = dict(line.split(": ", 1) for line in lines if line)
                    lowered = {k.lower(): v for k, v in headers.items()}
                    body = self.rfile.read(int(lowered.get("content-length", "0")))
                    proxy.seen.append(Seen(method, path, lowered.get("idempotency-key")))
                    what = proxy.rule(len(proxy.seen))
                    if what.startswith("busy:"):
                        reply = b'{"code": "unavailable", "message": "try later"}'
                        self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                         b"Retry-After: " + what[5:].encode() + b"\r\nContent-Length: "
                                         + str(len(reply)).encode() + b"\r\n\r\n" + reply)  # fmt: skip
                        continue
                    forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
                    answer = upstream.request(method, path, headers=forwarded, content=body)
                    if what == "lose-reply":  # the server has answered, so it committed: the reply is lost
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    out = (f"HTTP/1.1 {answer.status_code} {answer.reason_phrase}\r\n"
                           f"Content-Type: {answer.headers.get('content-type', 'application/json')}\r\n"
                           f"Content-Length: {len(answer.content)}\r\n")  # fmt: skip
                    if "location" in answer.headers:
                        out += f"Location: {answer.headers['location']}\r\n"
                    self.wfile.write(out.encode() + b"\r\n" + answer.content)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
        return proxy

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for client in clients:
        client.close()


# ---- sending --------------------------------------------------------------------------------------


def test_send_delivers_text_html_and_attachments_to_the_smtp_server(mailgate: Mailgate) -> None:
    with Client(mailgate.url, mailgate.sender) as client:
        sent = client.send(
            to=["Bob <bob@example.org>"], cc="carol@example.org", bcc=["dave@example.org"],
            reply_to="help@example.com", subject="Your invoice", text="See attached.",
            html='<p>See attached. <img src="cid:logo"></p>', headers={"X-Campaign": "invoices"},
            attachments=[("invoice.pdf", PDF, "application/pdf"), ("logo.png", LOGO, "image/png", "logo")],
        )  # fmt: skip
        assert isinstance(sent, Submitted) and sent.id >= 1 and sent.tenant == "acme"
        assert sent.status == "queued" and not sent.replayed and sent.idempotency_key.startswith("mgc-")
        [message] = delivered(mailgate, "Your invoice")
        assert message["To"] == "Bob <bob@example.org>" and message["Cc"] == "carol@example.org"
        assert message["Bcc"] is None and message["Reply-To"] == "help@example.com"
        assert message["X-Campaign"] == "invoices" and message["From"] == "no-reply@example.com"
        body = message.get_body(("plain",))
        assert body is not None and body.get_content().strip() == "See attached."
        assert attachments_of(message) == {
            "invoice.pdf": ("application/pdf", PDF, None),
            "logo.png": ("image/png", LOGO, "<logo>"),
        }
        [received] = [m for m in mailgate.smtp.messages if m.parsed()["Subject"] == "Your invoice"]
        assert sorted(received.rcpt_tos) == ["bob@example.org", "carol@example.org", "dave@example.org"]
        deadline = time.monotonic() + 20
        while (status := client.get(sent.id)["status"]) != "sent":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)


async def test_async_client_sends_and_reads(mailgate: Mailgate) -> None:
    async with AsyncClient(mailgate.url, mailgate.sender) as client:
        sent = await client.send(to="erin@example.org", subject="Async hello", text="hi",
                                 attachments=[("notes.txt", "ünïcode\n".encode(), "text/plain")])  # fmt: skip
        again = await client.send(to="erin@example.org", subject="Async hello", text="hi",
                                  idempotency_key=sent.idempotency_key)  # fmt: skip
        assert again.replayed and again.id == sent.id  # the first message's answer; nothing new stored
        [message] = delivered(mailgate, "Async hello")
        assert attachments_of(message)["notes.txt"][1] == "ünïcode\n".encode()
        assert (await client.get(sent.id))["id"] == sent.id
        time.sleep(0.5)
        assert len(delivered(mailgate, "Async hello")) == 1


# ---- retries and idempotency --------------------------------------------------------------------


def test_a_reply_lost_after_the_commit_is_retried_and_the_message_is_sent_once(
    mailgate: Mailgate, proxy_for: Callable[[Rule], Proxy]
) -> None:
    proxy = proxy_for(lambda n: "lose-reply" if n == 1 else "forward")
    with Client(proxy.url, mailgate.sender, retries=2) as client:
        sent = client.send(to="frank@example.org", subject="Lost reply", text="once")
    assert [(s.method, s.path) for s in proxy.seen] == [("POST", "/v1/messages")] * 2
    assert proxy.seen[0].idempotency_key == proxy.seen[1].idempotency_key == sent.idempotency_key
    assert sent.replayed  # the server had stored it the first time: the retry got that message back
    delivered(mailgate, "Lost reply")
    time.sleep(1)  # the worker polls every 0.1 s: a second message would be out by now
    assert len(delivered(mailgate, "Lost reply")) == 1


async def test_the_async_client_retries_a_lost_reply_under_the_same_key(
    mailgate: Mailgate, proxy_for: Callable[[Rule], Proxy]
) -> None:
    proxy = proxy_for(lambda n: "lose-reply" if n == 1 else "forward")
    async with AsyncClient(proxy.url, mailgate.sender, retries=1) as client:
        sent = await client.send(to="frank@example.org", subject="Lost async reply", text="once",
                                 idempotency_key="order-1234-shipped")  # fmt: skip
    assert [s.idempotency_key for s in proxy.seen] == ["order-1234-shipped"] * 2 and sent.replayed
    delivered(mailgate, "Lost async reply")
    time.sleep(1)
    assert len(delivered(mailgate, "Lost async reply")) == 1


def test_503_with_retry_after_is_waited_for_then_sent(mailgate: Mailgate, proxy_for: Callable[[Rule], Proxy]) -> None:
    proxy = proxy_for(lambda n: "busy:1" if n == 1 else "forward")
    with Client(proxy.url, mailgate.sender) as client:
        started = time.monotonic()
        sent = client.send(to="grace@example.org", subject="After a 503", text="later")
        waited = time.monotonic() - started
    assert waited >= 1.0 and len(proxy.seen) == 2 and not sent.replayed
    assert len(delivered(mailgate, "After a 503")) == 1


def test_a_retry_after_beyond_the_bound_raises_at_once(mailgate: Mailgate, proxy_for: Callable[[Rule], Proxy]) -> None:
    proxy = proxy_for(lambda n: "busy:3600")
    with Client(proxy.url, mailgate.sender, max_retry_after=5) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            client.send(to="heidi@example.org", subject="Never", text="no")
    assert time.monotonic() - started < 2 and len(proxy.seen) == 1
    assert raised.value.status == 503 and raised.value.retry_after == 3600 and raised.value.code == "unavailable"


def test_503_on_every_attempt_gives_up_after_the_retries(
    mailgate: Mailgate, proxy_for: Callable[[Rule], Proxy]
) -> None:
    proxy = proxy_for(lambda n: "busy:0")
    with Client(proxy.url, mailgate.sender, retries=2) as client, pytest.raises(Unavailable):
        client.send(to="heidi@example.org", subject="Never", text="no")
    assert len(proxy.seen) == 3 and len({s.idempotency_key for s in proxy.seen}) == 1


def test_nobody_listening_is_retried_then_transport_failed() -> None:
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{free_port()}", "mgt_x", retries=2) as client:
        with pytest.raises(TransportFailed) as raised:
            client.get(1)
    assert raised.value.status is None and "ConnectError" in raised.value.message
    assert time.monotonic() - started < 5  # backoff 0.25 s, then 0.5 s at most (full jitter)


# ---- errors -------------------------------------------------------------------------------------


def test_invalid_input_carries_every_problem(mailgate: Mailgate) -> None:
    with Client(mailgate.url, mailgate.sender) as client:
        with pytest.raises(InvalidInput) as raised:
            client.send(to=["not an address"], subject="two\nlines", text="x")
    problems = dict(raised.value.problems)
    assert raised.value.status == 422 and raised.value.code == "invalid_input"
    assert "to[0]" in problems and "subject" in problems


def test_bad_token_and_other_tenants_message(mailgate: Mailgate) -> None:
    with Client(mailgate.url, "mgt_not-a-token") as client, pytest.raises(Unauthorized) as raised:
        client.send(to="bob@example.org", subject="s", text="x")
    assert raised.value.status == 401 and raised.value.code == "unauthorized"
    with Client(mailgate.url, mailgate.sender) as client, pytest.raises(NotFound):
        client.get(999_999)
