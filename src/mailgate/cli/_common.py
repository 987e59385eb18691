"""What every command shares: the app, exit statuses, opening the service, errors to output.

Exit statuses: 0 done; 2 bad input (a field, a file, an unknown tenant); 1 anything else that
stopped a settings command (the database unreachable, a secret that can't be decrypted). `send`
has its own as well: 1 some recipients refused, 3 transient failure, 4 permanent failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from ..service import Mailgate

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED, EXIT_INPUT, EXIT_TRANSIENT, EXIT_PERMANENT = 0, 1, 1, 2, 3, 4
_STATUS = {EXIT_FAILED: "failed", EXIT_INPUT: "invalid", EXIT_TRANSIENT: "transient", EXIT_PERMANENT: "permanent"}
T = TypeVar("T")


def _typer(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = typer.Typer(
    name="mailgate",
    help="Outbound notification mail for multi-tenant applications.",
    no_args_is_help=True,
    add_completion=False,
    # Pretty tracebacks print local variables, which may hold a password: never.
    pretty_exceptions_enable=False,
)
tenants_app = _typer("Tenants: add, list, show, update, remove.")
servers_app = _typer("Mail servers: the global one ('global') and each tenant's own (its id).")
keys_app = _typer("The keys that encrypt stored secrets.")
db_app = _typer("The database.")
queue_app = _typer("The outbox: list, show, retry, cancel, stats, purge.")
tokens_app = _typer("API tokens: create (shown once), list, revoke.")
users_app = _typer("Admin UI users: create, list, password, remove.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(servers_app, name="servers")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(queue_app, name="queue")
app.add_typer(tokens_app, name="tokens")
app.add_typer(users_app, name="users")


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Database (default: $MAILGATE_DATABASE_URL, else SQLite mailgate.db in this directory).",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="A TOML file of settings (default: $MAILGATE_CONFIG_FILE, if set); MAILGATE_… variables override it.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Outbound notification mail for multi-tenant applications."""
    logging.basicConfig(level=logging.WARNING, format="mailgate: %(message)s", stream=sys.stderr)
    ctx.obj = {"database_url": database_url, "config_file": config_file}


def load_config(ctx: typer.Context) -> Any:
    """The operator's settings (config.py): the file, then the environment."""
    from ..config import Config

    return Config.load(ctx.obj.get("config_file"))


def fail(exit_code: int, message: str, as_json: bool = False, **fields: Any) -> NoReturn:
    if as_json:
        print(dumps({"status": _STATUS[exit_code], "error": {"message": message, **fields}}))
    else:
        print(f"mailgate: {message}", file=sys.stderr)
    raise typer.Exit(exit_code)


def fail_input(e: Exception, as_json: bool) -> NoReturn:
    from ..errors import InvalidInput

    problems = [{"field": f, "problem": p} for f, p in e.problems] if isinstance(e, InvalidInput) else []
    fail(EXIT_INPUT, str(e), as_json, problems=problems)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=None)


def cli_actor() -> str:
    from ..service import default_actor

    return f"cli:{default_actor()}"


def with_service(ctx: typer.Context, work: Callable[[Mailgate], Awaitable[T]], as_json: bool = False) -> T:
    """Open the service, run `work`, close; errors become messages and exit statuses."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..errors import InvalidInput, MailgateError
    from ..service import Mailgate

    async def main() -> T:
        async with Mailgate.open(ctx.obj["database_url"], actor=cli_actor(), config=load_config(ctx)) as mg:
            return await work(mg)

    try:
        return asyncio.run(main())
    except InvalidInput as e:
        fail_input(e, as_json)
    except MailgateError as e:
        fail(EXIT_FAILED, str(e), as_json)
    except (SQLAlchemyError, OSError) as e:
        fail(EXIT_FAILED, f"the database can't be used: {type(e).__name__}: {str(e).splitlines()[0]}", as_json)


def read_secret(from_stdin: bool, env: str | None = None) -> str | None:
    """A secret from stdin (without echo at a terminal), else from the environment."""
    import os

    if from_stdin:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass("secret: ")
        return sys.stdin.readline().rstrip("\r\n")
    return (os.environ.get(env) or None) if env else None
