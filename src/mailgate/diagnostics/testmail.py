"""The test e-mail: a mail server's settings tried as named steps, stopping at the first failure,
each with its duration, what it found, and — when it failed — the catalogue's cause and fix.

SMTP: resolve settings → dns → connect → greeting → ehlo → tls → token → auth → mail from →
rcpt to → data → queued. Graph: resolve settings → token → permissions → sendMail. EWS: resolve
settings → credentials → GetFolder → CreateItem. With `dry_run` the SMTP test says RSET instead
of DATA and the Graph and EWS tests stop before sending: nothing is delivered. A token is never
shown: only its decoded claims (audience, roles or scopes, tenant, expiry).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ..errors import DeliveryError, InvalidInput
from ..message import Message
from ..oauth.cache import TokenCache, graph_token_source, smtp_token_source
from ..settings.document import MailServer, OAuth2AuthSettings, PasswordAuthSettings
from .catalogue import Explanation, explain_failure

if TYPE_CHECKING:
    from ..destinations import DestinationPolicy
    from ..smtp.reply import Reply

Status = Literal["ok", "failed", "skipped"]
SMTP_STEPS = ("resolve settings", "dns", "connect", "greeting", "ehlo", "tls", "token", "auth", "mail from",
              "rcpt to", "data", "queued")  # fmt: skip
GRAPH_STEPS = ("resolve settings", "token", "permissions", "sendMail")
EWS_STEPS = ("resolve settings", "credentials", "GetFolder", "CreateItem")
# Told when a step starts (False) and when it ends (True): the admin UI shows the steps live.
OnStep = Callable[["Step", bool], None]
# Where each MTA puts its queue id in the reply to the final dot, most specific first.
_QUEUE_IDS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\bqueued as\s+<?([A-Za-z0-9][\w.@-]{3,})>?",  # Postfix: 250 2.0.0 Ok: queued as 4F3kQj1xyz
        r"\bid=<?([A-Za-z0-9][\w.@-]{3,})>?",  # Exim: 250 OK id=1rAbCd-000123-4X
        r"\bInternalId=(\d+)",  # Exchange: 250 2.6.0 <…> [InternalId=…, Hostname=…] Queued mail for delivery
        r"\b([A-Za-z0-9][\w.-]{5,})\s+-\s+gsmtp\b",  # Gmail: 250 2.0.0 OK  1701234567 a1-20020a…  - gsmtp
        # Sendmail, OpenSMTPD: 250 2.0.0 3BKAbcde012345 Message accepted for delivery
        r"^(?:\d\.\d{1,3}\.\d{1,3}:?\s+)?<?((?=[\w.@-]*\d)[A-Za-z0-9][\w.@-]{5,})>?\s+(?:message\s+)?accepted\b",
    )
)
SHOWN_REPLY = 300  # characters of a server's reply line shown in a step
SHOWN_CAPABILITIES = 30


@dataclass
class Step:
    name: str
    status: Status = "skipped"
    duration_ms: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    explanation: Explanation | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "duration_ms": round(self.duration_ms, 1),
                               "details": self.details}  # fmt: skip
        if self.explanation is not None:
            out["cause"], out["fix"] = self.explanation.cause, self.explanation.fix
        return out


@dataclass
class StepReport:
    scope: str
    kind: str
    to: str
    dry_run: bool
    steps: list[Step]

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.status == "failed"), None)

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed
        return {
            "scope": self.scope,
            "kind": self.kind,
            "to": self.to,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "failed_step": failed.name if failed else None,
            "steps": [s.to_dict() for s in self.steps],
        }


class _Failed(Exception):
    pass


class _Run:
    """Runs steps in order; the first failure marks the rest skipped. A step fails by raising: a
    DeliveryError or InvalidInput is explained by the catalogue for `server`."""

    def __init__(self, names: tuple[str, ...], server: MailServer, on_step: OnStep | None) -> None:
        self.steps = {n: Step(n) for n in names}
        self.server = server
        self.stopped = False
        self.on_step = on_step or (lambda step, done: None)

    async def step(self, name: str, work: Callable[[Step], Awaitable[None]]) -> None:
        step = self.steps[name]
        if self.stopped:
            return
        started = time.perf_counter()
        self.on_step(step, False)
        try:
            await work(step)
            if step.status == "skipped" and "skipped" not in step.details:
                step.status = "ok"
        except (DeliveryError, InvalidInput) as e:
            step.status, step.explanation = "failed", explain_failure(e, self.server) or _generic(e)
            step.details["error"] = str(e)
            self.stopped = True
        except _Failed:
            step.status = "failed"
            self.stopped = True
        finally:
            step.duration_ms = (time.perf_counter() - started) * 1000
            self.on_step(step, True)

    def fail(self, step: Step, explanation: Explanation, **details: Any) -> _Failed:
        step.explanation = explanation
        step.details.update(details)
        return _Failed()


def sender_policy(server: MailServer, scope: str) -> dict[str, Any]:
    """The resolve step's account of which From a message may carry through the server."""
    policy = server.effective_from_policy(is_global=scope == "global")
    default = "the global server's default" if scope == "global" else "a tenant's own server's default"
    out: dict[str, Any] = {"from_policy": policy if server.from_policy else f"{policy} ({default})"}
    if policy == "domains":
        out["from_domains"] = server.from_domains
    return out


