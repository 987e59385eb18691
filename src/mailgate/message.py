"""Messages: the model applications build, its validation, its envelope and its MIME bytes.

A `Message` is validated when it is made, so a bad address or an injected header is refused at
the application's call, not minutes later in a worker. `compose()` writes RFC 5322 bytes straight
from the fields (see `_mime`); the result reads back identically through the stdlib parser.
"""

from __future__ import annotations

import codecs
import email.charset
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

from . import _mime
from ._mime import CRLF
from .errors import MessageError

DEFAULT_MAX_SIZE = 35 * 1024 * 1024  # Exchange Online's default maximum message size

# Bounds on every field, so that no submit costs more than a message's worth of work and every
# refusal is one short problem. The HTTP API's schemas use the same numbers.
# To, Cc and Bcc together. Exchange Online takes 500 per message and Gmail 100 over SMTP: the SMTP
# client sends the rest in further transactions when a server answers "too many recipients"
# (452 4.5.3); Graph takes at most 500 in one sendMail.
MAX_RECIPIENTS = 1_000
MAX_REPLY_TO = 100
MAX_NAME_LENGTH = 256  # a display name
MAX_ADDRESS_TEXT = 1_000  # an address as text, display name and all: '"Name" <address>'
MAX_SUBJECT_LENGTH = 1_000
MAX_HEADERS = 100
MAX_HEADER_NAME_LENGTH = 100
MAX_HEADER_VALUE_LENGTH = 2_000
MAX_ATTACHMENTS = 100
MAX_FILENAME_BYTES = 255  # UTF-8; what file systems and mail clients take
MAX_CONTENT_TYPE_LENGTH = 255  # RFC 6838 4.2: type and subtype of at most 127 characters each
MAX_CONTENT_ID_LENGTH = 255
MAX_MESSAGE_ID_LENGTH = 255  # with its angle brackets; the outbox's column holds no more

# Headers that the composer writes from the message's own fields, or that only servers may add.
FORBIDDEN_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Return-Path",
        "Received",
    )
)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ":"
_MIME_TYPE = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
# A MIME type, and at most one parameter: charset (a text file's bytes mean nothing without it).
_CHARSET = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}"  # a charset's name (RFC 2978 names are at most 40 characters)
_CONTENT_TYPE = re.compile(rf'({_MIME_TYPE})(?:[ \t]*;[ \t]*charset=("?)({_CHARSET})\2)?', re.I)
# Codecs Python knows that are no MIME charset a mail client could read.
_NOT_MIME_CHARSETS = frozenset(
    ("idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "charmap", "utf-8-sig", "mbcs", "oem")
)
_CONTENT_ID = re.compile(r"[!-;=?-~]+")  # visible ASCII without "<" and ">"
_MESSAGE_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>|[!-;=?-~]+@[!-;=?-~]+")  # brackets: both or none
_NAME_ADDR = re.compile(r"(.*?)\s*<([^<>]*)>")


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text


# Characters no message may carry. A lone surrogate is not text: UTF-8 can't encode it, so the
# database, the composer and every page showing the message would fail on it long after the
# submit. NUL ends strings in C and PostgreSQL refuses it. Other control characters have no
# business in a mail: a one-line field (subject, display name, header value) keeps only TAB, and
# also refuses DEL, the C1 controls and the Unicode line and paragraph separators (some readers
# break lines there); a text or HTML body keeps TAB, LF, CR and form feed.
_NOT_IN_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NOT_IN_FILENAME = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NOT_IN_BODY = re.compile("[\x00-\x08\x0b\x0e-\x1f\ud800-\udfff]")
_BODY_CONTROLS = bytes([*range(0x09), 0x0B, *range(0x0E, 0x20)])  # _NOT_IN_BODY's controls, as UTF-8 bytes


def forbidden_character(text: str, *, body: bool = False) -> str | None:
    """Why `text` can't be part of a message (its first character that no mail may carry), or
    None. `body`: the rules of a text or HTML body, which may also hold line breaks."""
    if text.isprintable():  # none of them is printable; ~5x quicker than the search
        return None
    if body:
        # A body may be megabytes: its UTF-8 form (which a lone surrogate can't have) without the
        # control bytes is ~6x quicker to check than a regular expression over the text.
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            if len(data.translate(None, _BODY_CONTROLS)) == len(data):
                return None
    found = (_NOT_IN_BODY if body else _NOT_IN_LINE).search(text)
    return None if found is None else _describe(found.group(), found.start())


def _describe(c: str, at: int) -> str:
    code = ord(c)
    if 0xD800 <= code <= 0xDFFF:
        what = "a lone surrogate"
    elif code in (0x2028, 0x2029):
        what = "a Unicode line separator"
    else:
        what = "a control character"
    return f"contains {what} (U+{code:04X}) at position {at}, which no mail may carry"


# The everyday address — an ASCII dot-atom local part, an ASCII host name with a letters-only top
# level — whose normalized form is plain to see: the domain lower-cased. Checked here in ~1 µs
# instead of ~45 µs in email-validator (IDNA and Unicode machinery it doesn't need); anything
# else, and anything under a special-use name, goes to email-validator, which stays the
# authority (tests/test_message.py checks that both give the same answer).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
)
_LOCAL_MAX, _DOMAIN_MAX, _ADDRESS_MAX = 64, 253, 254  # RFC 5321 4.5.3.1, as email-validator counts


