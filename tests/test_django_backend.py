"""mailgate.integrations.django.EmailBackend in a real Django project (tests/django_project/
settings.py, django.setup()): Django's send_mail, EmailMessage and EmailMultiAlternatives go
through a real `mailgate serve` process (over HTTP, or in process into its database) to a real
SMTP server, and arrive with exactly their parts; what mailgate can't carry is refused before
anything is sent."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage as Parsed
from email.mime.image import MIMEImage
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from conftest import TEST_KEY
from served import Mailgate, served_with_smtp

django = pytest.importorskip("django")

from django.core.mail import EmailMessage, EmailMultiAlternatives, get_connection, send_mail  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from mailgate.client import Unauthorized  # noqa: E402
from mailgate.integrations.django import EmailBackend, UnsupportedMessage  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(255, -1, -1)) * 4


@pytest.fixture(scope="module")
def mailgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailgate]:
    with served_with_smtp(tmp_path_factory.mktemp("serve")) as served:
        os.environ["TEST_MAILGATE_URL"], os.environ["TEST_MAILGATE_TOKEN"] = served.url, served.sender
        os.environ["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
        django.setup()
        try:
            yield served
        finally:
            del os.environ["TEST_MAILGATE_URL"], os.environ["TEST_MAILGATE_TOKEN"]


def delivered(mailgate: Mailgate, subject: str, timeout: float = 20) -> list[Parsed]:
    mailgate.smtp.wait_until_sync(
        lambda: any(m.parsed()["Subject"] == subject for m in mailgate.smtp.messages), timeout
    )
    return [p for m in mailgate.smtp.messages if (p := m.parsed())["Subject"] == subject]


def envelope(mailgate: Mailgate, subject: str) -> list[str]:
    [received] = [m for m in mailgate.smtp.messages if m.parsed()["Subject"] == subject]
    return sorted(received.rcpt_tos)


def leaves(message: Parsed) -> list[tuple[str, str | None, str | None, bytes]]:
    """Every single part: (content type, filename, Content-ID, decoded bytes)."""
    out = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append((part.get_content_type(), part.get_filename(), part["Content-ID"], payload))
    return out


def test_send_mail_uses_the_backend_from_the_settings(mailgate: Mailgate) -> None:
    assert isinstance(get_connection(), EmailBackend)
    assert send_mail("Hello from Django", "Plain text.", None, ["bob@example.org"]) == 1
    [message] = delivered(mailgate, "Hello from Django")
    # DEFAULT_FROM_EMAIL is not set: Django's webmaster@localhost is left out for the server's sender.
    assert message["From"] == "no-reply@example.com" and message["To"] == "bob@example.org"
    assert leaves(message) == [("text/plain", None, None, b"Plain text.\r\n")]


def test_multi_alternatives_with_attachments_arrive_exactly(mailgate: Mailgate, tmp_path: Path) -> None:
    report = tmp_path / "report.csv"
    report.write_text("name,total\nacme,3\n")
    email = EmailMultiAlternatives(
        subject="Monthly report", body="Your report is attached.", from_email="Acme Reports <reports@example.com>",
        to=["Bob <bob@example.org>"], cc=["carol@example.org"], bcc=["audit@example.org"],
        reply_to=["Help Desk <help@example.com>"], headers={"X-Campaign": "monthly", "Idempotency-Key": "m-2026-11"},
    )  # fmt: skip
    email.attach_alternative('<p>Your report <img src="cid:logo"></p>', "text/html")
    email.attach("invoice.pdf", PDF, "application/pdf")
    email.attach_file(report)
    logo = MIMEImage(PNG, "png")
    logo.add_header("Content-ID", "<logo>")
    email.attach(logo)
    with get_connection() as connection:
        assert connection.send_messages([email]) == 1
        assert connection.send_messages([email]) == 1  # the same Idempotency-Key: the first message again

    [message] = delivered(mailgate, "Monthly report")
    assert message["From"] == "Acme Reports <reports@example.com>"
    assert message["To"] == "Bob <bob@example.org>" and message["Cc"] == "carol@example.org"
    assert message["Reply-To"] == "Help Desk <help@example.com>" and message["Bcc"] is None
    assert message["X-Campaign"] == "monthly" and message["Idempotency-Key"] is None
    assert envelope(mailgate, "Monthly report") == ["audit@example.org", "bob@example.org", "carol@example.org"]
    assert leaves(message) == [
        ("text/plain", None, None, b"Your report is attached."),
        ("text/html", None, None, b'<p>Your report <img src="cid:logo"></p>'),
        ("image/png", "logo", "<logo>", PNG),
        ("application/pdf", "invoice.pdf", None, PDF),
        ("text/csv", "report.csv", None, b"name,total\nacme,3\n"),
    ]
    time.sleep(0.5)
    assert len(delivered(mailgate, "Monthly report")) == 1


def test_an_html_only_message(mailgate: Mailgate) -> None:
    email = EmailMessage("HTML only", "<h1>Hi</h1>", "news@example.com", ["bob@example.org"])
    email.content_subtype = "html"
    assert email.send() == 1
    [message] = delivered(mailgate, "HTML only")
    assert leaves(message) == [("text/html", None, None, b"<h1>Hi</h1>\r\n")]


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (lambda m: m.attach_alternative("BEGIN:VCALENDAR", "text/calendar"), "alternative of type text/calendar"),
        (lambda m: m.extra_headers.update({"To": "someone-else@example.org"}), "a To header that differs"),
        (lambda m: m.extra_headers.update({"Date": "Mon, 1 Jan 2024 00:00:00 +0000"}), "the header 'Date'"),
        (lambda m: m.attach(MIMEText("x")), "it has no file name"),
        (lambda m: m.attachments.append((None, b"x", "text/plain")), "it has no file name"),
    ],
)
def test_what_mailgate_cannot_carry_is_refused_before_anything_is_sent(
    mailgate: Mailgate, change: Callable[[EmailMultiAlternatives], object], refusal: str
) -> None:
    good = EmailMessage("Refused batch", "first", "news@example.com", ["bob@example.org"])
    bad = EmailMultiAlternatives("Refused batch", "second", "news@example.com", ["bob@example.org"])
    change(bad)
    before = len(mailgate.smtp.messages)
    with pytest.raises(UnsupportedMessage, match=refusal):
        get_connection(fail_silently=True).send_messages([good, bad])
    time.sleep(0.5)
    assert len(mailgate.smtp.messages) == before


def test_fail_silently_counts_what_was_not_taken(mailgate: Mailgate) -> None:
    email = EmailMessage("Bad token", "x", "news@example.com", ["bob@example.org"])
    assert get_connection(token="mgt_not-a-token", fail_silently=True).send_messages([email]) == 0
    with pytest.raises(Unauthorized):
        get_connection(token="mgt_not-a-token").send_messages([email])
    nobody = EmailMessage("Nobody", "x", "news@example.com", [])
    assert get_connection().send_messages([nobody]) == 0  # as Django's own backends: nothing to send


def test_in_process_into_the_outbox_of_the_same_database(mailgate: Mailgate) -> None:
    database = f"sqlite:///{mailgate.process.cwd / 'mailgate.db'}"
    with override_settings(MAILGATE_URL=None, MAILGATE_TOKEN=None, MAILGATE_DATABASE_URL=database,
                           MAILGATE_TENANT="acme", MAILGATE_SECRET_KEYS=TEST_KEY):  # fmt: skip
        email = EmailMultiAlternatives("In process", "text", "news@example.com", ["ivan@example.org"])
        email.attach_alternative("<b>html</b>", "text/html")
        email.attach("data.bin", PNG, "application/octet-stream")
        assert email.send() == 1
        # From other threads too, one of them running its own event loop (asyncio.run would refuse there).
        results: list[int] = []

        def in_a_loop() -> None:
            import asyncio

            async def main() -> None:
                results.append(send_mail("In process, in a loop", "x", None, ["judy@example.org"]))

            asyncio.run(main())

        thread = threading.Thread(target=in_a_loop)
        thread.start()
        thread.join(30)
        assert results == [1]
    [message] = delivered(mailgate, "In process")  # the serve process's worker delivered it
    assert leaves(message)[1:] == [("text/html", None, None, b"<b>html</b>"),
                                   ("application/octet-stream", "data.bin", None, PNG)]  # fmt: skip
    assert delivered(mailgate, "In process, in a loop")[0]["To"] == "judy@example.org"


def test_settings_that_name_no_mailgate_are_refused(mailgate: Mailgate) -> None:
    with override_settings(MAILGATE_URL=None, MAILGATE_TOKEN=None):
        with pytest.raises(ValueError, match="set MAILGATE_URL and MAILGATE_TOKEN"):
            get_connection()
    with override_settings(MAILGATE_URL=None, MAILGATE_DATABASE_URL="sqlite:///x.db"):
        with pytest.raises(ValueError, match="needs MAILGATE_TENANT"):
            get_connection()
