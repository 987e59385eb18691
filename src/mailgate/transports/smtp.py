"""The SMTP transport: a mail server document's smtp settings, driven by mailgate's client.

One connection, opened on first use and reused while it lasts; connection pools per server come
with the pool module.
"""

from __future__ import annotations

import asyncio

from ..errors import SettingsError
from ..message import Envelope, Message
from ..settings.document import MailServer, NoAuth, OAuth2AuthSettings, PasswordAuthSettings
from ..smtp import OAuth2Auth, PasswordAuth, SMTPClient, SMTPConfig
from ..smtp.auth import Credentials, TokenSource
from ..smtp.protocol import ProtocolLog
from .base import Delivery


def smtp_config(server: MailServer, *, password: str | None = None, token: TokenSource | None = None) -> SMTPConfig:
    """The client configuration for a mail server of kind smtp.

    `password` overrides the document's (for secrets given on stdin or in the environment);
    `token` supplies access tokens for oauth2.
    """
    if server.kind != "smtp" or server.smtp is None:
        raise SettingsError([("kind", "this mail server is not of kind smtp")])
    s = server.smtp
    creds: Credentials | None = None
    auth = server.auth
    if isinstance(auth, PasswordAuthSettings):
        secret = password if password is not None else (auth.password.get_secret_value() if auth.password else None)
        if not secret:
            raise SettingsError([("auth.password", "is required for the password method")])
        creds = PasswordAuth(auth.username, secret, auth.mechanism)
    elif isinstance(auth, OAuth2AuthSettings):
        if token is None:
            raise SettingsError([("auth.token", "no access token is available for oauth2")])
        creds = OAuth2Auth(auth.username, token)
    else:
        assert isinstance(auth, NoAuth)
    return SMTPConfig(
        host=s.host,
        port=s.effective_port,
        security=s.security,
        verify_certificate=s.verify_certificate,
        ca_file=s.ca_file,
        helo_name=s.helo_name,
        connect_timeout=server.connection.connect_timeout,
        protocol_timeout=server.connection.protocol_timeout,
        auth=creds,
    )


class SMTPTransport:
    """Sends through one SMTP connection, reconnecting when the previous one is gone."""

    def __init__(
        self, config: SMTPConfig, *, utf8_headers: bool = False, protocol_log: ProtocolLog | None = None
    ) -> None:
        self.config = config
        self.utf8_headers = utf8_headers
        self._log = protocol_log
        self._client: SMTPClient | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_server(
        cls,
        server: MailServer,
        *,
        password: str | None = None,
        token: TokenSource | None = None,
        protocol_log: ProtocolLog | None = None,
    ) -> SMTPTransport:
        config = smtp_config(server, password=password, token=token)
        return cls(config, utf8_headers=server.smtp.utf8_headers if server.smtp else False, protocol_log=protocol_log)

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery:
        async with self._lock:
            client = self._client
            if client is None or not client.is_connected:
                client = SMTPClient(self.config, protocol_log=self._log)
                await client.connect()
                self._client = client
            if isinstance(message, Message):
                utf8 = message.requires_smtputf8 or (self.utf8_headers and client.smtputf8)
                message = message.compose(utf8=utf8)
            return await client.send(envelope, message)

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.quit()
                self._client = None