def _plain_address(address: str) -> tuple[str, str, str] | None:
    """`_check_address`'s answer for an everyday ASCII address, or None to ask email-validator."""
    local, at, domain = address.rpartition("@")
    if not at or len(local) > _LOCAL_MAX or len(address) > _ADDRESS_MAX or len(domain) > _DOMAIN_MAX:
        return None
    domain = domain.lower()
    if "--" in domain or _special_use(domain) or not _PLAIN_ADDRESS.fullmatch(local + "@" + domain):
        return None
    normalized = local + "@" + domain
    return normalized, normalized, domain


@lru_cache(maxsize=1024)
def _special_use(domain: str) -> bool:
    """Under a special-use or reserved name (email-validator's list), e.g. example.invalid; not
    "test", which `_validated` allows (test_environment)."""
    from email_validator import SPECIAL_USE_DOMAIN_NAMES

    return any(domain == d or domain.endswith("." + d) for d in SPECIAL_USE_DOMAIN_NAMES if d != "test")


@lru_cache(maxsize=8192)
def _check_address(address: str) -> tuple[str, str | None, str]:
    """(normalized address, ASCII form or None when the local part needs SMTPUTF8, ASCII domain).

    Cached: notification mail repeats its senders and many of its recipients.
    """
    plain = _plain_address(address)
    if plain is not None:
        return plain
    return _validated(address)


def _validated(address: str) -> tuple[str, str | None, str]:
    """`_check_address` by email-validator, for any address."""
    from email_validator import EmailNotValidError, validate_email

    why = forbidden_character(address)  # the everyday pattern has none of these; email-validator may
    if why is not None:
        raise ValueError(f"the address {why}")
    try:
        v = validate_email(
            address,
            check_deliverability=False,
            # Notification mail goes through relays to internal domains too ("intranet",
            # "corp.example"); only names that can never receive mail are refused.
            globally_deliverable=False,
            test_environment=True,
        )
    except EmailNotValidError as e:
        raise ValueError(str(e)) from None
    ascii_form = v.ascii_email or (v.local_part + "@" + v.ascii_domain if v.local_part.isascii() else None)
    return v.normalized, ascii_form, v.ascii_domain


