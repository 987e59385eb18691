"""`mailgate tenants …`, `servers …`, `keys …` and `db …`: the settings, from the command line.

Nothing here ever prints a secret: servers are shown as the store shows them, with each secret
as {"set": true|false}.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    EXIT_INPUT,
    db_app,
    dumps,
    fail,
    fail_input,
    keys_app,
    read_secret,
    servers_app,
    tenants_app,
    with_service,
)

if TYPE_CHECKING:
    from ..service import Mailgate
    from ..settings.store import TenantInfo

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Scope = Annotated[str, typer.Argument(help="'global', or a tenant's id.", show_default=False)]
TenantId = Annotated[str, typer.Argument(help="The tenant's id.", show_default=False)]


# ---- tenants -----------------------------------------------------------------------------------


@tenants_app.command("add")
def tenants_add(
    ctx: typer.Context,
    tenant: TenantId,
    name: Annotated[str | None, typer.Option(help="Display name (default: the id).")] = None,
    may_use_own_server: Annotated[bool, typer.Option(help="May the tenant send through its own server?")] = False,
    support_address: Annotated[str | None, typer.Option(help="The tenant's support address.")] = None,
    may_set_support_address: Annotated[bool, typer.Option(help="May the tenant set its support address?")] = False,
    admin_address: Annotated[
        str | None, typer.Option(help="Told once when the tenant's own mail server is marked broken.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a tenant."""

    async def work(mg: Mailgate) -> TenantInfo:
        return await mg.tenants.add(
            tenant, name=name, may_use_own_server=may_use_own_server, support_address=support_address,
            may_set_support_address=may_set_support_address, admin_address=admin_address,
        )  # fmt: skip

    _show_tenant(with_service(ctx, work, as_json), as_json)


@tenants_app.command("list")
def tenants_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the tenants."""

    async def work(mg: Mailgate) -> list[TenantInfo]:
        return await mg.tenants.list()

    tenants = with_service(ctx, work, as_json)
    if as_json:
        print(dumps([t.to_dict() for t in tenants]))
        return
    for t in tenants:
        own = "may use its own server" if t.may_use_own_server else "global server only"
        print(f"{t.id:<24} {t.name:<32} {own}")


@tenants_app.command("show")
def tenants_show(ctx: typer.Context, tenant: TenantId, as_json: JsonFlag = False) -> None:
    """Show a tenant."""

    async def work(mg: Mailgate) -> TenantInfo:
        return await mg.tenants.get(tenant)

    _show_tenant(with_service(ctx, work, as_json), as_json)


@tenants_app.command("update")
def tenants_update(
    ctx: typer.Context,
    tenant: TenantId,
    name: Annotated[str | None, typer.Option(help="New display name.")] = None,
    may_use_own_server: Annotated[bool | None, typer.Option(help="May it send through its own server?")] = None,
    support_address: Annotated[str | None, typer.Option(help="New support address.")] = None,
    clear_support_address: Annotated[bool, typer.Option(help="Remove the support address.")] = False,
    may_set_support_address: Annotated[bool | None, typer.Option(help="May it set its support address?")] = None,
    admin_address: Annotated[str | None, typer.Option(help="New admin address (told when its server breaks).")] = None,
    clear_admin_address: Annotated[bool, typer.Option(help="Remove the admin address.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Change a tenant: only the options given."""

    async def work(mg: Mailgate) -> TenantInfo:
        return await mg.tenants.update(
            tenant, name=name, may_use_own_server=may_use_own_server, support_address=support_address,
            clear_support_address=clear_support_address, may_set_support_address=may_set_support_address,
            admin_address=admin_address, clear_admin_address=clear_admin_address,
        )  # fmt: skip

    _show_tenant(with_service(ctx, work, as_json), as_json)


