"""The SMTP transport: a mail server document's smtp settings, driven by mailgate's client.

One connection, opened on first use and reused while it lasts (the pool module keeps several per
server). Before a message, the connection is replaced when it is gone, when it has carried
`max_messages` messages, or when its XOAUTH2 token is due for renewal (the token's `renew_at`,
`token_expiry_margin` before it expires: closed by us rather than cut off by the server); after
`check_idle_after` seconds idle (0: always) it must first answer a NOOP. Every new connection gets
a current token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..delivery import Outcome
from ..errors import DeliveryError, MessageError, SettingsError
from ..message import Envelope, Message
from ..settings.document import MailServer, NoAuth, OAuth2AuthSettings, PasswordAuthSettings
from ..smtp import OAuth2Auth, PasswordAuth, SMTPClient, SMTPConfig
from ..smtp.auth import Credentials, LearntMechanism, TokenSource
from ..smtp.client import RecipientLimit, Resolve
from ..smtp.errors import SMTPAuthError, SMTPError
from ..smtp.protocol import ProtocolLog
from ..smtp.reply import is_too_many_recipients
from .base import Delivery


def smtp_config(
    server: MailServer,
    *,
    password: str | None = None,
    token: TokenSource | None = None,
    resolve: Resolve | None = None,
) -> SMTPConfig:
    """The client configuration for a mail server of kind smtp.

    `password` overrides the document's (for secrets given on stdin or in the environment);
    `token` supplies access tokens for oauth2; `resolve` is the destination policy's resolver
    (`DestinationPolicy.resolve`) for the server's scope, None for no check.
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
        ca_certificate=s.ca_certificate,
        helo_name=s.helo_name,
        connect_timeout=server.connection.connect_timeout,
        protocol_timeout=server.connection.protocol_timeout,
        auth=creds,
        resolve=resolve,
    )


NOOP_TIMEOUT = 10.0  # seconds


@dataclass(frozen=True)
class Reuse:
    """When a kept connection is checked or replaced (a server document's `connection`)."""

    # Seconds idle after which a NOOP must pass first; 0: before every reuse (Genesys' setting).
    check_idle_after: float | None = None
    max_messages: int | None = None  # messages per connection, then a new one


