"""Errors of an SMTP session, one class per thing that can go wrong before a message is handed
over. Each carries the server's reply (code, enhanced code, text) as data when there was one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..delivery import Outcome
from ..errors import DeliveryError
from .reply import Reply

if TYPE_CHECKING:
    from .auth import AuthTry


class SMTPError(DeliveryError):
    """Base of the SMTP session errors."""

    @classmethod
    def from_reply(cls, what: str, reply: Reply, **kw: Any) -> SMTPError:
        transient = reply.outcome is Outcome.TRANSIENT
        return cls(
            f"{what}: the server answered {reply}",
            code=reply.code,
            enhanced=reply.enhanced,
            reply=reply.text,
            transient=transient,
            **kw,
        )


class SMTPConnectError(SMTPError):
    """The server could not be reached: DNS, refused or unreachable, or a refusing greeting."""


class SMTPTimeoutError(SMTPError):
    """The server did not answer within the timeout."""


class SMTPDisconnectedError(SMTPError):
    """The server closed the connection (RFC 5321 3.8: treated like a 451, transient)."""


class SMTPProtocolError(SMTPError):
    """The server sent something that is not an SMTP reply."""


class SMTPTLSError(SMTPError):
    """TLS could not be set up: handshake, protocol version or certificate verification."""

    transient = False


class SMTPSecurityError(SMTPError):
    """Going on would break the configured security: STARTTLS required but not offered, or a
    password about to cross an unencrypted connection."""

    transient = False


class SMTPAuthError(SMTPError):
    """Authentication failed or could not be attempted.

    `mechanism` is the one tried (or None when none could be chosen); `challenge` holds the decoded
    XOAUTH2 error challenge (Gmail's `{"status": "401", …}`) when the server sent one; `tries`,
    when mechanism auto tried several and the server refused each, lists them (the code and reply
    are the last one's).
    """

    transient = False

    def __init__(
        self,
        message: str,
        *,
        mechanism: str | None = None,
        challenge: dict[str, object] | None = None,
        tries: tuple[AuthTry, ...] = (),
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.mechanism = mechanism
        self.challenge = challenge
        self.tries = tries


class SMTPNotSupportedError(SMTPError):
    """The message needs something the server does not offer (SMTPUTF8, 8BITMIME) or exceeds
    its SIZE; nothing was sent."""

    transient = False


class SMTPResponseError(SMTPError):
    """A command of the session (EHLO, NOOP, RSET…) got an unexpected reply."""