@tenants_app.command("remove")
def tenants_remove(ctx: typer.Context, tenant: TenantId) -> None:
    """Remove a tenant and its own mail server."""

    async def work(mg: Mailgate) -> None:
        await mg.tenants.remove(tenant)

    with_service(ctx, work)
    print(f"removed tenant {tenant}")


def _show_tenant(t: TenantInfo, as_json: bool) -> None:
    if as_json:
        print(dumps(t.to_dict()))
        return
    for key, value in t.to_dict().items():
        print(f"{key + ':':<26} {'' if value is None else value}")


# ---- servers -----------------------------------------------------------------------------------


@servers_app.command("health")
def servers_health(
    ctx: typer.Context,
    scope: Annotated[str | None, typer.Argument(help="'global' or a tenant's id (default: every server).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Credential health: status, last successful send, last failure, token expiry, consent, and
    what is known of coming expiries (client secrets, refresh tokens)."""

    async def work(mg: Mailgate) -> Any:
        if scope is not None:
            return [await mg.servers.health(scope)]
        scopes = ["global"] + [t.id for t in await mg.tenants.list()]
        found = []
        for each in scopes:
            if await mg.servers.get(each) is not None:
                found.append(await mg.servers.health(each))
        return found

    health = [h.to_dict() for h in with_service(ctx, work, as_json)]
    if as_json:
        print(dumps(health))
        return
    for h in health:
        print(f"{h['scope']} (version {h['version']}, {h['kind']}): {h['status']}")
        if h["broken"]:
            print(f"  broken since {h['broken']['since']}: {h['broken']['reason']}")
        print(f"  last success:  {h['last_success_at'] or '-'}")
        failure = h["last_failure"]
        print(f"  last failure:  {failure['at'] + ': ' + failure['text'] if failure else '-'}")
        if h["token_expires_at"]:
            print(f"  access token expires: {h['token_expires_at']}")
        if h["consented_at"]:
            print(f"  consent given: {h['consented_at']}")
        for note in h["notes"]:
            print(f"  note: {note}")


@servers_app.command("set")
def servers_set(
    ctx: typer.Context,
    scope: Scope,
    file: Annotated[Path, typer.Option("--file", help="The mail server document (JSON).")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read auth.password from stdin.")] = False,
    client_secret_stdin: Annotated[
        bool, typer.Option("--client-secret-stdin", help="Read the client secret (OAuth2 or Graph) from stdin.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Save the mail server of SCOPE, whole. Secrets stored before are kept when the document
    leaves them out, unless a destination field (host, port, security, token URL, …) changed."""
    import json

    from ..errors import SettingsError
    from ..settings import parse_server

    if password_stdin and client_secret_stdin:
        fail(EXIT_INPUT, "only one of --password-stdin, --client-secret-stdin can read stdin", as_json)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        secrets: dict[str, str] = {}
        if password_stdin or client_secret_stdin:
            server = parse_server(document)
            path = "auth.password" if password_stdin else _client_secret_field(server.kind, server.auth.method)
            value = read_secret(True)
            if not value:
                raise SettingsError([(path, "stdin gave an empty secret")])
            secrets[path] = value
    except OSError as e:
        fail(EXIT_INPUT, f"cannot read {file}: {e.strerror}", as_json)
    except ValueError as e:  # JSON errors and SettingsError alike
        fail_input(e if isinstance(e, SettingsError) else SettingsError([("", f"{file} is not JSON: {e}")]), as_json)

    async def work(mg: Mailgate) -> Any:
        return await mg.servers.set(scope, document, secrets=secrets)

    info = with_service(ctx, work, as_json)
    print(dumps(info.to_dict()) if as_json else f"saved the {_scope_name(scope)} mail server (version {info.version})")


def _client_secret_field(kind: str, method: str) -> str:
    if kind == "graph":
        return "graph.client_secret"
    if method == "oauth2":
        return "auth.token.client_secret"
    from ..errors import SettingsError

    raise SettingsError([("--client-secret-stdin", f"this mail server (auth {method}) has no client secret")])


@servers_app.command("show")
def servers_show(ctx: typer.Context, scope: Scope, as_json: JsonFlag = False) -> None:
    """Show the mail server of SCOPE. Secrets show only as {"set": true|false}."""

    async def work(mg: Mailgate) -> Any:
        return await mg.servers.get(scope)

    info = with_service(ctx, work, as_json)
    if info is None:
        if as_json:
            print(dumps({"scope": scope, "server": None}))
        else:
            print(f"no mail server is set for {scope}")
        return
    print(dumps(info.to_dict()) if as_json else _pretty(info.to_dict()))


@servers_app.command("enable")
def servers_enable(ctx: typer.Context, scope: Scope) -> None:
    """Switch the mail server of SCOPE on ("use mail server")."""

    async def work(mg: Mailgate) -> Any:
        return await mg.servers.enable(scope)

    print(f"the {_scope_name(scope)} mail server is on (version {with_service(ctx, work).version})")


@servers_app.command("disable")
def servers_disable(ctx: typer.Context, scope: Scope) -> None:
    """Switch the mail server of SCOPE off. Off for 'global' means no tenant can send."""

    async def work(mg: Mailgate) -> Any:
        return await mg.servers.disable(scope)

    print(f"the {_scope_name(scope)} mail server is off (version {with_service(ctx, work).version})")


@servers_app.command("delete")
def servers_delete(ctx: typer.Context, scope: Scope) -> None:
    """Delete the mail server of SCOPE and its stored secrets."""

    async def work(mg: Mailgate) -> None:
        await mg.servers.delete(scope)

    with_service(ctx, work)
    print(f"deleted the {_scope_name(scope)} mail server")


@servers_app.command("resolve")
def servers_resolve(ctx: typer.Context, tenant: TenantId, as_json: JsonFlag = False) -> None:
    """Which mail server TENANT sends through, and why."""

    async def work(mg: Mailgate) -> Any:
        return await mg.resolve(tenant)

    resolution = with_service(ctx, work, as_json)
    print(dumps(resolution.to_dict()) if as_json else resolution.reason)


def _scope_name(scope: str) -> str:
    return "global" if scope == "global" else f"{scope}'s"


def _pretty(value: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=2)


# ---- keys and the database ---------------------------------------------------------------------


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    new_key: Annotated[
        bool, typer.Option("--new-key", help="First put a new key in front of the key file (SQLite key file only).")
    ] = False,
) -> None:
    """Re-encrypt every stored secret under the newest key. Put the new key first in
    $MAILGATE_SECRET_KEYS (or use --new-key with a key file), rotate, then drop the old key."""
    import os

    from ..db.engine import database_url, sqlite_path
    from ..settings.secrets import ENV_KEYS, add_key_to_file, key_file_for

    if new_key:
        path = sqlite_path(database_url(ctx.obj["database_url"]))
        if os.environ.get(ENV_KEYS) or path is None:
            fail(EXIT_INPUT, f"--new-key works on the key file beside a SQLite database; with {ENV_KEYS}, "
                             "put the new key first there (make one with `mailgate keys generate`)")  # fmt: skip
        if key_file_for(path).exists():
            add_key_to_file(key_file_for(path))

    async def work(mg: Mailgate) -> int:
        return await mg.rotate_keys()

    print(f"re-encrypted {with_service(ctx, work)} secret(s) under the newest key")


@keys_app.command("generate")
def keys_generate() -> None:
    """Print a new key for $MAILGATE_SECRET_KEYS."""
    from ..settings.secrets import Keyring

    print(Keyring.generate())


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the database, or bring its schema up to date."""
    from ..db.engine import SCHEMA_REVISION

    async def work(mg: Mailgate) -> None:
        return None  # opening the service migrates

    with_service(ctx, work)
    print(f"the database schema is at revision {SCHEMA_REVISION}")
