"""mailgate's own asyncio SMTP client (pipelining, STARTTLS, AUTH incl. XOAUTH2).

Layers, one module each: `reply` (codes and their meaning), `protocol` (bytes and replies),
`auth` (SASL mechanisms), `client` (session and transactions), `errors`.
"""

from .auth import OAuth2Auth, PasswordAuth
from .client import SECURITY_MODES, Security, SMTPClient, SMTPConfig, tls_context
from .errors import (
    SMTPAuthError,
    SMTPConnectError,
    SMTPDisconnectedError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPProtocolError,
    SMTPResponseError,
    SMTPSecurityError,
    SMTPTimeoutError,
    SMTPTLSError,
)
from .reply import Reply, classify

__all__ = [
    "SECURITY_MODES",
    "OAuth2Auth",
    "PasswordAuth",
    "Reply",
    "SMTPAuthError",
    "SMTPClient",
    "SMTPConfig",
    "SMTPConnectError",
    "SMTPDisconnectedError",
    "SMTPError",
    "SMTPNotSupportedError",
    "SMTPProtocolError",
    "SMTPResponseError",
    "SMTPSecurityError",
    "SMTPTLSError",
    "SMTPTimeoutError",
    "Security",
    "classify",
    "tls_context",
]
