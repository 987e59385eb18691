"""`mailgate support request …` (write to support, with the system information attached) and
`mailgate system show|set` (the operator's settings kept in the database: the global support
address)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._common import EXIT_INPUT, _typer, app, dumps, fail, with_service

if TYPE_CHECKING:
    from ..service import Mailgate
    from ..settings.system import SystemInfo
    from ..support import SupportRequest

support_app = _typer("Support requests: write to support, with the system information attached.")
system_app = _typer("The operator's settings kept in the database: the global support address.")
app.add_typer(support_app, name="support")
app.add_typer(system_app, name="system")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@support_app.command("request")
def support_request(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="The tenant it is about.", show_default=False)],
    subject: Annotated[str, typer.Option(help="The subject (at most 200 characters).", show_default=False)],
    message: Annotated[str | None, typer.Option(help="The text.", show_default=False)] = None,
    message_file: Annotated[
        Path | None, typer.Option(help="Read the text from this file ('-': standard input).", show_default=False)
    ] = None,
    reply_to: Annotated[
        str | None, typer.Option(help="Where support answers (default: the tenant's admin address).")
    ] = None,
    system_info: Annotated[
        bool, typer.Option("--system-info/--no-system-info", help="Attach mailgate-system-info.json.")
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Write to support about a tenant: to its own support address when it has one and may set it,
    else to the global one. Stored in the tenant's outbox and sent like any message."""
    if (message is None) == (message_file is None):
        fail(EXIT_INPUT, "give the text with --message or --message-file (one of them)", as_json)
    text = message
    if message_file is not None:
        text = _read_text(message_file, as_json)
    assert text is not None

    async def work(mg: Mailgate) -> SupportRequest:
        return await mg.support_request(tenant, subject=subject, text=text, reply_to=reply_to,
                                        attach_system_info=system_info)  # fmt: skip

    done = with_service(ctx, work, as_json)
    if as_json:
        print(dumps(done.to_dict()))
        return
    where = "the tenant's support address" if done.routed_to == "tenant" else "the global support address"
    print(f"support request {done.id} {done.status}, to {where}")
    if done.warning:
        print(f"mailgate: {done.warning}", file=sys.stderr)


def _read_text(path: Path, as_json: bool) -> str:
    from ..support import MAX_TEXT

    try:
        if str(path) == "-":
            data = sys.stdin.read(MAX_TEXT + 1)
        else:
            with path.open(encoding="utf-8", errors="surrogateescape") as f:
                data = f.read(MAX_TEXT + 1)  # a larger file is refused by the length check, unread
    except OSError as e:
        fail(EXIT_INPUT, f"{path}: {e.strerror or type(e).__name__}", as_json)
    return data


@system_app.command("show")
def system_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show the system settings."""

    async def work(mg: Mailgate) -> SystemInfo:
        return await mg.system.get()

    _show(with_service(ctx, work, as_json), as_json)


@system_app.command("set")
def system_set(
    ctx: typer.Context,
    support_address: Annotated[
        str | None, typer.Option(help="Where support requests go when a tenant has no support address of its own.")
    ] = None,
    no_support_address: Annotated[bool, typer.Option(help="Remove the global support address.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Change the system settings given (audited)."""
    if support_address is None and not no_support_address:
        fail(EXIT_INPUT, "give --support-address ADDRESS or --no-support-address", as_json)

    async def work(mg: Mailgate) -> SystemInfo:
        return await mg.system.update(support_address=support_address, clear_support_address=no_support_address)

    _show(with_service(ctx, work, as_json), as_json)


def _show(info: SystemInfo, as_json: bool) -> None:
    if as_json:
        print(dumps(info.to_dict()))
        return
    for key, value in info.to_dict().items():
        print(f"{key + ':':<18} {'' if value is None else value}")
