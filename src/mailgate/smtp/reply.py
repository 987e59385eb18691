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
        return classify(self.code, self.enhanced, self.lines[0] if self.lines else "")

    @property
    def too_many_recipients(self) -> bool:
        return is_too_many_recipients(self.code, self.enhanced, self.lines[0] if self.lines else "")

    @property
    def refuses_helo(self) -> bool:
        """The server refuses the name the client greeted it with, whatever the command it says
        so at (Postfix's HELO restrictions, e.g. reject_non_fqdn_helo_hostname, answer at RCPT
        TO by default: "504 5.5.2 <name>: Helo command rejected: need fully-qualified hostname").
        The recipient is not at fault: the server refuses mailgate."""
        if self.code < 400:
            return False
        text = self.text.lower()
        return "helo command rejected" in text or "need fully-qualified hostname" in text

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


def is_too_many_recipients(code: int, enhanced: str | None, text: str = "") -> bool:
    """Whether a reply means "too many recipients" in one transaction: by the enhanced code X.5.3
    (RFC 3463), whatever the basic code (Postfix 452 4.5.3, OpenSMTPD 451 4.5.3, 552 5.5.3);
    without one, a 452 or 552 that says so (Exim: "452 too many recipients"). A bare 452 is not
    enough: it also means "insufficient storage", and 452 4.2.2 (mailbox full) is about that one
    recipient."""
    if enhanced is not None:
        return enhanced[1:] == ".5.3"
    # RFC 5321 4.5.3.1.10: the right code is 452; a client SHOULD treat 552 as temporary here.
    return code in (452, 552) and "too many recipients" in text.lower()


def classify(code: int, enhanced: str | None, text: str = "") -> Outcome:
    """Accepted, transient or permanent, by RFC 5321 4.2.1 and RFC 3463.

    The enhanced code wins over the basic one when both are present; "too many recipients" is
    transient whatever its class, because the remaining recipients go in a later transaction.
    """
    if 200 <= code < 400:
        return Outcome.ACCEPTED
    if is_too_many_recipients(code, enhanced, text):
        return Outcome.TRANSIENT
    first = enhanced[0] if enhanced else str(code)[0]
    return Outcome.TRANSIENT if first == "4" else Outcome.PERMANENT