class SMTPTransport:
    """Sends through one SMTP connection, reconnecting when the previous one is gone."""

    def __init__(
        self,
        config: SMTPConfig,
        *,
        utf8_headers: bool = False,
        protocol_log: ProtocolLog | None = None,
        reuse: Reuse = Reuse(),
        recipient_limit: RecipientLimit | None = None,
        learnt_mechanism: LearntMechanism | None = None,
    ) -> None:
        self.config = config
        self.utf8_headers = utf8_headers
        self.reuse = reuse
        # Shared by the transports of a pool: what the server taught one connection, all know.
        self.recipient_limit = recipient_limit or RecipientLimit()
        self.learnt_mechanism = learnt_mechanism or LearntMechanism()
        self._log = protocol_log
        self._client: SMTPClient | None = None
        self._lock = asyncio.Lock()
        self._messages = 0  # on the current connection
        self._last_used = 0.0  # time.monotonic() of the last send
        self.connections = 0  # opened, ever
        self.replaced_stale = 0  # kept connections that failed their NOOP

    @classmethod
    def from_server(
        cls,
        server: MailServer,
        *,
        password: str | None = None,
        token: TokenSource | None = None,
        protocol_log: ProtocolLog | None = None,
        recipient_limit: RecipientLimit | None = None,
        resolve: Resolve | None = None,
        learnt_mechanism: LearntMechanism | None = None,
    ) -> SMTPTransport:
        config = smtp_config(server, password=password, token=token, resolve=resolve)
        c = server.connection
        return cls(
            config,
            utf8_headers=server.smtp.utf8_headers if server.smtp else False,
            protocol_log=protocol_log,
            reuse=Reuse(c.check_idle_after, c.max_messages_per_connection),
            recipient_limit=recipient_limit,
            learnt_mechanism=learnt_mechanism,
        )

    @property
    def server(self) -> str:
        return self.config.server

    async def send(self, envelope: Envelope, message: bytes | Message) -> Delivery:
        [result] = await self.send_many([(envelope, message)])
        if not isinstance(result, Delivery):
            raise result
        return result

    async def send_many(self, items: list[tuple[Envelope, bytes | Message]]) -> list[Delivery | Exception]:
        """Several messages through this connection, pipelined one after the other (see
        SMTPClient.send_many), within `max_messages` per connection: per item its Delivery, or
        the error that refused it alone — a DeliveryError, a MessageError, or whatever composing
        that message raised (a character no mail can carry: it is not sent, the others are).

        Raises only when no connection can be had before anything was sent. Once something went
        out, nothing is lost to an exception: a connection that can't be had for a later chunk
        becomes that chunk's per-item error, and the Deliveries of earlier chunks stand.
        """
        out: list[Delivery | Exception | None] = [None] * len(items)
        envelopes = [envelope for envelope, _ in items]
        todo = list(range(len(items)))
        second_chance = True
        async with self._lock:
            while todo:
                try:
                    client = await self._connection()
                except DeliveryError as e:
                    if all(o is None for o in out):
                        raise
                    for i in todo:
                        out[i] = out[i] or e  # a retried message keeps what its first try said
                    break
                room = len(todo)
                if self.reuse.max_messages is not None:
                    room = min(room, self.reuse.max_messages - self._messages)
                chunk, todo = todo[:room], todo[room:]
                learnt = self.recipient_limit.learnt
                batch, composed = [], []
                for i in chunk:
                    try:
                        batch.append((envelopes[i], self._compose(items[i][1], client)))
                        composed.append(i)
                    except Exception as e:  # this message alone can't be built (its own error, as data)
                        out[i] = e
                chunk = composed
                if not chunk:
                    continue
                try:
                    results = await client.send_many(batch)
                finally:
                    self._messages += len(chunk)
                    self._last_used = time.monotonic()
                for i, result in zip(chunk, results, strict=True):
                    out[i] = _merge(out[i], result)
                if second_chance and not client.is_connected and self.recipient_limit.learnt != learnt:
                    # The server ended the session over too many recipients (Postfix, past its
                    # overshoot limit: "421 4.7.0 Error: too many errors"). With the limit it
                    # taught, a new connection gets them through; nothing in doubt goes again.
                    second_chance = False
                    again = [(i, _not_tried(out[i])) for i in chunk]
                    for i, recipients in again:
                        if recipients:
                            envelopes[i] = Envelope(envelopes[i].mail_from, tuple(recipients))
                    todo = [i for i, recipients in again if recipients] + todo
        return [o for o in out if o is not None]

    def _compose(self, message: bytes | Message, client: SMTPClient) -> bytes:
        if isinstance(message, Message):
            return message.compose(utf8=message.requires_smtputf8 or (self.utf8_headers and client.smtputf8))
        return message

    async def _connection(self) -> SMTPClient:
        """The kept connection if it may carry another message, else a new one."""
        client = await self._reusable()
        if client is None:
            client = await self._connect()
            self._client = client
            self._messages = 0
            self.connections += 1
        return client

    async def _reusable(self) -> SMTPClient | None:
        """The kept connection, if it may carry another message."""
        client = self._client
        if client is None or not client.is_connected:
            return None
        reuse = self.reuse
        if (client.token_renew_at is not None and time.time() >= client.token_renew_at) or (
            reuse.max_messages is not None and self._messages >= reuse.max_messages
        ):
            await client.quit()  # its token is about to expire (the server would cut us off), or used up
            return None
        idle = time.monotonic() - self._last_used
        if reuse.check_idle_after is not None and (reuse.check_idle_after == 0 or idle > reuse.check_idle_after):
            try:  # a live server answers a NOOP at once: don't wait a whole protocol_timeout
                await asyncio.wait_for(client.noop(), min(self.config.protocol_timeout, NOOP_TIMEOUT))
            except (SMTPError, TimeoutError):
                client.close()  # the server or a middlebox dropped it while idle
                self.replaced_stale += 1
                return None
        return client

    async def _connect(self) -> SMTPClient:
        client = self._client_()
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
        client = self._client_()
        await client.connect()
        return client

    def _client_(self) -> SMTPClient:
        return SMTPClient(self.config, protocol_log=self._log, recipient_limit=self.recipient_limit,
                          learnt_mechanism=self.learnt_mechanism)  # fmt: skip

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.quit()
                self._client = None


def _merge(
    before: Delivery | Exception | None,
    result: Delivery | DeliveryError | MessageError,
) -> Delivery | Exception:
    """A message's result after a further try of some of its recipients."""
    if not isinstance(before, Delivery):
        return result
    if not isinstance(result, Delivery):
        return before
    again = {r.recipient: r for r in result.results}
    return Delivery(before.server, [again.get(r.recipient, r) for r in before.results], before.retry_after)


def _not_tried(result: Delivery | Exception | None) -> list[str]:
    """The recipients of a Delivery the server never answered for themselves: the session ended
    first (no reply, or its 421), or they were refused as too many; none whose message may have
    gone (uncertain)."""
    if not isinstance(result, Delivery):
        return []
    return [
        r.recipient
        for r in result.results
        if r.outcome is Outcome.TRANSIENT
        and not r.uncertain
        and (r.code in (None, 421) or is_too_many_recipients(r.code or 0, r.enhanced, r.text))
    ]
