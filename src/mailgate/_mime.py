"""Header and body encodings for composing RFC 5322 / MIME bytes directly.

`email.message.EmailMessage` costs about 1.1 ms per message; building the few structures a
notification needs by hand, with the C codecs in `binascii`, costs a small fraction of that.
Everything here returns `str` that is either pure ASCII or, in UTF-8 header mode (RFC 6532),
UTF-8; lines end in CRLF and never exceed 998 octets.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

CRLF = "\r\n"
SOFT_LIMIT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
HARD_LIMIT = 998  # ... and MUST be at most 998 octets

# An encoded word is at most 75 characters (RFC 2047 2): "=?utf-8?b?" + base64 + "?=" leaves 63
# for base64; 42 input bytes (56 base64 characters) also keep a folded line near 78.
_EW_CHUNK = 42

_TOKEN_LIMIT = 900  # longest header token written as is; leaves room on a 998-octet line
_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+")
_PLAIN_PHRASE_UTF8 = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ \u0080-\U0010ffff]+")


def fold(name: str, tokens: list[str]) -> str:
    """`name: tok tok …` with a fold (CRLF + the joining space) wherever a line would pass 78.

    Unfolding removes only the CRLF, so the text reads back exactly as the tokens joined by
    single spaces. A token is never split; the caller keeps tokens under 998 octets.
    """
    head = name + ":"
    cur = head
    lines: list[str] = []
    for tok in tokens:
        if len(cur) + 1 + len(tok) > SOFT_LIMIT and len(cur) > len(head):
            lines.append(cur)
            cur = " " + tok
        else:
            cur = cur + " " + tok
    lines.append(cur)
    return CRLF.join(lines) + CRLF


def encoded_words(text: str) -> list[str]:
    """RFC 2047 B-encoded words for `text`, split between characters, never inside one."""
    data = text.encode("utf-8")
    words: list[str] = []
    start, end = 0, len(data)
    while start < end:
        stop = min(start + _EW_CHUNK, end)
        while stop < end and (data[stop] & 0xC0) == 0x80:  # UTF-8 continuation byte
            stop -= 1
        words.append("=?utf-8?b?" + binascii.b2a_base64(data[start:stop], newline=False).decode() + "?=")
        start = stop
    return words


def unstructured(name: str, value: str, utf8: bool, *, literal: bool = True) -> str:
    """A folded header value: raw when it may be, RFC 2047 encoded words otherwise.

    With `literal` (free text such as Subject), a literal "=?" is encoded too, so that a reader
    never decodes as an encoded word text that the sender did not encode.
    """
    raw_ok = (utf8 or value.isascii()) and not (literal and "=?" in value)
    if raw_ok:
        if len(name) + 2 + len(value) <= SOFT_LIMIT:
            return f"{name}: {value}{CRLF}"
        tokens = value.split(" ")
        if max(len(t.encode()) for t in tokens) + len(name) + 2 <= HARD_LIMIT:
            return fold(name, tokens)
    return fold(name, encoded_words(value))


def phrase(text: str, utf8: bool) -> list[str]:
    """A display name as header tokens: atoms, a quoted string, or encoded words.

    Encoded words also whenever a token would not fit on a line (a very long name in UTF-8),
    because `fold` never splits a token.
    """
    tokens: list[str] | None = None
    if "=?" not in text and (_PLAIN_PHRASE_UTF8 if utf8 else _PLAIN_PHRASE).fullmatch(text):
        tokens = text.split()
    elif utf8 or text.isascii():
        tokens = [quote_param(text)]
    if tokens is not None and max(len(t.encode()) for t in tokens) <= _TOKEN_LIMIT:
        return tokens
    return encoded_words(text)


def quote_param(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filename_params(filename: str) -> tuple[str, str]:
    """(Content-Type name parameter, Content-Disposition filename parameter).

    Non-ASCII names use RFC 2231 (`filename*=utf-8''…`) on the disposition, which every modern
    reader decodes, and an encoded word on `name`, which older Outlook versions read instead.
    """
    if filename.isascii():
        q = quote_param(filename)
        return f"name={q}", f"filename={q}"
    pct = "".join(
        chr(b) if (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b in b"!#$&+-.^_`|~") else f"%{b:02X}"
        for b in filename.encode("utf-8")
    )
    return f'name="{" ".join(encoded_words(filename))}"', f"filename*=utf-8''{pct}"


def text_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, CRLF body) for a text part, whichever encoding fits.

    7bit when the text is ASCII with short lines; quoted-printable when it is mostly ASCII;
    base64 when most of it isn't (CJK, Cyrillic…), where QP would triple the size.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and "\x00" not in text:
        if len(text) <= HARD_LIMIT or max(map(len, text.split("\n"))) <= HARD_LIMIT:
            return "7bit", text.replace("\n", CRLF).encode("ascii")
        return "quoted-printable", binascii.b2a_qp(text.replace("\n", CRLF).encode("ascii"), istext=True)
    data = text.encode("utf-8")
    if (len(data) - len(text)) * 3 > len(data):
        return "base64", base64_lines(data)
    return "quoted-printable", binascii.b2a_qp(data.replace(b"\n", b"\r\n"), istext=True)


def base64_lines(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines (RFC 2045 6.8)."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def boundary() -> str:
    # 96 random bits: a collision with content is astronomically unlikely, and the composer
    # checks anyway before using it.
    return "=_mg_" + os.urandom(12).hex()
