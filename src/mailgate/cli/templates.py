"""`mailgate templates …`: the notification templates (invitation, password_reset, …): list them,
show one as a scope uses it, override it (global defaults, or --tenant's own), reset it, preview it.
Changes are audited as this user at this host, like every CLI change."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import EXIT_INPUT, _typer, app, dumps, fail, with_service

if TYPE_CHECKING:
    from ..service import Mailgate

templates_app = _typer("Notification templates: list, show, set, reset, preview.")
app.add_typer(templates_app, name="templates")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Tenant = Annotated[str | None, typer.Option("--tenant", help="The tenant's own templates (default: the global ones).")]
Name = Annotated[str, typer.Argument(help="The template, e.g. invitation.", show_default=False)]
Locale = Annotated[str, typer.Argument(help="The locale, e.g. en, de, fr, nl, nl-BE.", show_default=False)]


@templates_app.command("list")
def templates_list(ctx: typer.Context, tenant: Tenant = None, as_json: JsonFlag = False) -> None:
    """Every template, its variables, and which locales are overridden (G: globally, T: by the tenant)."""

    async def work(mg: Mailgate) -> Any:
        return await mg.templates.list(tenant)

    found = with_service(ctx, work, as_json)
    if as_json:
        print(dumps([t.to_dict() for t in found]))
        return
    for t in found:
        marks = " ".join(
            loc.locale + ("[T]" if loc.tenant_override else "[G]" if loc.global_override else "") for loc in t.locales
        )
        names = ", ".join(v.name + ("" if v.required else "?") for v in t.variables)
        print(f"{t.name:<20} {marks:<24} {names}")


@templates_app.command("show")
def templates_show(
    ctx: typer.Context, name: Name, locale: Annotated[str, typer.Argument()] = "en", tenant: Tenant = None,
    as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """The template as the scope uses it in a locale (after fallback), and whose it is."""

    async def work(mg: Mailgate) -> Any:
        return await mg.templates.get(name, locale, tenant)

    text = with_service(ctx, work, as_json)
    if as_json:
        print(dumps(text.to_dict()))
        return
    print(f"# {text.name} {text.locale} ({text.source})\nsubject: {text.subject}\n\n{text.text}")
    if text.html:
        print(f"--- html ---\n{text.html}")


@templates_app.command("set")
def templates_set(
    ctx: typer.Context,
    name: Name,
    locale: Locale,
    subject: Annotated[str, typer.Option("--subject", help="The subject template (one line).", show_default=False)],
    text_file: Annotated[
        Path, typer.Option("--text-file", help="The text template, from a file ('-': stdin).", show_default=False)
    ],
    html_file: Annotated[
        Path | None, typer.Option("--html-file", help="The HTML template (left out: text-only messages).")
    ] = None,
    tenant: Tenant = None,
    as_json: JsonFlag = False,
) -> None:
    """Override a template in a locale, whole (checked in the sandbox: declared variables only)."""
    try:
        text = sys.stdin.read() if str(text_file) == "-" else text_file.read_text(encoding="utf-8")
        html = html_file.read_text(encoding="utf-8") if html_file is not None else ""
    except OSError as e:
        fail(EXIT_INPUT, f"cannot read {e.filename}: {e.strerror}", as_json)
    except UnicodeDecodeError:
        fail(EXIT_INPUT, "--text-file and --html-file must be UTF-8 text", as_json)

    async def work(mg: Mailgate) -> Any:
        return await mg.templates.save(name, locale, tenant, subject=subject, text=text, html=html)

    saved = with_service(ctx, work, as_json)
    print(dumps(saved.to_dict()) if as_json else f"saved {saved.name} {saved.locale} for {tenant or 'global'}")


@templates_app.command("reset")
def templates_reset(
    ctx: typer.Context, name: Name, locale: Locale, tenant: Tenant = None, as_json: JsonFlag = False
) -> None:
    """Remove the scope's override of a template in a locale."""

    async def work(mg: Mailgate) -> Any:
        return await mg.templates.reset(name, locale, tenant)

    now = with_service(ctx, work, as_json)
    print(dumps(now.to_dict()) if as_json else f"reset {name} {locale} for {tenant or 'global'}: now {now.source}")


@templates_app.command("preview")
def templates_preview(
    ctx: typer.Context,
    name: Name,
    locale: Annotated[str, typer.Argument()] = "en",
    tenant: Tenant = None,
    data: Annotated[str | None, typer.Option("--data", help="Variables as JSON (default: the samples).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Render a template with sample (or given) values."""
    try:
        values = json.loads(data) if data is not None else None
    except ValueError as e:
        fail(EXIT_INPUT, f"--data is not JSON: {e}", as_json)

    async def work(mg: Mailgate) -> Any:
        return await mg.templates.preview(name, locale, tenant, data=values)

    out = with_service(ctx, work, as_json)
    if as_json:
        print(dumps(out.to_dict()))
        return
    print(f"subject: {out.subject}\n\n{out.text}")