def probe_message(server: MailServer, to: str) -> Message:
    sender = server.sender_address  # a delegated graph server's: the consenting mailbox
    return Message(
        from_=sender if not server.from_name else f"{server.from_name} <{sender}>",
        to=to,
        subject="mailgate test e-mail",
        text="This is a test e-mail from mailgate: the mail server settings work.\r\n",
    )


async def run_test(
    scope: str,
    server: MailServer,
    to: str,
    *,
    tokens: TokenCache,
    dry_run: bool = False,
    source: str = "saved",
    on_step: OnStep | None = None,
    destinations: DestinationPolicy | None = None,
) -> StepReport:
    """Try `server` (with its secrets) by sending a test e-mail to `to` (or, dry, up to RCPT TO).
    `destinations`: where the server's settings may make mailgate connect (the policy of
    `scope`); every connection of the test obeys it."""
    args = (scope, server, to, tokens, dry_run, source, on_step, destinations)
    if server.kind == "graph":
        return StepReport(scope, "graph", to, dry_run, await _graph(*args))
    if server.kind == "ews":
        return StepReport(scope, "ews", to, dry_run, await _ews(*args))
    return StepReport(scope, "smtp", to, dry_run, await _smtp(*args))


# ---- SMTP --------------------------------------------------------------------------------------


