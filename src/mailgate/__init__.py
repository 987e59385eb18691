"""mailgate: outbound notification mail for multi-tenant applications.

The public names: `Message` and its parts, the `Delivery` a send returns, and the errors.
"""

from .delivery import Delivery, Outcome, RecipientResult
from .errors import DeliveryError, InvalidInput, MailgateError, MessageError, SettingsError
from .message import Address, Attachment, Envelope, Message

__version__ = "0.1.0"

__all__ = [
    "Address",
    "Attachment",
    "Delivery",
    "DeliveryError",
    "Envelope",
    "InvalidInput",
    "MailgateError",
    "Message",
    "MessageError",
    "Outcome",
    "RecipientResult",
    "SettingsError",
    "__version__",
]
