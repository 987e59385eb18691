"""mailgate's exceptions: one tree, each carrying what the caller needs as data.

Callers branch on the class and on `transient`, never on the text: the text is for people.
"""

from __future__ import annotations


class MailgateError(Exception):
    """Base of every error mailgate raises on purpose."""


class InvalidInput(MailgateError, ValueError):
    """Input that can never succeed as given: a bad message or a bad settings document.

    `problems` lists every problem found, each as (field, explanation), so an API or a form can
    point at all the fields at once instead of one per round trip.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {text}" if field else text for field, text in problems))

    @property
    def field(self) -> str:
        return self.problems[0][0] if self.problems else ""


class MessageError(InvalidInput):
    """The message is not valid: an address, a header, its size, or it has no recipient."""


class SettingsError(InvalidInput):
    """The mail server document is not valid."""


class NotFound(InvalidInput):
    """The tenant or mail server named does not exist."""


class Conflict(InvalidInput):
    """It exists already."""


class SendingDisabled(MailgateError):
    """No mail server may send for this tenant: there is no global server, or it is switched off."""


class DeliveryError(MailgateError):
    """Talking to a mail server failed before a message could be handed over.

    `transient` says whether trying again later, unchanged, may succeed. `code`, `enhanced` and
    `reply` are the server's answer when there was one (None when the failure was ours or the
    network's).
    """

    transient: bool = True

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        reply: str | None = None,
        transient: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.enhanced = enhanced
        self.reply = reply
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did
        if transient is not None:
            self.transient = transient


def foreign_text(value: str, limit: int = 300, *, secrets: tuple[str | None, ...] = ()) -> str:
    """Text a foreign server sent (an OAuth error_description, a Graph error message), fit to show
    an admin and to store: its first line, printable characters only, at most `limit` of them,
    and any of our own `secrets` it echoes replaced by "[redacted]"."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            value = value.replace(secret, "[redacted]")
    line = value.strip().split("\n", 1)[0].strip()
    line = "".join(c if c.isprintable() else " " for c in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def traceback_of(e: BaseException) -> str:
    """An unexpected exception as the log gets it: its type and where it was raised, never its
    text, which may quote a secret, a message's content or a database's parameters."""
    import traceback

    return f"{type(e).__name__}, raised at:\n" + "".join(traceback.format_tb(e.__traceback__)).rstrip()
