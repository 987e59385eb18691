"""mailgate: outbound notification mail for multi-tenant applications.

The public names: `Mailgate` (the service: tenants, mail servers, resolution), `Message` and its
parts, the `Delivery` a send returns, and the errors. `Mailgate` is imported on first use, so
`import mailgate` stays light for code that only builds messages.
"""

from typing import TYPE_CHECKING, Any

from .delivery import Delivery, Outcome, RecipientResult
from .errors import (
    Conflict,
    DeliveryError,
    InvalidInput,
    MailgateError,
    MessageError,
    NotFound,
    SendingDisabled,
    SettingsError,
)
from .message import Address, Attachment, Envelope, Message

if TYPE_CHECKING:
    from .service import Mailgate

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Mailgate":
        from .service import Mailgate

        return Mailgate
    raise AttributeError(f"module 'mailgate' has no attribute {name!r}")


__all__ = [
    "Address",
    "Attachment",
    "Conflict",
    "Delivery",
    "DeliveryError",
    "Envelope",
    "InvalidInput",
    "Mailgate",
    "MailgateError",
    "Message",
    "MessageError",
    "NotFound",
    "Outcome",
    "RecipientResult",
    "SendingDisabled",
    "SettingsError",
    "__version__",
]
