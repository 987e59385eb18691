"""Django's e-mail through mailgate: `EMAIL_BACKEND = "mailgate.integrations.django.EmailBackend"`.

Two ways to reach mailgate, chosen by the settings:

- over its HTTP API (`MAILGATE_URL`, `MAILGATE_TOKEN`; `MAILGATE_TENANT` with a system-admin
  token), through `mailgate.client` with its retries and idempotency keys;
- in process (`MAILGATE_DATABASE_URL`, `MAILGATE_TENANT`, `MAILGATE_SECRET_KEYS` unless SQLite's
  key file is beside the database): the message goes straight into the outbox of that database,
  and a `mailgate worker` (or `mailgate serve`) delivers it.

In process, mailgate's async service runs on one event loop in a daemon thread of its own, opened
once per process (and again in a forked child): Django's backend is sync and may be called from
any thread — a request thread, a Celery task, a sync_to_async worker, or a thread whose own loop
is running (where asyncio.run would refuse) — and every call hands its coroutine to that loop
and waits. One open service also keeps the database pool, the group commit and the resolution
cache warm, where opening mailgate per message would check the schema and load keys every time.

Every message is converted before any is sent: what mailgate can't carry exactly (an alternative
other than one text/html, a To or Cc header that differs from the recipients, a Date or MIME
header, a multipart attachment…) raises UnsupportedMessage, even with `fail_silently`, as
Django's own backends raise for a message they can't build. A header `Idempotency-Key` in
`extra_headers` is taken out and used as the submit's key: a task that sends again after a crash
sends once. Django's default sender (`webmaster@localhost`, when DEFAULT_FROM_EMAIL is not set)
is left out, so the mail server's sender address is used.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from email.message import Message as MIMEMessage
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

try:
    from django.conf import settings
    from django.core.mail.backends.base import BaseEmailBackend
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("mailgate.integrations.django needs Django: pip install 'mailgate[django]'") from e

from ..message import FORBIDDEN_HEADERS, with_charset

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from ..client import Client
    from ..service import Mailgate

__all__ = ["EmailBackend", "UnsupportedMessage"]

log = logging.getLogger("mailgate.django")
IN_PROCESS_TIMEOUT = 60.0  # seconds a send waits for the outbox's commit
_T = TypeVar("_T")


class UnsupportedMessage(ValueError):
    """A Django message mailgate can't send exactly as Django would have built it."""


@dataclass
class Converted:
    """A Django message in mailgate's terms: the fields of `POST /v1/messages` (and of Message)."""

    from_: str | None
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[tuple[str, bytes, str, str | None]] = field(default_factory=list)
    message_id: str | None = None
    idempotency_key: str | None = None


def _addresses(header: str) -> list[str]:
    """Addresses of a header's text, each as mailgate reads one ('"Name" <addr>')."""
    out = []
    for name, address in getaddresses([header]):
        if name:
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'"{quoted}" <{address}>')
        else:
            out.append(address)
    return out


def _same_addresses(header: str, values: Sequence[str]) -> bool:
    return [a.lower() for _, a in getaddresses([header])] == [a.lower() for _, a in getaddresses(list(values))]


def convert(email: EmailMessage) -> Converted:
    """`email` as mailgate sends it, or UnsupportedMessage saying what it can't carry."""
    extra = {str(k): str(v) for k, v in (email.extra_headers or {}).items()}
    lowered = {k.lower(): k for k in extra}
    problems: list[str] = []

    from_header = extra.pop(lowered.get("from", ""), None)
    from_: str | None = from_header or str(email.from_email)
    if (
        from_header is None
        and not settings.is_overridden("DEFAULT_FROM_EMAIL")
        and from_ == settings.DEFAULT_FROM_EMAIL
    ):
        from_ = None  # Django's placeholder, not a sender: the mail server's sender address is used
    to, cc, bcc = ([str(a) for a in values] for values in (email.to, email.cc, email.bcc))
    for name, listed in (("To", to), ("Cc", cc)):
        shown = extra.pop(lowered.get(name.lower(), ""), None)
        if shown is not None and not _same_addresses(shown, listed):
            problems.append(f"a {name} header that differs from the message's {name.lower()} recipients (mailgate "
                            f"writes {name} from the recipients)")  # fmt: skip
    reply_header = extra.pop(lowered.get("reply-to", ""), None)
    reply_to = _addresses(reply_header) if reply_header is not None else [str(a) for a in email.reply_to]
    message_id = extra.pop(lowered.get("message-id", ""), None)
    key = extra.pop(lowered.get("idempotency-key", ""), None)
    for name in extra:
        if name.lower() in FORBIDDEN_HEADERS:
            problems.append(f"the header {name!r} (mailgate sets it itself)")

    body = str(email.body) if email.body is not None else ""
    alternatives = list(getattr(email, "alternatives", None) or [])
    html: str | None = None
    text: str | None = None
    if email.content_subtype == "html":
        html = body
    elif email.content_subtype == "plain":
        # Django leaves an empty body out when there are alternatives or attachments.
        text = body if body or not (alternatives or email.attachments) else None
    else:
        problems.append(f"a body of type text/{email.content_subtype} (mailgate sends text/plain and text/html)")
    for content, mimetype in alternatives:
        if mimetype != "text/html" or html is not None:
            problems.append(f"an alternative of type {mimetype} (mailgate carries one text/html alternative)")
            continue
        html = content.decode() if isinstance(content, bytes) else str(content)

    attachments = []
    for i, attachment in enumerate(email.attachments):
        try:
            attachments.append(_attachment(attachment, email.encoding))
        except UnsupportedMessage as e:
            problems.append(f"attachment {i + 1}: {e}")
    if problems:
        raise UnsupportedMessage("mailgate can't send this message exactly: " + "; ".join(problems))
    return Converted(from_, to, cc, bcc, reply_to, str(email.subject), text, html, extra, attachments, message_id, key)