async def _smtp(
    scope: str, server: MailServer, to: str, tokens: TokenCache, dry_run: bool, source: str, on_step: OnStep | None,
    destinations: DestinationPolicy | None,
) -> list[Step]:  # fmt: skip
    from ..smtp import SMTPClient
    from ..transports.smtp import smtp_config

    assert server.smtp is not None
    s = server.smtp
    run = _Run(SMTP_STEPS, server, on_step)
    auth = server.auth
    client: SMTPClient | None = None
    token_handle: Any = None
    message = probe_message(server, to)

    async def resolve(step: Step) -> None:
        nonlocal client, token_handle
        step.details.update(scope=scope, settings=source, kind="smtp", host=s.host, port=s.effective_port,
                            security=s.security, verify_certificate=s.verify_certificate,
                            auth=getattr(auth, "method", "none"), from_address=server.from_address)  # fmt: skip
        step.details.update(sender_policy(server, scope))
        if isinstance(auth, OAuth2AuthSettings):  # a delegated source nobody connected yet fails here
            token_handle = tokens.handle(
                smtp_token_source(server, name=f"the {scope} mail server", destinations=destinations)
            )
        resolve = destinations.resolve if destinations is not None else None
        client = SMTPClient(smtp_config(server, token=token_handle, resolve=resolve))

    async def dns(step: Step) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(server.connection.connect_timeout):
                if destinations is not None:  # each address checked: a refused one fails the step
                    addresses = await destinations.resolve(s.host, s.effective_port)
                else:
                    infos = await loop.getaddrinfo(s.host, s.effective_port, type=socket.SOCK_STREAM)
                    addresses = [str(i[4][0]) for i in infos]
        except (OSError, TimeoutError) as e:
            from ..smtp.errors import SMTPConnectError

            raise SMTPConnectError(f"cannot resolve {s.host!r}: {getattr(e, 'strerror', None) or e}") from None
        step.details["addresses"] = sorted(set(addresses))

    async def connect(step: Step) -> None:
        assert client is not None
        await client.open()
        step.details["server"] = client.config.server
        if s.security == "tls":
            step.details["tls"] = client.tls_version

    async def greeting(step: Step) -> None:
        assert client is not None
        reply = await client.read_greeting()
        step.details["reply"] = _shown(reply)

    async def ehlo(step: Step) -> None:
        assert client is not None
        await client.ehlo()
        step.details["capabilities"] = _capabilities(client.extensions)

    async def tls(step: Step) -> None:
        assert client is not None
        if s.security == "none":
            step.details["skipped"] = "security is none: no TLS"
            return
        if s.security in ("starttls", "starttls-required"):
            await client.starttls()
            if not client.tls_active:
                step.details["skipped"] = "the server does not offer STARTTLS (security starttls: sent unencrypted)"
                return
        step.details.update(_certificate(client.tls_version, client.peer_certificate_der, s.verify_certificate))
        step.details["capabilities_after_tls"] = _capabilities(client.extensions)

    async def token(step: Step) -> None:
        if token_handle is None:
            step.details["skipped"] = "auth is not oauth2"
            return
        access = await token_handle()
        step.details.update(_token_details(access.value, access.expires_at, access.scope))

    async def authenticate(step: Step) -> None:
        assert client is not None
        if client.config.auth is None:
            step.details["skipped"] = "auth is none"
            return
        step.details["offered"] = client.auth_mechanisms
        try:
            await client.authenticate(client.config.auth)
        finally:  # each mechanism tried (mechanism auto falls back), with the server's reply
            step.details["tries"] = [{"mechanism": t.mechanism, "code": t.code, "reply": _shown(t.reply)}
                                     for t in client.auth_tries]  # fmt: skip
        step.details["used"] = client.auth_mechanism
        step.details["username"] = getattr(auth, "username", None)

    async def mail_from(step: Step) -> None:
        assert client is not None
        envelope = message.envelope(mail_from=server.envelope_from)
        step.details["from"] = envelope.mail_from
        await _command(run, step, client.mail(envelope.mail_from, list(envelope.rcpt_to), _body()))

    async def rcpt_to(step: Step) -> None:
        assert client is not None
        step.details["to"] = to
        await _command(run, step, client.command(f"RCPT TO:<{to}>"))

    async def data(step: Step) -> None:
        assert client is not None
        if dry_run:
            await client.rset()
            step.details["skipped"] = "dry run: RSET instead of DATA, nothing was delivered"
            return
        await _command(run, step, client.data(_body()))

    async def queued(step: Step) -> None:
        reply = run.steps["data"].details.get("reply", "")
        if dry_run or not reply:
            step.details["skipped"] = "dry run" if dry_run else "no reply"
            return
        step.details["queue_id"] = queue_id(reply)
        step.details["message_id"] = message.message_id

    body: bytes | None = None

    def _body() -> bytes:
        nonlocal body
        if body is None:
            assert client is not None
            body = message.compose(utf8=client.smtputf8 and bool(s.utf8_headers))
        return body

    try:
        for name, work in zip(SMTP_STEPS, (resolve, dns, connect, greeting, ehlo, tls, token, authenticate,
                                            mail_from, rcpt_to, data, queued), strict=True):  # fmt: skip
            await run.step(name, work)
    finally:
        if client is not None:
            if client.is_connected:
                await client.quit()
            else:
                client.close()
    return list(run.steps.values())


