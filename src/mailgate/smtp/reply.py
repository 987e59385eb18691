"""SMTP replies: code, text, enhanced status code (RFC 3463), and what they mean for retrying."""

from __future__ import annotations

import re

from ..delivery import Outcome

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


class Reply:
    """One complete (possibly multi-line) server reply."""

    __slots__ = ("_enhanced", "_parsed", "code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines
        self._parsed = False  # the enhanced code is parsed on first use, once
        self._enhanced: str | None = None

    @property
    def text(self) -> str:
        """The reply text, lines joined by newlines, without the codes."""
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code ("5.7.139") when the first line starts with one whose class
        agrees with the reply code's class."""
        if not self._parsed:
            self._parsed = True
            m = _ENHANCED.match(self.lines[0]) if self.lines else None
            if m and m.group(1) == str(self.code)[0]:
                self._enhanced = m.group(0).strip()
        return self._enhanced

    @property
    def message(self) -> str:
        """The text without the leading enhanced code."""
        text = self.text
        enhanced = self.enhanced
        return text[len(enhanced) :].lstrip() if enhanced else text

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def outcome(self) -> Outcome:
        return classify(self.code, self.enhanced)

    @property
    def too_many_recipients(self) -> bool:
        return is_too_many_recipients(self.code, self.enhanced)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


def is_too_many_recipients(code: int, enhanced: str | None) -> bool:
    # RFC 5321 4.5.3.1.10: the right code is 452; a client SHOULD treat 552 as temporary here.
    return code == 452 or (code == 552 and enhanced == "5.5.3")


def classify(code: int, enhanced: str | None) -> Outcome:
    """Accepted, transient or permanent, by RFC 5321 4.2.1 and RFC 3463.

    The enhanced code wins over the basic one when both are present; "too many recipients" is
    transient whatever its class, because the remaining recipients go in a later transaction.
    """
    if 200 <= code < 400:
        return Outcome.ACCEPTED
    if is_too_many_recipients(code, enhanced):
        return Outcome.TRANSIENT
    first = enhanced[0] if enhanced else str(code)[0]
    return Outcome.TRANSIENT if first == "4" else Outcome.PERMANENT