def _attachment(attachment: Any, encoding: str | None = None) -> tuple[str, bytes, str, str | None]:
    if isinstance(attachment, MIMEMessage):
        return _mime_attachment(attachment)
    filename, content, mimetype = attachment
    if not filename:
        raise UnsupportedMessage("it has no file name (mailgate names every attachment)")
    mimetype = str(mimetype)
    if mimetype == "message/rfc822":
        data = _message_bytes(content)
    elif isinstance(content, str) and mimetype.startswith("text/"):
        # As Django writes a text attachment: in the message's encoding, else DEFAULT_CHARSET,
        # and labelled so; UTF-8 when that encoding can't hold the text.
        charset = encoding or settings.DEFAULT_CHARSET or "utf-8"
        try:
            data = content.encode(charset)
        except (LookupError, UnicodeEncodeError):
            charset, data = "utf-8", content.encode("utf-8")
        mimetype = with_charset(mimetype, charset)
    elif isinstance(content, str):
        data = content.encode("utf-8")
    else:
        data = bytes(content)
    return str(filename), data, mimetype, None


def _message_bytes(content: Any) -> bytes:
    from django.core.mail import EmailMessage

    if isinstance(content, EmailMessage):
        content = content.message()
    if isinstance(content, MIMEMessage):
        return content.as_bytes()
    return content.encode("utf-8") if isinstance(content, str) else bytes(content)


def _mime_attachment(part: MIMEMessage) -> tuple[str, bytes, str, str | None]:
    content_type = part.get_content_type()
    cid = part.get("Content-ID")
    content_id = str(cid).strip().strip("<>") if cid is not None else None
    if content_type == "message/rfc822":
        payload = part.get_payload()
        data = _message_bytes(payload[0] if isinstance(payload, list) and payload else payload)
    elif part.is_multipart():
        raise UnsupportedMessage(f"a {content_type} part (mailgate attaches single files)")
    else:
        decoded = part.get_payload(decode=True)
        data = decoded if isinstance(decoded, bytes) else b""
    filename = part.get_filename() or content_id  # an inline image is often named only by its Content-ID
    if not filename:
        raise UnsupportedMessage("it has no file name (mailgate names every attachment)")
    return filename, data, with_charset(content_type, part.get_content_charset()), content_id


# ---- in process ------------------------------------------------------------------------------------