class Address:
    """A mailbox: an address and an optional display name.

    `Address("jörg@exämple.de", "Jörg")`, or parsed from `"Jörg <jörg@exämple.de>"`.
    """

    __slots__ = ("address", "ascii_address", "ascii_domain", "name")

    address: str  # normalized: domain lower-cased, Unicode NFC
    name: str
    ascii_address: str | None  # domain as A-labels; None when the local part is not ASCII
    ascii_domain: str

    def __init__(self, address: str, name: str = "") -> None:
        if not isinstance(address, str) or not isinstance(name, str):
            raise ValueError("an address and its display name must be text")
        if _has_line_break(address) or _has_line_break(name):
            raise ValueError("line breaks are not allowed in an address or display name (header injection)")
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"the display name is longer than {MAX_NAME_LENGTH} characters")
        if len(address) > MAX_ADDRESS_TEXT:
            raise ValueError(f"the address is longer than {MAX_ADDRESS_TEXT:,} characters")
        if name and (why := forbidden_character(name)) is not None:
            raise ValueError(f"the display name {why}")
        address = address.strip()
        if not address:
            raise ValueError("the address is empty")
        self.address, self.ascii_address, self.ascii_domain = _check_address(address)
        self.name = name.strip()

    @classmethod
    def parse(cls, value: str | Address) -> Address:
        """An `Address` from `"addr"`, `"Name <addr>"` or `'"Name, Inc." <addr>'`."""
        if isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected an address as text, got {type(value).__name__}")
        if len(value) > MAX_ADDRESS_TEXT:
            raise ValueError(f"an address with its display name is at most {MAX_ADDRESS_TEXT:,} characters")
        if _has_line_break(value):
            raise ValueError("line breaks are not allowed in an address or display name (header injection)")
        m = _NAME_ADDR.fullmatch(value.strip())
        if not m:
            return cls(value)
        name = m.group(1).strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        return cls(m.group(2), name)

    @property
    def requires_smtputf8(self) -> bool:
        return self.ascii_address is None

    def envelope_form(self, utf8: bool) -> str:
        if utf8 or self.ascii_address is None:
            return self.address
        return self.ascii_address

    def header_tokens(self, utf8: bool) -> list[str]:
        addr = self.envelope_form(utf8)
        if not self.name:
            return [addr]
        return [*_mime.phrase(self.name, utf8), f"<{addr}>"]

    def __str__(self) -> str:
        return f'"{self.name}" <{self.address}>' if self.name else self.address

    def __repr__(self) -> str:
        return f"Address({self.address!r}, {self.name!r})" if self.name else f"Address({self.address!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.address, self.name) == (other.address, other.name)

    def __hash__(self) -> int:
        return hash((self.address, self.name))


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file sent with the message. With a `content_id` it is inline: the HTML refers to it as
    `cid:<content_id>` and it travels in multipart/related beside the HTML."""

    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None

    @property
    def inline(self) -> bool:
        return self.content_id is not None


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: who the server hears it is from (MAIL FROM) and who gets it (RCPT TO)."""

    mail_from: str
    rcpt_to: tuple[str, ...]


_now_cache: tuple[int, datetime, str] = (0, datetime.now(UTC), "")


def _now() -> tuple[datetime, str]:
    # format_datetime costs ~5 µs; one format per second serves every message of that second.
    global _now_cache
    t = int(time.time())
    if _now_cache[0] != t:
        dt = datetime.fromtimestamp(t, UTC)
        _now_cache = (t, dt, format_datetime(dt))
    return _now_cache[1], _now_cache[2]


AddressInput = str | Address
AddressesInput = AddressInput | Iterable[AddressInput] | None
HeadersInput = Mapping[str, str] | Sequence[tuple[str, str]] | None


