"""The SMTP transport: a mail server document's smtp settings, driven by mailgate's client.

One connection, opened on first use and reused while it lasts (the pool module keeps several per
server). With XOAUTH2, every new connection gets a current token, and a connection is closed
before its token expires (the token's `renew_at`) instead of being cut off by the server.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import SettingsError
from ..message import Envelope, Message
from ..settings.document import MailServer, NoAuth, OAuth2AuthSettings, PasswordAuthSettings
from ..smtp import OAuth2Auth, PasswordAuth, SMTPClient, SMTPConfig
from ..smtp.auth import Credentials, TokenSource
from ..smtp.errors import SMTPAuthError
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

    @property
    def server(self) -> str:
        return self.config.server

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery:
        async with self._lock:
            client = self._client
            if client is not None and client.token_renew_at is not None and time.time() >= client.token_renew_at:
                await client.quit()  # its token is about to expire: the server would cut us off
            if client is None or not client.is_connected:
                client = await self._connect()
                self._client = client
            if isinstance(message, Message):
                utf8 = message.requires_smtputf8 or (self.utf8_headers and client.smtputf8)
                message = message.compose(utf8=utf8)
            return await client.send(envelope, message)

    async def _connect(self) -> SMTPClient:
        client = SMTPClient(self.config, protocol_log=self._log)
        try:
            await client.connect()
            return client
        except SMTPAuthError as e:
            # A refused XOAUTH2 token may be revoked or stale: one new token, one more try
            # (reference §1.2, §10). SMTP AUTH switched off (5.7.139) is no token problem.
            invalidate = getattr(getattr(self.config.auth, "token", None), "invalidate", None)
            if e.mechanism != "XOAUTH2" or e.enhanced == "5.7.139" or invalidate is None:
                raise
            invalidate(client.access_token if not isinstance(client.access_token, str) else None)
        client = SMTPClient(self.config, protocol_log=self._log)
        await client.connect()
        return client

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.quit()
                self._client = None