class _InProcess:
    """One event loop in a daemon thread and one open Mailgate on it, per database and process."""

    _lock = threading.Lock()
    _running: ClassVar[dict[tuple[str, str | None], _InProcess]] = {}

    @classmethod
    def of(cls, url: str, secret_keys: str | None) -> _InProcess:
        with cls._lock:
            runner = cls._running.get((url, secret_keys))
            if runner is None or runner.pid != os.getpid():  # a forked child has no such thread
                runner = cls._running[(url, secret_keys)] = cls(url, secret_keys)
            return runner

    def __init__(self, url: str, secret_keys: str | None) -> None:
        self.url, self.secret_keys, self.pid = url, secret_keys, os.getpid()
        self.loop = asyncio.new_event_loop()
        self._opening: asyncio.Task[Mailgate] | None = None
        threading.Thread(target=self.loop.run_forever, name="mailgate-django", daemon=True).start()
        atexit.register(self._close)

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(IN_PROCESS_TIMEOUT)

    async def service(self) -> Mailgate:
        # Runs on the loop: no await between the check and the set, so it opens once.
        if self._opening is None:
            from ..service import Mailgate

            self._opening = asyncio.ensure_future(Mailgate.open(self.url, secret_keys=self.secret_keys, actor="django"))
        opening = self._opening
        try:
            return await opening
        except BaseException:
            if self._opening is opening:
                self._opening = None  # the next send tries again
            raise

    async def submit(self, tenant: str, message: Converted) -> int:
        from ..message import Attachment, Message

        files = [Attachment(name, kind, data, cid) for name, data, kind, cid in message.attachments]
        built = Message(
            from_=message.from_, to=message.to, cc=message.cc, bcc=message.bcc, reply_to=message.reply_to,
            subject=message.subject, text=message.text, html=message.html, headers=message.headers,
            attachments=files, message_id=message.message_id,
        )  # fmt: skip
        return await (await self.service()).submit(tenant, built, idempotency_key=message.idempotency_key)

    def _close(self) -> None:
        async def close() -> None:
            opening = self._opening
            if opening is not None and opening.done() and not opening.cancelled() and opening.exception() is None:
                await opening.result().aclose()

        if self.pid == os.getpid() and self.loop.is_running():
            try:
                self.run(close())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)


# ---- the backend ----------------------------------------------------------------------------------


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]  # Django is untyped
    """Sends Django's EmailMessage and EmailMultiAlternatives through mailgate. The settings (each
    also a keyword argument of `get_connection`, in lower case without MAILGATE_): MAILGATE_URL and
    MAILGATE_TOKEN, or MAILGATE_DATABASE_URL; MAILGATE_TENANT; MAILGATE_SECRET_KEYS (in process);
    MAILGATE_TIMEOUT and MAILGATE_RETRIES (HTTP)."""

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        url: str | None = None,
        token: str | None = None,
        tenant: str | None = None,
        database_url: str | None = None,
        secret_keys: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)

        def setting(name: str, given: Any) -> Any:
            return given if given is not None else getattr(settings, f"MAILGATE_{name}", None)

        self.url, self.token = setting("URL", url), setting("TOKEN", token)
        self.tenant = setting("TENANT", tenant)
        self.database_url, self.secret_keys = setting("DATABASE_URL", database_url), setting("SECRET_KEYS", secret_keys)
        self.timeout = float(setting("TIMEOUT", timeout) or 10.0)
        retried = setting("RETRIES", retries)
        self.retries = 3 if retried is None else int(retried)
        if self.url and self.database_url:
            raise ValueError("set MAILGATE_URL (with MAILGATE_TOKEN) or MAILGATE_DATABASE_URL, not both")
        if self.url and not self.token:
            raise ValueError("MAILGATE_URL needs MAILGATE_TOKEN: a sender token of the tenant (mailgate tokens create)")
        if not self.url and not self.database_url:
            raise ValueError("set MAILGATE_URL and MAILGATE_TOKEN (over HTTP) or MAILGATE_DATABASE_URL (in process)")
        if self.database_url and not self.tenant:
            raise ValueError("MAILGATE_DATABASE_URL needs MAILGATE_TENANT: the tenant the messages are sent for")
        self._client: Client | None = None
        self._lock = threading.Lock()

    def open(self) -> bool:
        """Make the HTTP client (True when this call made it); in process there is nothing to open."""
        if self.database_url or self._client is not None:
            return False
        from ..client import Client

        self._client = Client(self.url, self.token, timeout=self.timeout, retries=self.retries)
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Submit each message with recipients to mailgate's outbox; the number submitted."""
        converted = [convert(m) for m in email_messages if m.recipients()]  # every refusal before any send
        if not converted:
            return 0
        with self._lock:
            made = self.open()
            try:
                return sum(self._send(m) for m in converted)
            finally:
                if made:
                    self.close()

    def _send(self, message: Converted) -> bool:
        try:
            if self.database_url:
                runner = _InProcess.of(self.database_url, self.secret_keys)
                runner.run(runner.submit(self.tenant, message))
            else:
                assert self._client is not None
                self._client.send(
                    to=message.to, cc=message.cc, bcc=message.bcc, reply_to=message.reply_to, from_=message.from_,
                    subject=message.subject, text=message.text, html=message.html, headers=message.headers,
                    attachments=message.attachments, tenant=self.tenant, message_id=message.message_id,
                    idempotency_key=message.idempotency_key,
                )  # fmt: skip
        except Exception as e:
            if not self.fail_silently:
                raise
            # The type and the API's code only: an error's text may quote the message's content.
            log.warning("mailgate did not take a message: %s %s", type(e).__name__, getattr(e, "code", ""))
            return False
        return True
