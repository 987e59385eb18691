"""`mailgate send`: a message for a tenant into the outbox (the worker delivers it), or, with
`--now` or `--server FILE`, sent at once, directly. `--template NAME` makes the subject and body
from a notification template (with --server FILE, the built-in one: no database to hold overrides).

Exit status: 0 queued or all recipients accepted, 1 some refused, 2 bad input, 3 transient
failure (try again later), 4 permanent failure (sending disabled for the tenant included).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    EXIT_INPUT,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    app,
    cli_actor,
    dumps,
    fail,
    fail_input,
    read_secret,
)

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..destinations import Destinations
    from ..message import Attachment, Message
    from ..oauth.cache import TokenCache
    from ..service import Mailgate
    from ..settings import MailServer
    from ..smtp.protocol import ProtocolLog
    from ..transports.pool import RefreshTokenStore


@dataclass
class Content:
    """The message as given on the command line, files already read."""

    from_: str | None
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    subject: str
    text: str | None
    html: str | None
    headers: list[tuple[str, str]]
    attachments: list[Attachment] = field(default_factory=list)
    template: tuple[str, str | None, dict[str, Any]] | None = None  # name, locale, data: the body to render
    locale: str | None = None  # the template's locale used (after fallback)


@app.command()
def send(
    ctx: typer.Context,
    server: Annotated[
        Path | None, typer.Option("--server", help="Send through this mail server document (JSON).")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Queue for this tenant (its resolved mail server).")
    ] = None,
    now: Annotated[
        bool, typer.Option("--now", help="With --tenant: send at once, directly, instead of queueing.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Queue at most once per tenant and key.")
    ] = None,
    to: Annotated[list[str], typer.Option("--to", help="Recipient; repeat for more.")] = [],  # noqa: B006
    from_: Annotated[
        str | None, typer.Option("--from", help="Sender, 'addr' or 'Name <addr>' (default: the server's).")
    ] = None,
    cc: Annotated[list[str], typer.Option("--cc", help="Cc recipient; repeat for more.")] = [],  # noqa: B006
    bcc: Annotated[list[str], typer.Option("--bcc", help="Bcc recipient; repeat for more.")] = [],  # noqa: B006
    reply_to: Annotated[list[str], typer.Option("--reply-to", help="Reply-To address.")] = [],  # noqa: B006
    subject: Annotated[str, typer.Option("--subject")] = "",
    text: Annotated[str | None, typer.Option("--text", help="Plain-text body.")] = None,
    text_file: Annotated[
        Path | None, typer.Option("--text-file", help="Plain-text body from a file ('-': stdin).")
    ] = None,
    html_file: Annotated[Path | None, typer.Option("--html-file", help="HTML body from a file.")] = None,
    attach: Annotated[list[Path], typer.Option("--attach", help="Attach a file; repeat for more.")] = [],  # noqa: B006
    header: Annotated[list[str], typer.Option("--header", help="Extra header 'Name: value'; repeat.")] = [],  # noqa: B006
    template: Annotated[
        str | None, typer.Option("--template", help="A notification template (mailgate templates list) for the body.")
    ] = None,
    locale: Annotated[str | None, typer.Option("--locale", help="The template's locale (nl-BE → nl → en).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="The template's variables as a JSON object.")] = None,
    data_file: Annotated[
        Path | None, typer.Option("--data-file", help="The template's variables from a JSON file ('-': stdin).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-recipient outcome as JSON.")] = False,
    protocol_log: Annotated[
        bool, typer.Option("--protocol-log", help="Print the SMTP conversation to stderr, secrets redacted.")
    ] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the SMTP password from stdin (else $MAILGATE_SMTP_PASSWORD).")
    ] = False,
    access_token_stdin: Annotated[
        bool,
        typer.Option(
            "--access-token-stdin", help="Read an OAuth2 access token from stdin (else $MAILGATE_ACCESS_TOKEN)."
        ),
    ] = False,
) -> None:
    """Queue a message for a tenant, or send one at once (--now, or --server FILE)."""
    from ..errors import DeliveryError, InvalidInput, MailgateError, SendingDisabled

    if (server is None) == (tenant is None):
        fail(EXIT_INPUT, "give the mail server: --server FILE or --tenant TENANT", as_json)
    if text is not None and text_file is not None:
        fail(EXIT_INPUT, "give the body with --text or --text-file, not both", as_json)
    queue = tenant is not None and not now
    if idempotency_key is not None and not queue:
        fail(EXIT_INPUT, "--idempotency-key goes with --tenant, when queueing", as_json)
    if tenant is not None and password_stdin:
        fail(EXIT_INPUT, "--password-stdin goes with --server; a tenant's server uses its stored secret", as_json)
    readers = [n for n, on in (("--password-stdin", password_stdin), ("--access-token-stdin", access_token_stdin),
                               ("--text-file -", str(text_file) == "-"), ("--data-file -", str(data_file) == "-"))
               if on]  # fmt: skip
    if len(readers) > 1:
        fail(EXIT_INPUT, f"only one of {', '.join(readers)} can read stdin", as_json)
    try:
        content = _read_content(from_, to, cc, bcc, reply_to, subject, text, text_file, html_file, attach, header)
        content.template = _read_template(template, locale, data, data_file, content)
        password = read_secret(password_stdin, "MAILGATE_SMTP_PASSWORD") if tenant is None else None
        token = read_secret(access_token_stdin, "MAILGATE_ACCESS_TOKEN")
    except InvalidInput as e:
        fail_input(e, as_json)
    except OSError as e:
        fail(EXIT_INPUT, f"cannot read {e.filename}: {e.strerror}", as_json)
    except UnicodeDecodeError:
        fail(EXIT_INPUT, "--text-file, --html-file and --data-file must be UTF-8 text", as_json)

    if queue:
        assert tenant is not None
        try:
            pk, status = asyncio.run(_queue(ctx.obj["database_url"], tenant, content, idempotency_key))
        except SendingDisabled as e:
            fail(EXIT_PERMANENT, str(e), as_json)
        except InvalidInput as e:
            fail_input(e, as_json)
        where = {"locale": content.locale} if content.locale else {}
        print(dumps({"status": status, "id": pk, **where}) if as_json else f"{status}: message {pk}")
        raise typer.Exit(EXIT_OK)
    log = _stderr_log if protocol_log else None
    try:
        message, delivery = asyncio.run(_main(ctx.obj["database_url"], server, tenant, content, password, token, log))
    except SendingDisabled as e:
        fail(EXIT_PERMANENT, str(e), as_json)
    except InvalidInput as e:
        fail_input(e, as_json)
    except DeliveryError as e:
        exit_code = EXIT_TRANSIENT if e.transient else EXIT_PERMANENT
        fail(exit_code, e.message, as_json, type=type(e).__name__, code=e.code, enhanced=e.enhanced, reply=e.reply)
    except MailgateError as e:
        fail(EXIT_PERMANENT, str(e), as_json)
    raise typer.Exit(_report(delivery, message, as_json))


async def _queue(database_url: str | None, tenant: str, content: Content, key: str | None) -> tuple[int, str]:
    from ..service import Mailgate

    async with Mailgate.open(database_url, actor=cli_actor()) as mg:
        await _render(content, mg, tenant)
        pk = await mg.submit(tenant, _message(None, content), key)
        return pk, (await mg.queue.get(pk)).summary.status


async def _main(
    database_url: str | None,
    server_file: Path | None,
    tenant: str | None,
    content: Content,
    password: str | None,
    token: str | None,
    log: ProtocolLog | None,
) -> tuple[Message, Delivery]:
    from ..errors import SendingDisabled, SettingsError
    from ..settings import load_server

    if server_file is not None:
        doc = load_server(server_file)
        if not doc.enabled:
            raise SettingsError([("enabled", f'the mail server in {server_file} is switched off ("enabled": false)')])
        await _render(content, None, None)
        message = _message(doc, content)
        return message, await _deliver(doc, message, password, token, log)
    from ..service import Mailgate

    assert tenant is not None
    async with Mailgate.open(database_url, actor=cli_actor()) as mg:
        resolution = await mg.resolve(tenant)
        if resolution.server is None:
            raise SendingDisabled(resolution.reason)
        doc = resolution.server
        await _render(content, mg, tenant)
        message = _message(doc, content, is_global=resolution.source == "global")
        # A rotated refresh token goes back to the stored settings, as the worker does it; and its
        # connections obey the destination policy of the server's scope, as the worker's do.
        where = (resolution.server_id or 0, resolution.version or 0, mg.servers.store_refresh_token)
        scope = "global" if resolution.source == "global" else tenant
        return message, await _deliver(doc, message, password, token, log, mg.tokens, where,
                                       (mg.config.destinations, scope))  # fmt: skip


async def _deliver(
    doc: MailServer,
    message: Message,
    password: str | None,
    token: str | None,
    log: ProtocolLog | None,
    tokens: TokenCache | None = None,
    stored: tuple[int, int, RefreshTokenStore] | None = None,
    policy: tuple[Destinations, str] | None = None,
) -> Delivery:
    """Send once, now: through the settings' own transport (token source included), or with the
    password or access token given on the command line."""
    from ..transports.pool import Pools
    from ..transports.smtp import SMTPTransport

    if doc.debug.protocol_log and log is None:
        log = _stderr_log
    envelope = message.envelope(mail_from=doc.envelope_from)
    if doc.kind == "ews" and password is not None and token is None:
        from pydantic import SecretStr

        from ..settings.document import PasswordAuthSettings

        if isinstance(doc.auth, PasswordAuthSettings):  # EWS sends through its pool: the password goes in the doc
            doc = doc.model_copy(update={"auth": doc.auth.model_copy(update={"password": SecretStr(password)})})
            password = None
    if password is not None or token is not None:
        from ..errors import SettingsError

        if doc.kind != "smtp":
            raise SettingsError([("kind", "a password or access token on the command line is for kind smtp")])
        given = token

        async def source() -> str:
            assert given is not None
            return given

        transport = SMTPTransport.from_server(
            doc, password=password, token=source if token is not None else None, protocol_log=log
        )
        try:
            return await transport.send(envelope, message)
        finally:
            await transport.aclose()
    server_id, version, store = stored if stored is not None else (0, 0, None)
    destinations, scope = policy if policy is not None else (None, None)
    pools = Pools((lambda prefix: log) if log else None, tokens=tokens, store_refresh_token=store,
                  destinations=destinations)  # fmt: skip
    if log is not None:
        doc = doc.model_copy(update={"debug": doc.debug.model_copy(update={"protocol_log": True})})
    try:
        async with pools.get(server_id, version, doc, scope=scope).transport() as pooled:
            return await pooled.send(envelope, message)
    finally:
        await pools.aclose()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_content(
    from_: str | None, to: list[str], cc: list[str], bcc: list[str], reply_to: list[str], subject: str,
    text: str | None, text_file: Path | None, html_file: Path | None, attach: list[Path], header: list[str],
) -> Content:  # fmt: skip
    import mimetypes

    from ..errors import MessageError
    from ..message import Attachment

    if text_file is not None:
        text = sys.stdin.read() if str(text_file) == "-" else text_file.read_text(encoding="utf-8")
    html = html_file.read_text(encoding="utf-8") if html_file is not None else None
    headers = []
    for h in header:
        name, sep, value = h.partition(":")
        if not sep:
            raise MessageError([("headers", f"{h!r} is not 'Name: value'")])
        headers.append((name.strip(), value.strip()))
    attachments = []
    for p in attach:
        data = p.read_bytes()
        content_type = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") and _is_utf8(data):  # else its charset is not known: left unsaid
            content_type += "; charset=utf-8"
        attachments.append(Attachment(p.name, content_type, data))
    return Content(from_, to, cc, bcc, reply_to, subject, text, html, headers, attachments)


def _read_template(
    name: str | None, locale: str | None, data: str | None, data_file: Path | None, content: Content
) -> tuple[str, str | None, dict[str, Any]] | None:
    """--template with its --locale and --data (or --data-file), checked against the body options."""
    import json

    from ..errors import MessageError

    if name is None:
        given = [o for o, v in (("--locale", locale), ("--data", data), ("--data-file", data_file)) if v is not None]
        if given:
            raise MessageError([("template", f"{', '.join(given)} go with --template")])
        return None
    if content.subject or content.text is not None or content.html is not None:
        raise MessageError([("template", "the template makes the subject and body: leave out --subject, --text, "
                                         "--text-file and --html-file")])  # fmt: skip
    if data is not None and data_file is not None:
        raise MessageError([("data", "give --data or --data-file, not both")])
    if data_file is not None:
        data = sys.stdin.read() if str(data_file) == "-" else data_file.read_text(encoding="utf-8")
    try:
        values = json.loads(data) if data is not None else {}
    except ValueError as e:
        raise MessageError([("data", f"is not JSON: {e}")]) from None
    if not isinstance(values, dict):
        raise MessageError([("data", "is a JSON object of the template's variables")])
    return name, locale, values


async def _render(content: Content, mg: Mailgate | None, tenant: str | None) -> None:
    """Fill the subject and body from the template, as the tenant has it (without a database:
    the built-in one)."""
    if content.template is None:
        return
    from ..notifications.store import render_built_in

    name, locale, data = content.template
    if mg is None or tenant is None:
        rendered = render_built_in(name, locale, data)
    else:
        rendered = await mg.templates.render(name, locale, tenant, data)
    content.subject, content.text, content.html = rendered.subject, rendered.text, rendered.html
    content.locale = rendered.locale


def _message(doc: MailServer | None, c: Content, *, is_global: bool = False) -> Message:
    """The message as given; what it leaves out (sender, Reply-To) comes from the mail server's
    settings — now for a direct send, at delivery for a queued one — and so does the sender policy
    (`is_global`: the server is the global one, whose default is fixed; a --server FILE is not)."""
    from ..errors import MessageError
    from ..message import Message

    message = Message(
        from_=c.from_, to=c.to, cc=c.cc, bcc=c.bcc, reply_to=c.reply_to, subject=c.subject, text=c.text,
        html=c.html, attachments=c.attachments, headers=c.headers,
    )  # fmt: skip
    if doc is None:
        return message
    policy = doc.effective_from_policy(is_global=is_global)
    refusal = doc.from_refusal(message, policy=policy)
    if refusal is not None:
        raise MessageError([("from", refusal)])
    return doc.fill_in(message, policy=policy)


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _report(delivery: Delivery, message: Message, as_json: bool) -> int:
    refused = delivery.refused
    if not refused:
        code, status = EXIT_OK, "sent"
    elif delivery.accepted:
        code, status = EXIT_PARTIAL, "partial"
    elif any(r.outcome.value == "transient" for r in refused):
        code, status = EXIT_TRANSIENT, "transient"
    else:
        code, status = EXIT_PERMANENT, "permanent"
    if as_json:
        print(dumps({"status": status, "message_id": message.message_id, **delivery.to_dict()}))
    else:
        for r in delivery.results:
            reply = " ".join(str(x) for x in (r.code, r.enhanced, r.text) if x)
            note = " (may have been delivered)" if r.uncertain else ""
            print(f"{r.outcome.value:<9} {r.recipient}  {reply}{note}")
    return code