async def _command(run: _Run, step: Step, command: Awaitable[Reply]) -> None:
    """An SMTP command whose reply must be 2xx or 3xx (a session error fails the step in `_Run`)."""
    reply = await command
    step.details["reply"] = _shown(reply)
    if not 200 <= reply.code < 400:
        raise run.fail(step, explain_failure(reply, run.server) or _generic(reply))


def _shown(reply: Reply | str) -> str:
    """A reply as a step shows it: its first line, bounded (the server is the tenant's choice)."""
    from ..errors import foreign_text

    return foreign_text(str(reply), SHOWN_REPLY)


def _capabilities(extensions: dict[str, str]) -> list[str]:
    from ..errors import foreign_text

    return [foreign_text(f"{k} {v}".strip(), 100) for k, v in list(extensions.items())[:SHOWN_CAPABILITIES]]


def queue_id(reply: str) -> str | None:
    """The queue id in a server's reply to the final dot, if it gives one where MTAs do."""
    text = reply.split(" ", 1)[1] if reply[:3].isdigit() else reply  # without the reply code
    for pattern in _QUEUE_IDS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _certificate(version: str | None, der: bytes | None, verified: bool) -> dict[str, Any]:
    """What the server's certificate says, read from its bytes (so also when it was not verified)."""
    out: dict[str, Any] = {"version": version,
                           "verified": True if verified else "not checked (verify_certificate is off)"}  # fmt: skip
    if not der:
        return out
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return out
    out.update(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
               expires=cert.not_valid_after_utc.isoformat(timespec="seconds"))  # fmt: skip
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out["names"] = [*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        pass
    return out


# ---- tokens ------------------------------------------------------------------------------------


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT (not verified: for showing what the token says), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _token_details(token: str, expires_at: float, scope: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"expires": datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")}
    if scope:
        out["granted_scope"] = scope
    claims = jwt_claims(token)
    if claims is None:
        out["format"] = "opaque (not a JWT): nothing to decode"
        return out
    out["format"] = "JWT"
    for key, shown in (("aud", "audience"), ("roles", "roles"), ("scp", "scopes"), ("tid", "tenant"),
                       ("appid", "app"), ("azp", "app"), ("upn", "user"), ("unique_name", "user")):  # fmt: skip
        if key in claims and shown not in out:
            out[shown] = claims[key]
    if isinstance(out.get("scopes"), str):
        out["scopes"] = out["scopes"].split()
    return out


# ---- Graph -------------------------------------------------------------------------------------


async def _graph(
    scope: str, server: MailServer, to: str, tokens: TokenCache, dry_run: bool, source: str, on_step: OnStep | None,
    destinations: DestinationPolicy | None,
) -> list[Step]:  # fmt: skip
    from .catalogue import granted_permissions, needed_permissions, permission_problem

    assert server.graph is not None
    g = server.graph
    delegated = g.auth == "delegated"
    run = _Run(GRAPH_STEPS, server, on_step)
    handle: Any = None
    claims: dict[str, Any] = {}

    async def resolve(step: Step) -> None:
        nonlocal handle
        step.details.update(scope=scope, settings=source, kind="graph", endpoint=g.endpoint, mailbox=g.mailbox,
                            directory_id=g.directory_id, client_id=g.client_id, auth=g.auth,
                            large_attachments=g.large_attachments)  # fmt: skip
        step.details.update(sender_policy(server, scope))
        # A delegated server nobody connected yet fails here, saying so.
        handle = tokens.handle(graph_token_source(server, name=f"the {scope} mail server", destinations=destinations))

    async def token(step: Step) -> None:
        access = await handle()
        claims.update(jwt_claims(access.value) or {})
        if delegated:  # whose grant, and what it holds (the refresh token itself is never shown)
            step.details.update(token="delegated (the consenting mailbox's refresh token)", mailbox=g.mailbox)
        else:
            step.details["token"] = "client credentials (the app's own)"
        step.details.update(_token_details(access.value, access.expires_at, access.scope))

    async def permissions(step: Step) -> None:
        problem = permission_problem(claims, large_attachments=g.large_attachments, delegated=delegated)
        step.details["needed"] = needed_permissions(g.large_attachments)
        step.details["granted"] = granted_permissions(claims)
        if problem is not None:
            raise run.fail(step, problem)

    async def send_mail(step: Step) -> None:
        from ..transports.graph import GraphTransport

        if dry_run:
            step.details["skipped"] = "dry run: nothing was sent"
            return
        message = probe_message(server, to)
        transport = GraphTransport(server, handle, tokens.http_for(destinations))
        delivery = await transport.send(message.envelope(), message)
        [result] = delivery.results
        step.details.update(status=result.code, reply=result.text, message_id=message.message_id)
        if result.outcome.value != "accepted":
            from .catalogue import explain_graph_error

            raise run.fail(step, explain_graph_error(result.code or 0, None, delegated=delegated))

    for name, work in zip(GRAPH_STEPS, (resolve, token, permissions, send_mail), strict=True):
        await run.step(name, work)
    return list(run.steps.values())


# ---- Exchange Web Services ---------------------------------------------------------------------


async def _ews(
    scope: str, server: MailServer, to: str, tokens: TokenCache, dry_run: bool, source: str, on_step: OnStep | None,
    destinations: DestinationPolicy | None,
) -> list[Step]:  # fmt: skip
    """resolve settings → credentials (a token, or the password's account) → GetFolder of the
    mailbox's Sent Items (URL, credentials and rights, without sending; the server's version) →
    CreateItem (skipped when dry)."""
    from .._http import new_client
    from ..transports.ews import EWSTransport

    assert server.ews is not None
    e, auth = server.ews, server.auth
    run = _Run(EWS_STEPS, server, on_step)
    made: list[EWSTransport] = []

    async def resolve(step: Step) -> None:
        step.details.update(scope=scope, settings=source, kind="ews", url=e.url, mailbox=e.mailbox,
                            exchange_version=e.exchange_version, auth=auth.method,
                            save_to_sent_items=e.save_to_sent_items, allow_delegate=e.allow_delegate)  # fmt: skip
        if e.url is None:
            step.details["url"] = "autodiscover (at the GetFolder step)"

    async def credentials(step: Step) -> None:
        handle = None
        if isinstance(auth, OAuth2AuthSettings):
            handle = tokens.handle(
                smtp_token_source(server, name=f"the {scope} mail server", destinations=destinations)
            )
            access = await handle()
            step.details.update(_token_details(access.value, access.expires_at, access.scope))
            step.details["app_only"] = auth.token.grant == "client_credentials"
        elif isinstance(auth, PasswordAuthSettings):
            step.details.update(username=auth.username, scheme=e.password_scheme)
            if auth.password is None:
                missing = Explanation("No password is stored for this mail server.",
                                      "Save the account's password in the mail server settings.")  # fmt: skip
                raise run.fail(step, missing)
        made.append(EWSTransport(server, tokens.http_for(destinations), tokens=handle,
                                 new_http=lambda: new_client(destinations)))  # fmt: skip

    async def get_folder(step: Step) -> None:
        [transport] = made
        folder = await transport.check_mailbox()
        step.details.update(url=transport.url, server_version=transport.server_version,
                            requested_version=transport.version, sent_items=folder)  # fmt: skip

    async def create_item(step: Step) -> None:
        if dry_run:
            step.details["skipped"] = "dry run: nothing was sent"
            return
        [transport] = made
        message = probe_message(server, to)
        step.details["reply"] = await transport.create_item(message.envelope(), message)
        step.details["message_id"] = message.message_id

    try:
        for name, work in zip(EWS_STEPS, (resolve, credentials, get_folder, create_item), strict=True):
            await run.step(name, work)
    finally:
        for transport in made:
            await transport.aclose()
    return list(run.steps.values())


def _generic(what: object) -> Explanation:
    return Explanation(str(what), "Read the details.", transient=getattr(what, "transient", False))
