"""`mailgate users …`: the people who sign in to the admin UI (`mailgate serve`, /admin)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import EXIT_INPUT, dumps, fail, users_app, with_service

if TYPE_CHECKING:
    from ..service import Mailgate

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Email = Annotated[str, typer.Argument(help="The user's e-mail address (how they sign in).", show_default=False)]
PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from stdin (else it is asked for at a terminal)."),
]


def _password(from_stdin: bool) -> str:
    import getpass

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        fail(EXIT_INPUT, "no terminal to ask for the password: give it with --password-stdin")
    first = getpass.getpass("password (12 characters or more): ")
    if getpass.getpass("the same again: ") != first:
        fail(EXIT_INPUT, "the two passwords differ")
    return first


@users_app.command("create")
def users_create(
    ctx: typer.Context,
    email: Email,
    role: Annotated[str, typer.Option(help="system-admin or tenant-admin.", show_default=False)],
    tenant: Annotated[str | None, typer.Option(help="The tenant (tenant-admin).")] = None,
    password_stdin: PasswordStdin = False,
    as_json: JsonFlag = False,
) -> None:
    """Make an admin user. Only an argon2 hash of the password is kept."""
    password = _password(password_stdin)

    async def work(mg: Mailgate) -> Any:
        return await mg.users.create(email, password, role, tenant)

    user = with_service(ctx, work, as_json)
    if as_json:
        print(dumps(user.to_dict()))
        return
    print(f"user {user.email}: {user.role}{' of ' + user.tenant if user.tenant else ''}; signs in at /admin")


@users_app.command("list")
def users_list(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's admins.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The admin users (never their passwords)."""

    async def work(mg: Mailgate) -> Any:
        return await mg.users.list(tenant)

    users = with_service(ctx, work, as_json)
    if as_json:
        print(dumps([u.to_dict() for u in users]))
        return
    for u in users:
        seen = f"signed in {u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at else "never signed in"
        print(f"{u.email:<40} {u.role:<13} {u.tenant or '-':<16} {seen}")


@users_app.command("password")
def users_password(ctx: typer.Context, email: Email, password_stdin: PasswordStdin = False) -> None:
    """Set a new password; the user's sessions end."""
    password = _password(password_stdin)

    async def work(mg: Mailgate) -> Any:
        return await mg.users.set_password(email, password)

    user = with_service(ctx, work)
    print(f"new password for {user.email}; every session of theirs has ended")


@users_app.command("remove")
def users_remove(ctx: typer.Context, email: Email) -> None:
    """Remove an admin user; their sessions end at once."""

    async def work(mg: Mailgate) -> Any:
        return await mg.users.remove(email)

    with_service(ctx, work)
    print(f"removed user {email}")
