"""The transport seam: the one place where a message leaves mailgate.

Everything above it (the outbox, the test e-mail, the CLI) hands over an envelope and a message
and gets back a `Delivery`: an outcome per recipient. Everything below it (SMTP connections,
XOAUTH2 tokens, Graph calls) is the transport's business. Like httpx's transports, the cut is
narrow on purpose, so a test swaps a transport instead of patching internals.

Contract of `send`:
- `message` is either finished RFC 5322 bytes, sent as they are, or a `Message`, which the
  transport composes in the form the server allows (raw UTF-8 headers only where the server
  offers SMTPUTF8 and the settings allow it; RFC 2047 encoded words otherwise).
- Whatever the server said about the message comes back in the `Delivery`, per recipient,
  classified accepted / transient / permanent.
- A failure before the message could be offered at all (server unreachable, TLS, credentials, a
  message the server can't take) raises a `DeliveryError` whose `transient` says whether trying
  again later may help.
"""

from __future__ import annotations

from typing import Protocol

from ..delivery import Delivery, Outcome, RecipientResult
from ..message import Envelope, Message

__all__ = ["Delivery", "Outcome", "RecipientResult", "Transport"]


class Transport(Protocol):
    @property
    def server(self) -> str:
        """Where messages go, for the attempt log: "host:port", or "graph:mailbox"."""
        ...

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery: ...

    async def aclose(self) -> None: ...
