"""The `mailgate` command line.

Start-up stays fast: each command imports what it needs inside its own function.
Exit status of `send`: 0 all recipients accepted, 1 some refused, 2 bad input, 3 transient
failure (try again later), 4 permanent failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from .delivery import Delivery
    from .message import Message
    from .settings import MailServer
    from .smtp.protocol import ProtocolLog

EXIT_OK, EXIT_PARTIAL, EXIT_INPUT, EXIT_TRANSIENT, EXIT_PERMANENT = 0, 1, 2, 3, 4

app = typer.Typer(
    name="mailgate",
    help="Outbound notification mail for multi-tenant applications.",
    no_args_is_help=True,
    add_completion=False,
    # Pretty tracebacks print local variables, which may hold a password: never.
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Outbound notification mail for multi-tenant applications."""


def _fail(exit_code: int, message: str, as_json: bool, **fields: Any) -> NoReturn:
    import json

    if as_json:
        status = {EXIT_INPUT: "invalid", EXIT_TRANSIENT: "transient", EXIT_PERMANENT: "permanent"}[exit_code]
        print(json.dumps({"status": status, "error": {"message": message, **fields}}, ensure_ascii=False))
    else:
        print(f"mailgate: {message}", file=sys.stderr)
    raise typer.Exit(exit_code)


@app.command()
def send(
    server: Annotated[Path, typer.Option("--server", help="Mail server document (JSON), as in DESIGN.md.")],
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
    """Send one message now, directly through the given mail server (no queue)."""
    import asyncio

    from .errors import DeliveryError, InvalidInput
    from .settings import load_server

    if text is not None and text_file is not None:
        _fail(EXIT_INPUT, "give the body with --text or --text-file, not both", as_json)
    stdin_users = [
        n
        for n, used in (
            ("--password-stdin", password_stdin),
            ("--access-token-stdin", access_token_stdin),
            ("--text-file -", str(text_file) == "-"),
        )
        if used
    ]
    if len(stdin_users) > 1:
        _fail(EXIT_INPUT, f"only one of {', '.join(stdin_users)} can read stdin", as_json)
    try:
        doc = load_server(server)
        message = _build_message(
            doc, from_=from_, to=to, cc=cc, bcc=bcc, reply_to=reply_to, subject=subject, text=text,
            text_file=text_file, html_file=html_file, attach=attach, header=header,
        )  # fmt: skip
        password = _secret(password_stdin, "MAILGATE_SMTP_PASSWORD")
        token = _secret(access_token_stdin, "MAILGATE_ACCESS_TOKEN")
    except InvalidInput as e:
        _fail(EXIT_INPUT, str(e), as_json, problems=[{"field": f, "problem": p} for f, p in e.problems])
    except OSError as e:
        _fail(EXIT_INPUT, f"cannot read {e.filename}: {e.strerror}", as_json)
    except UnicodeDecodeError:
        _fail(EXIT_INPUT, "--text-file and --html-file must be UTF-8 text", as_json)
    if not doc.enabled:
        _fail(EXIT_INPUT, f'the mail server in {server} is switched off ("enabled": false)', as_json)

    log = _stderr_log if (protocol_log or doc.debug.protocol_log) else None
    try:
        delivery = asyncio.run(_send_once(doc, message, password, token, log))
    except InvalidInput as e:
        _fail(EXIT_INPUT, str(e), as_json, problems=[{"field": f, "problem": p} for f, p in e.problems])
    except DeliveryError as e:
        exit_code = EXIT_TRANSIENT if e.transient else EXIT_PERMANENT
        _fail(exit_code, e.message, as_json, type=type(e).__name__, code=e.code, enhanced=e.enhanced, reply=e.reply)
    raise typer.Exit(_report(delivery, message, as_json))


async def _send_once(
    doc: MailServer, message: Message, password: str | None, token: str | None, log: ProtocolLog | None
) -> Delivery:
    from .errors import SettingsError
    from .transports.smtp import SMTPTransport

    if doc.kind != "smtp":
        raise SettingsError([("kind", "mailgate send supports mail servers of kind smtp for now")])
    source = None
    if token is not None:

        async def source() -> str:
            return token
    elif doc.auth.method == "oauth2":
        raise SettingsError(
            [
                (
                    "auth.token",
                    "fetching tokens from a token source is not available yet; pass a current access "
                    "token with --access-token-stdin or $MAILGATE_ACCESS_TOKEN",
                )
            ]
        )
    transport = SMTPTransport.from_server(doc, password=password, token=source, protocol_log=log)
    try:
        mail_from = doc.envelope_from
        return await transport.send(message.envelope(mail_from=mail_from), message)
    finally:
        await transport.aclose()


def _build_message(
    doc: MailServer,
    *,
    from_: str | None,
    to: list[str],
    cc: list[str],
    bcc: list[str],
    reply_to: list[str],
    subject: str,
    text: str | None,
    text_file: Path | None,
    html_file: Path | None,
    attach: list[Path],
    header: list[str],
) -> Message:
    import mimetypes

    from .errors import MessageError
    from .message import Address, Attachment, Message

    if text_file is not None:
        text = sys.stdin.read() if str(text_file) == "-" else text_file.read_text(encoding="utf-8")
    html = html_file.read_text(encoding="utf-8") if html_file is not None else None
    attachments = []
    for path in attach:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append(Attachment(path.name, ctype, path.read_bytes()))
    headers = []
    for h in header:
        name, sep, value = h.partition(":")
        if not sep:
            raise MessageError([("headers", f"{h!r} is not 'Name: value'")])
        headers.append((name.strip(), value.strip()))
    sender: str | Address = from_ if from_ is not None else Address(doc.from_address, doc.from_name)
    return Message(
        from_=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to or ([doc.reply_to] if doc.reply_to else []),
        subject=subject,
        text=text,
        html=html,
        attachments=attachments,
        headers=headers,
    )


def _secret(from_stdin: bool, env: str) -> str | None:
    if from_stdin:
        if sys.stdin.isatty():  # typed by a person: don't echo it
            import getpass

            return getpass.getpass("secret: ")
        return sys.stdin.readline().rstrip("\r\n")
    return os.environ.get(env) or None


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _report(delivery: Delivery, message: Message, as_json: bool) -> int:
    import json

    accepted = delivery.accepted
    refused = delivery.refused
    if not refused:
        code, status = EXIT_OK, "sent"
    elif accepted:
        code, status = EXIT_PARTIAL, "partial"
    elif any(r.outcome.value == "transient" for r in refused):
        code, status = EXIT_TRANSIENT, "transient"
    else:
        code, status = EXIT_PERMANENT, "permanent"
    if as_json:
        doc = {"status": status, "message_id": message.message_id, **delivery.to_dict()}
        print(json.dumps(doc, ensure_ascii=False))
    else:
        for r in delivery.results:
            reply = " ".join(str(x) for x in (r.code, r.enhanced, r.text) if x)
            note = " (may have been delivered)" if r.uncertain else ""
            print(f"{r.outcome.value:<9} {r.recipient}  {reply}{note}")
    return code


def main() -> None:
    app()


if __name__ == "__main__":
    main()
