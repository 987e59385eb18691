"""`mailgate test global|TENANT --to ADDRESS`: the test e-mail, step by step, from the command line.

Exit statuses: 0 every step passed; 1 a step failed (its cause and fix are printed); 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import EXIT_INPUT, app, dumps, fail, read_secret, with_service

if TYPE_CHECKING:
    from ..service import Mailgate


@app.command("test")
def test(
    ctx: typer.Context,
    scope: Annotated[str, typer.Argument(help="'global', or a tenant's id.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Who gets the test e-mail.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Stop before DATA (RSET): nothing is delivered.")] = False,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Try these unsaved settings (a mail server document) instead of the saved ones."),
    ] = None,
    secret_stdin: Annotated[
        str | None,
        typer.Option(
            "--secret-stdin",
            metavar="FIELD",
            help="Read this secret of the unsaved settings from stdin (e.g. auth.password).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Send a test e-mail through a mail server, as named steps that stop at the first failure and
    say what is wrong and how to fix it. Secrets are never printed; a stored secret is reused for
    unsaved settings only when no destination field (host, port, security, token URL…) changed."""
    import json

    settings: dict[str, Any] | None = None
    if file is not None:
        try:
            settings = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            fail(EXIT_INPUT, f"--file {file}: {e}", as_json)
        if not isinstance(settings, dict):
            fail(EXIT_INPUT, f"--file {file}: a mail server document is a JSON object", as_json)
    secrets = None
    if secret_stdin is not None:
        value = read_secret(True)
        secrets = {secret_stdin: value or ""}

    async def work(mg: Mailgate) -> Any:
        return await mg.test_server(scope, to, settings, dry_run=dry_run, secrets=secrets)

    report = with_service(ctx, work, as_json).to_dict()
    if as_json:
        print(dumps(report))
    else:
        print(f"test e-mail through the {scope} mail server ({report['kind']}) to {report['to']}"
              f"{' (dry run)' if report['dry_run'] else ''}:")  # fmt: skip
        for step in report["steps"]:
            status = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[step["status"]]
            print(f"  {status:<8} {step['name']:<17} {step['duration_ms']:>8.1f} ms  {_summary(step['details'])}")
            if step["status"] == "failed":
                print(f"           cause: {step['cause']}")
                print(f"           fix:   {step['fix']}")
        print("every step passed" if report["ok"] else f"failed at: {report['failed_step']}")
    if not report["ok"]:
        raise typer.Exit(1)


def _summary(details: dict[str, Any]) -> str:
    text = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in details.items())
    return text if len(text) < 300 else text[:297] + "…"
