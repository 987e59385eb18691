"""The outcome of handing one message to a mail server, recipient by recipient.

Every transport (SMTP, Graph, capture) reports in these terms, so the outbox records and retries
the same way whatever carried the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    TRANSIENT = "transient"  # try again later, unchanged
    PERMANENT = "permanent"  # never try this recipient again with this message


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the server said about one recipient.

    `code` is None when no reply came (the connection broke or timed out). `uncertain` is set when
    the message body was sent but its final reply never arrived: the server may have accepted it,
    so a retry may deliver it twice.
    """

    recipient: str
    outcome: Outcome
    code: int | None
    enhanced: str | None
    text: str
    uncertain: bool = False

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED

    def to_dict(self) -> dict[str, object]:
        return {
            "recipient": self.recipient,
            "outcome": self.outcome.value,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
            "uncertain": self.uncertain,
        }


@dataclass(slots=True)
class Delivery:
    """Per-recipient results of one message; `server` names where it went ("host:port")."""

    server: str
    results: list[RecipientResult] = field(default_factory=list)
    # Seconds the server asked us to wait before trying again (HTTP Retry-After), if it did.
    retry_after: float | None = None

    @property
    def accepted(self) -> list[RecipientResult]:
        return [r for r in self.results if r.outcome is Outcome.ACCEPTED]

    @property
    def refused(self) -> list[RecipientResult]:
        return [r for r in self.results if r.outcome is not Outcome.ACCEPTED]

    @property
    def all_accepted(self) -> bool:
        return all(r.outcome is Outcome.ACCEPTED for r in self.results)

    def to_dict(self) -> dict[str, object]:
        return {"server": self.server, "recipients": [r.to_dict() for r in self.results]}