class Message:
    """One notification e-mail. Validated on construction; raises `MessageError` listing every
    problem found (field and explanation). Every field is bounded (the MAX_… numbers above), and
    none may carry a lone surrogate, NUL or another control character (`forbidden_character`).

    `from_` is the From mailbox (the trailing underscore because `from` is a keyword). It may be
    left out: the mail server's sender address then fills it (`with_defaults`), and so does the
    Message-ID's domain. `message_id` and `date` are otherwise fixed at construction, so a
    message composed again for a retry is the same message and duplicates can be recognized.
    A Message-ID mailgate made (`message_id_made`), not one given, follows the From when a mail
    server sends the message as its own address (`in_domain`): same unique part, that domain.
    """

    __slots__ = (
        "_date_header",
        "attachments",
        "bcc",
        "cc",
        "date",
        "from_",
        "headers",
        "html",
        "message_id",
        "message_id_made",
        "reply_to",
        "subject",
        "text",
        "to",
    )

    def __init__(
        self,
        *,
        from_: AddressInput | None = None,
        to: AddressesInput = None,
        cc: AddressesInput = None,
        bcc: AddressesInput = None,
        reply_to: AddressesInput = None,
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        attachments: Iterable[Attachment] = (),
        headers: HeadersInput = None,
        message_id: str | None = None,
        date: datetime | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        problems: list[tuple[str, str]] = []

        def one(field: str, value: AddressInput) -> Address | None:
            try:
                return Address.parse(value)
            except ValueError as e:
                problems.append((field, f"{value!r} is not a valid address: {e}"))
                return None

        def many(field: str, values: list[AddressInput]) -> list[Address]:
            out = []
            for i, v in enumerate(values):
                a = one(f"{field}[{i}]", v)
                if a is not None:
                    out.append(a)
            return out

        sender = one("from", from_) if from_ is not None else None
        # Counted before any is parsed: too many is one problem, not one per address.
        lists = {"to": _listed(to), "cc": _listed(cc), "bcc": _listed(bcc), "reply_to": _listed(reply_to)}
        total = len(lists["to"]) + len(lists["cc"]) + len(lists["bcc"])
        if total > MAX_RECIPIENTS:
            field = max(("to", "cc", "bcc"), key=lambda f: len(lists[f]))
            problems.append((field, f"the message has {total:,} recipients (to, cc and bcc); at most "
                                    f"{MAX_RECIPIENTS:,} may share one message"))  # fmt: skip
            self.to, self.cc, self.bcc = [], [], []
        else:
            self.to, self.cc, self.bcc = many("to", lists["to"]), many("cc", lists["cc"]), many("bcc", lists["bcc"])
            if not total:
                problems.append(("to", "the message has no recipient (to, cc or bcc)"))
        if len(lists["reply_to"]) > MAX_REPLY_TO:
            problems.append(("reply_to", f"has {len(lists['reply_to']):,} addresses; at most {MAX_REPLY_TO}"))
            self.reply_to = []
        else:
            self.reply_to = many("reply_to", lists["reply_to"])

        if not isinstance(subject, str):
            problems.append(("subject", "must be text"))
        elif len(subject) > MAX_SUBJECT_LENGTH:
            problems.append(("subject", f"is {len(subject):,} characters; at most {MAX_SUBJECT_LENGTH:,}"))
        elif _has_line_break(subject):
            problems.append(("subject", "line breaks are not allowed in the subject (header injection)"))
        elif (why := forbidden_character(subject)) is not None:
            problems.append(("subject", why))
        for field, body in (("text", text), ("html", html)):
            if body is not None and not isinstance(body, str):
                problems.append((field, "must be text"))
            elif body is not None and (why := forbidden_character(body, body=True)) is not None:
                problems.append((field, why))
        self.subject, self.text, self.html = subject, text, html

        self.attachments = list(attachments)
        if len(self.attachments) > MAX_ATTACHMENTS:
            problems.append(("attachments", f"has {len(self.attachments):,} files; at most {MAX_ATTACHMENTS}"))
        else:
            for i, att in enumerate(self.attachments):
                problems.extend((f"attachments[{i}].{f}", t) for f, t in _attachment_problems(att))

        self.headers = _check_headers(headers, problems)

        self.message_id_made = message_id is None
        if message_id is None:
            if sender is not None:
                message_id = new_message_id(sender.ascii_domain)
        elif not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
            problems.append(("message_id", "must look like <unique-part@domain>, visible ASCII only"))
        elif not message_id.startswith("<"):
            message_id = f"<{message_id}>"
        if isinstance(message_id, str) and len(message_id) > MAX_MESSAGE_ID_LENGTH:
            problems.append(("message_id", f"is longer than {MAX_MESSAGE_ID_LENGTH} characters with its brackets"))
        self.message_id = message_id

        if date is None:
            self.date, self._date_header = _now()
        elif not isinstance(date, datetime) or date.tzinfo is None:
            problems.append(("date", "must be a datetime with a time zone"))
        else:
            self.date, self._date_header = date, format_datetime(date)

        if not problems:
            size = self.estimated_size()
            if size > max_size:
                problems.append(("size", f"the message would be about {size:,} bytes; the limit is {max_size:,} bytes"))
        if problems:
            raise MessageError(problems)
        self.from_ = sender

    def with_defaults(
        self, *, from_: Address | None = None, reply_to: Sequence[Address] = (), domain: str | None = None
    ) -> Message:
        """A copy with what it leaves out taken from a mail server's settings: the From mailbox,
        Reply-To, and a Message-ID (in `domain`, else the From address's domain)."""
        copy = self._copy()
        if copy.from_ is None:
            copy.from_ = from_
        if not copy.reply_to:
            copy.reply_to = list(reply_to)
        if copy.message_id is None:
            if domain is None and copy.from_ is not None:
                domain = copy.from_.ascii_domain
            if domain is not None:
                copy.message_id = new_message_id(domain)
                copy.message_id_made = True
        return copy

    def in_domain(self, domain: str) -> Message:
        """This message with its Message-ID in `domain` when mailgate made that Message-ID: the
        same unique part, so each attempt sends the same Message-ID. A Message-ID its sender gave
        is kept; so is one that would grow past MAX_MESSAGE_ID_LENGTH."""
        if not self.message_id_made or self.message_id is None:
            return self
        unique = self.message_id[1:-1].rpartition("@")[0]
        moved = f"<{unique}@{domain}>"
        if moved == self.message_id or len(moved) > MAX_MESSAGE_ID_LENGTH:
            return self
        copy = self._copy()
        copy.message_id = moved
        return copy

    def _copy(self) -> Message:
        """A copy to change before anyone sees it (a Message never changes once made)."""
        copy = Message.__new__(Message)
        for slot in Message.__slots__:
            setattr(copy, slot, getattr(self, slot))
        return copy

    def sender(self) -> Address:
        """The From mailbox, or MessageError when the message has none (yet)."""
        if self.from_ is None:
            raise MessageError([("from", "the message has no sender: give one, or let a mail server's fill it")])
        return self.from_

    # ---- stored form -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form without attachment contents (those go apart; see `from_dict`).
        Addresses keep their validated forms, so restoring skips validating them again."""
        return {
            "from": _address_dict(self.from_) if self.from_ is not None else None,
            **{f: [_address_dict(a) for a in getattr(self, f)] for f in ("to", "cc", "bcc", "reply_to")},
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "headers": [list(h) for h in self.headers],
            "message_id": self.message_id,
            "message_id_made": self.message_id_made,
            "date": self.date.isoformat(),
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "content_id": a.content_id}
                for a in self.attachments
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], attachment_data: Sequence[bytes] = ()) -> Message:
        """A message from `to_dict()`'s form, trusted: it was validated before it was stored."""
        m = cls.__new__(cls)
        m.from_ = _address_from(data["from"]) if data["from"] is not None else None
        m.to, m.cc, m.bcc, m.reply_to = ([_address_from(a) for a in data[f]] for f in ("to", "cc", "bcc", "reply_to"))
        m.subject, m.text, m.html = data["subject"], data["text"], data["html"]
        m.headers = [(n, v) for n, v in data["headers"]]
        m.message_id = data["message_id"]
        # Stored before mailgate told its own Message-IDs apart: kept as they are, as before.
        m.message_id_made = bool(data.get("message_id_made", False))
        m.date, m._date_header = _stored_date(data["date"])
        m.attachments = [
            Attachment(a["filename"], a["content_type"], content, a["content_id"])
            for a, content in zip(data["attachments"], attachment_data, strict=True)
        ]
        return m

    # ---- envelope -------------------------------------------------------------------------

    @property
    def recipients(self) -> list[Address]:
        """To, Cc and Bcc in that order, each address once."""
        seen: set[str] = set()
        out = []
        for a in (*self.to, *self.cc, *self.bcc):
            if a.address not in seen:
                seen.add(a.address)
                out.append(a)
        return out

    @property
    def requires_smtputf8(self) -> bool:
        """True when an address has a non-ASCII local part: only SMTPUTF8 servers can take it."""
        senders = () if self.from_ is None else (self.from_,)
        return any(a.requires_smtputf8 for a in (*senders, *self.to, *self.cc, *self.bcc, *self.reply_to))

    def envelope(self, *, utf8: bool = False, mail_from: str | None = None) -> Envelope:
        """The envelope, in ASCII form unless `utf8` (addresses with non-ASCII local parts stay
        Unicode either way; only an SMTPUTF8 server accepts those)."""
        sender = mail_from if mail_from is not None else self.sender().envelope_form(utf8)
        return Envelope(sender, tuple(a.envelope_form(utf8) for a in self.recipients))

    # ---- composition ----------------------------------------------------------------------

    def estimated_size(self) -> int:
        """An upper estimate of the composed size (base64 grows content by 4/3, plus headers)."""
        n = 2048 + len(self.subject) * 4
        for body in (self.text, self.html):
            if body:
                n += len(body) * 4 if not body.isascii() else len(body) + len(body) // 32
        for att in self.attachments:
            n += len(att.data) * 4 // 3 + len(att.data) // 38 + 512
        return n

    def compose(self, *, utf8: bool = False) -> bytes:
        """RFC 5322 bytes with CRLF line ends. `utf8` writes non-ASCII headers as raw UTF-8
        (RFC 6532, only for SMTPUTF8 servers); otherwise they become RFC 2047 encoded words.
        Bcc never appears in the headers."""
        if self.requires_smtputf8:
            utf8 = True
        h = [
            "Date: ",
            self._date_header,
            CRLF,
            _mime.fold("From", self.sender().header_tokens(utf8)),
        ]
        if self.reply_to:
            h.append(_address_list("Reply-To", self.reply_to, utf8))
        if self.to:
            h.append(_address_list("To", self.to, utf8))
        if self.cc:
            h.append(_address_list("Cc", self.cc, utf8))
        h.append(_mime.unstructured("Subject", self.subject, utf8))
        if self.message_id is None:
            raise MessageError([("message_id", "the message has none: give one, or a sender to make it from")])
        h += ["Message-ID: ", self.message_id, CRLF]
        for name, value in self.headers:
            h.append(_mime.unstructured(name, value, utf8, literal=False))
        h.append("MIME-Version: 1.0\r\n")
        part_headers, body = self._body()
        h.append(part_headers)
        h.append(CRLF)
        return "".join(h).encode("utf-8" if utf8 else "ascii") + body

    def _body(self) -> tuple[str, bytes]:
        """(Content-* header lines, body bytes) of the whole MIME tree.

        mixed(alternative(text, related(html, inline…)), attachment…), with every level that has
        a single member collapsed into that member.
        """
        inline = [a for a in self.attachments if a.inline and self.html is not None]
        files = [a for a in self.attachments if not (a.inline and self.html is not None)]
        parts: list[tuple[str, bytes]] = []
        if self.text is not None or self.html is None:
            parts.append(_text_part(self.text or "", "plain"))
        if self.html is not None:
            html = _text_part(self.html, "html")
            if inline:
                html = _multipart("related", [html, *map(_attachment_part, inline)], 'type="text/html"')
            parts.append(html)
        body = parts[0] if len(parts) == 1 else _multipart("alternative", parts)
        if files:
            body = _multipart("mixed", [body, *map(_attachment_part, files)])
        return body

    def __repr__(self) -> str:
        return f"<Message {self.message_id} from {self.from_} to {len(self.recipients)} recipient(s)>"


@lru_cache(maxsize=1024)
def _stored_date(iso: str) -> tuple[datetime, str]:
    """A stored date and its Date header: messages submitted together share them (a worker reads
    thousands a second, and formatting the header costs more than the rest of restoring one)."""
    date = datetime.fromisoformat(iso)
    return date, format_datetime(date)


def mime_charset(name: str) -> str | None:
    """`name` as mail clients know the charset (lower case; the stdlib's aliases: latin-9 is
    iso-8859-15), or None when it is no text encoding Python and mail clients share."""
    canonical = email.charset.ALIASES.get(name.lower(), name.lower())
    try:
        codec = codecs.lookup(canonical)
    except LookupError:
        return None
    return canonical if codec._is_text_encoding and codec.name not in _NOT_MIME_CHARSETS else None


def split_content_type(content_type: str) -> tuple[str, str | None]:
    """An attachment's validated content type as its MIME type and charset (or None)."""
    found = _CONTENT_TYPE.fullmatch(content_type)
    if found is None:
        return content_type, None
    return found.group(1), found.group(3)


def with_charset(content_type: str, charset: str | None) -> str:
    """`content_type` labelled with `charset` when that is a charset mailgate knows, else as it is."""
    if charset is None or not re.fullmatch(_CHARSET, charset) or not mime_charset(charset):
        return content_type
    return f"{content_type}; charset={charset}"


def new_message_id(domain: str) -> str:
    return f"<{time.time_ns():x}.{os.urandom(8).hex()}@{domain}>"


def _address_dict(a: Address) -> list[str | None]:
    return [a.address, a.name, a.ascii_address, a.ascii_domain]


def _address_from(data: Sequence[str | None]) -> Address:
    a = Address.__new__(Address)
    a.address, a.name, a.ascii_address, a.ascii_domain = data  # type: ignore[assignment]
    return a


def _address_list(name: str, addresses: list[Address], utf8: bool) -> str:
    tokens: list[str] = []
    for i, a in enumerate(addresses):
        t = a.header_tokens(utf8)
        if i < len(addresses) - 1:
            t[-1] += ","
        tokens += t
    return _mime.fold(name, tokens)


def _text_part(text: str, subtype: str) -> tuple[str, bytes]:
    cte, body = _mime.text_body(text)
    return f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n', body


def _attachment_part(att: Attachment) -> tuple[str, bytes]:
    name_param, file_param = _mime.filename_params(att.filename)
    mime_type, charset = split_content_type(att.content_type)
    params = [f"charset={mime_charset(charset) or charset};"] if charset is not None else []
    headers = [
        _mime.fold("Content-Type", [mime_type + ";", *params, name_param]),
        _mime.fold("Content-Disposition", ["inline;" if att.inline else "attachment;", file_param]),
        "Content-Transfer-Encoding: base64\r\n",
    ]
    if att.content_id is not None:
        headers.append(f"Content-ID: <{att.content_id}>\r\n")
    return "".join(headers), _mime.base64_lines(att.data)


def _multipart(subtype: str, parts: list[tuple[str, bytes]], params: str = "") -> tuple[str, bytes]:
    boundary = _mime.boundary()
    marker = boundary.encode()
    while any(marker in body for _, body in parts):  # never in practice; see _mime.boundary
        boundary = _mime.boundary()
        marker = boundary.encode()
    delimiter = b"\r\n--" + marker + b"\r\n"
    out = [b"This is a multipart message in MIME format.\r\n"]
    for headers, body in parts:
        out += [delimiter, headers.encode("ascii"), b"\r\n", body]
    out.append(b"\r\n--" + marker + b"--\r\n")
    extra = f"; {params}" if params else ""
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"{extra}\r\n', b"".join(out)


def _attachment_problems(att: object) -> list[tuple[str, str]]:
    if not isinstance(att, Attachment):
        return [("", f"expected an Attachment, got {type(att).__name__}")]
    problems = []
    if not isinstance(att.filename, str) or not att.filename.strip():
        problems.append(("filename", "is empty"))
    elif len(att.filename) > MAX_FILENAME_BYTES:  # before it is encoded: no more than that many bytes
        problems.append(("filename", f"is longer than {MAX_FILENAME_BYTES} bytes"))
    elif (bad := _NOT_IN_FILENAME.search(att.filename)) is not None:
        problems.append(("filename", "control characters and line breaks are not allowed: it "
                                     + _describe(bad.group(), bad.start())))  # fmt: skip
    elif len(att.filename.encode("utf-8")) > MAX_FILENAME_BYTES:
        problems.append(("filename", f"is longer than {MAX_FILENAME_BYTES} bytes"))
    content_type = att.content_type
    if not isinstance(content_type, str) or len(content_type) > MAX_CONTENT_TYPE_LENGTH:
        problems.append(("content_type", f"is a MIME type like application/pdf, at most {MAX_CONTENT_TYPE_LENGTH} "
                                         "characters"))  # fmt: skip
    elif (found := _CONTENT_TYPE.fullmatch(content_type)) is None:
        problems.append(("content_type", f"{content_type!r} is not a MIME type like application/pdf or text/plain; "
                                         "charset=iso-8859-1 (charset is the one parameter taken)"))  # fmt: skip
    elif found.group(3) is not None and mime_charset(found.group(3)) is None:
        problems.append(("content_type", f"{found.group(3)!r} is not a charset mailgate knows (like utf-8 or "
                                         "iso-8859-1)"))  # fmt: skip
    if not isinstance(att.data, (bytes, bytearray, memoryview)):
        problems.append(("data", "must be bytes"))
    cid = att.content_id
    if cid is not None and (not isinstance(cid, str) or len(cid) > MAX_CONTENT_ID_LENGTH
                            or not _CONTENT_ID.fullmatch(cid)):  # fmt: skip
        problems.append(("content_id", f"must be visible ASCII without spaces, '<' or '>', at most "
                                       f"{MAX_CONTENT_ID_LENGTH} characters"))  # fmt: skip
    return problems


def _listed(values: AddressesInput) -> list[AddressInput]:
    if values is None:
        return []
    if isinstance(values, (str, Address)):
        return [values]
    return list(values)


def _shortened(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_headers(headers: HeadersInput, problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, (str, bytes)):
        problems.append(("headers", "expected a mapping or (name, value) pairs, not a single string"))
        return []
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if len(items) > MAX_HEADERS:
        problems.append(("headers", f"has {len(items):,} headers; at most {MAX_HEADERS}"))
        return []
    seen: set[str] = set()
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            problems.append(("headers", f"expected (name, value) text pairs, got {_shortened(repr(item))}"))
            continue
        name, value = item
        field = f"headers[{_shortened(repr(name))}]"
        lower = name.lower()
        if len(name) > MAX_HEADER_NAME_LENGTH:
            problems.append((field, f"a header name is at most {MAX_HEADER_NAME_LENGTH} characters"))
        elif not _HEADER_NAME.fullmatch(name):
            problems.append((field, "a header name is printable ASCII without spaces or ':' (header injection?)"))
        elif len(value) > MAX_HEADER_VALUE_LENGTH:
            problems.append((field, f"a header value is at most {MAX_HEADER_VALUE_LENGTH:,} characters"))
        elif _has_line_break(value) or "\x00" in value:
            problems.append((field, "line breaks are not allowed in a header value (header injection)"))
        elif (why := forbidden_character(value)) is not None:
            problems.append((field, why))
        elif lower in FORBIDDEN_HEADERS:
            problems.append((field, "is set by mailgate from the message's fields; use those instead"))
        elif lower in seen:
            problems.append((field, "is given twice"))
        elif value.isascii() and len(name) + 2 + max(map(len, value.split(" "))) > _mime.HARD_LIMIT:
            problems.append((field, "has a word too long for a header line (998 octets)"))
        else:
            seen.add(lower)
            out.append((name, value))
    return out
