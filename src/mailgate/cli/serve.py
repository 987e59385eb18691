"""`mailgate serve` (the API, and a worker in the same process unless --no-worker) and
`mailgate tokens …` (the API's bearer tokens)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import EXIT_INPUT, app, dumps, fail, tokens_app, with_service

if TYPE_CHECKING:
    from ..service import Mailgate

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(help="Listen on this address (default: $MAILGATE_LISTEN_HOST, 127.0.0.1).", show_default=False),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen on this port (default: $MAILGATE_LISTEN_PORT, 8000).", show_default=False)
    ] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Only the API; run `mailgate worker` apart.")] = False,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Also capture mail: a local SMTP server on 127.0.0.1 becomes the global mail server (if none is "
            "set), a demo admin is made (its password printed), and /admin/captured shows what arrived.",
        ),
    ] = False,
    smtp_port: Annotated[
        int | None,
        typer.Option(
            help="Also take mail by SMTP submission on this port (587; off by default, on a free "
            "loopback port with --demo). STARTTLS, then AUTH with an API token.",
            show_default=False,
        ),
    ] = None,
    smtp_host: Annotated[str, typer.Option(help="The SMTP submission server's address.")] = "127.0.0.1",
    smtp_cert: Annotated[
        str | None,
        typer.Option(help="Its TLS certificate, PEM (default: $MAILGATE_SMTP_CERT).", show_default=False),
    ] = None,
    smtp_key: Annotated[
        str | None, typer.Option(help="Its TLS key, PEM (default: $MAILGATE_SMTP_KEY).", show_default=False)
    ] = None,
) -> None:
    """Run the HTTP API (docs at /docs), the admin UI (/admin) and a delivery worker. SIGTERM or
    Ctrl-C stops them gracefully: requests under way are answered, sends under way finish, the
    rest waits."""
    import dataclasses
    import logging

    logging.getLogger("mailgate").setLevel(logging.INFO)

    async def work(mg: Mailgate) -> None:
        import uvicorn

        from ..api import create_app

        config = mg.config
        listen_host, listen_port = host or config.listen_host, port or config.listen_port
        if not 0 < listen_port < 65536:
            fail(EXIT_INPUT, f"--port is a TCP port, 1-65535, not {listen_port}")
        mg.config = dataclasses.replace(config, listen_host=listen_host, listen_port=listen_port)
        shown = f"[{listen_host}]" if ":" in listen_host else listen_host
        worker = "no worker (run `mailgate worker`)" if no_worker else "with a delivery worker"

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if self.started:
                    print(
                        f"mailgate: listening on http://{shown}:{listen_port} (admin UI: /admin, API docs: /docs), "
                        f"{worker}",
                        flush=True,
                    )

            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                # uvicorn raises the signal again once it has shut down, which would end the
                # process before the database is closed: the shutdown is complete, exit 0.
                self._captured_signals.clear()

        api = create_app(mg, worker=not no_worker)
        capture = None
        if demo:
            from ..capture import CaptureServer

            capture = CaptureServer("127.0.0.1", 0)
            await capture.start()
            api.state.capture = capture
            await _demo(mg, capture.port, f"http://{shown}:{listen_port}")
        ingress = await _start_ingress(mg, smtp_port, smtp_host, smtp_cert, smtp_key, demo=demo)
        server = Server(
            uvicorn.Config(
                api, host=listen_host, port=listen_port, log_level="warning",
                timeout_graceful_shutdown=int(config.stop_grace), server_header=False,
            )
        )  # fmt: skip
        if not demo and not await mg.users.any():
            print("mailgate: no admin UI user exists yet. Make the first one with:\n"
                  f"    {_command()} users create you@example.com --role system-admin", flush=True)  # fmt: skip
        if not await mg.api_tokens.any_system_admin():
            print("mailgate: no API token exists yet. Make the first admin token with:\n"
                  f"    {_command()} tokens create --role system-admin\n"
                  "(in this directory, or with the same --database-url); it is shown once.", flush=True)  # fmt: skip
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way of saying it could not start (it logged why)
            fail(1, f"could not serve on {shown}:{listen_port} (the reason is above)")
        finally:
            if ingress is not None:
                await ingress.aclose()
            if capture is not None:
                await capture.aclose()
        print("mailgate: stopped", flush=True)

    with_service(ctx, work)


async def _start_ingress(
    mg: Mailgate, port: int | None, host: str, cert: str | None, key: str | None, *, demo: bool
) -> Any:
    """The SMTP submission server (ingress.py), when --smtp-port or --demo asks for it. --demo
    without a certificate makes a self-signed one (clients must be told not to verify it)."""
    if port is None and not demo:
        return None
    import shutil
    import tempfile
    from pathlib import Path

    from ..ingress import IngressServer, self_signed, server_context

    if port is not None and not 0 <= port < 65536:
        fail(EXIT_INPUT, f"--smtp-port is a TCP port, 1-65535 (or 0: any free one), not {port}")
    cert, key = cert or mg.config.smtp_cert or None, key or mg.config.smtp_key or None
    scratch: Path | None = None
    if (cert is None) != (key is None):
        fail(EXIT_INPUT, "the SMTP ingress needs both a certificate and its key (--smtp-cert and --smtp-key)")
    if cert is None or key is None:
        if not demo:
            fail(EXIT_INPUT, "the SMTP ingress needs a TLS certificate: set MAILGATE_SMTP_CERT and MAILGATE_SMTP_KEY "
                             "(or --smtp-cert/--smtp-key); tokens never cross a connection in clear")  # fmt: skip
        scratch = Path(tempfile.mkdtemp(prefix="mailgate-smtp-"))
        cert_file, key_file = self_signed(scratch)
        cert, key = str(cert_file), str(key_file)
    if demo and port is None:
        host, port = "127.0.0.1", 0
    try:
        tls = server_context(cert, key)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        fail(EXIT_INPUT, f"the SMTP ingress's certificate or key can't be loaded: {type(e).__name__}")
    finally:
        if scratch is not None:  # the context holds the demo's key now: no copy left on disk
            shutil.rmtree(scratch, ignore_errors=True)
    assert port is not None
    ingress = IngressServer(mg, host, port, tls, max_connections=mg.config.smtp_max_connections,
                            max_connections_per_address=mg.config.smtp_max_connections_per_address,
                            token_rate=mg.config.smtp_token_rate)  # fmt: skip
    try:
        await ingress.start()
    except OSError as e:
        fail(1, f"could not take SMTP on {host}:{port}: {e.strerror or type(e).__name__}")
    shown = f"[{host}]" if ":" in host else host
    made = " with a self-signed certificate" if scratch is not None else ""
    print(f"mailgate: SMTP submission on {shown}:{ingress.port}{made} (STARTTLS, then AUTH PLAIN/LOGIN: user = "
          "tenant id, password = a sender API token)", flush=True)  # fmt: skip
    if demo:
        await _demo_smtp_howto(mg, shown, ingress.port, self_signed=scratch is not None)
    return ingress


async def _demo_smtp_howto(mg: Mailgate, host: str, port: int, *, self_signed: bool) -> None:
    """How to send to the demo's SMTP ingress, step by step: the line above is the short form."""
    from ..errors import NotFound

    try:
        await mg.tenants.get("demo")
        tenant = "demo"
    except NotFound:  # tenants existed before the first --demo start: no demo tenant was made
        tenant = "TENANT"
    certificate = ("its certificate is self-signed: tell the client not to verify it (demo only)" if self_signed
                   else "its certificate is the one given (--smtp-cert or MAILGATE_SMTP_CERT)")  # fmt: skip
    print(f"mailgate: demo: to send by SMTP: host {host}, port {port}; STARTTLS is required and {certificate}; "
          f"user {tenant}, password a sender token of tenant {tenant}, made (and shown once) with:\n"
          f"    {_command()} tokens create --role sender --tenant {tenant}\n"
          "          (in this directory, or with the same --database-url)", flush=True)  # fmt: skip


DEMO_ADMIN = "demo-admin@example.com"
DEMO_SENDER = "mailgate demo"


async def _demo(mg: Mailgate, port: int, url: str) -> None:
    """Demo mode: the capture server becomes the global mail server unless another one is set (a
    demo server of an earlier run is moved to this run's port), the demo admin gets a new password,
    and a first tenant with a welcome message shows mail flowing."""
    import secrets

    from ..errors import NotFound
    from ..message import Message

    current = await mg.servers.get("global")
    ours = current is not None and current.document.get("from_name") == DEMO_SENDER and (
        current.document.get("smtp") or {}).get("host") == "127.0.0.1"  # fmt: skip
    if current is None or ours:
        await mg.servers.set("global", {
            "kind": "smtp", "enabled": True, "from_address": "no-reply@example.com", "from_name": DEMO_SENDER,
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none"}, "auth": {"method": "none"},
        })  # fmt: skip
        print(
            f"mailgate: demo: mail is captured on 127.0.0.1:{port} (the global mail server); see {url}/admin/captured"
        )
    else:
        print(f"mailgate: demo: a global mail server is already set, so it stays; the capture server on "
              f"127.0.0.1:{port} gets only what is sent to it")  # fmt: skip
    password = secrets.token_urlsafe(12)
    try:
        await mg.users.set_password(DEMO_ADMIN, password)
    except NotFound:
        await mg.users.create(DEMO_ADMIN, password, "system-admin")
    print(
        f"mailgate: demo admin: sign in at {url}/admin as {DEMO_ADMIN} with the password {password}\n"
        "          (a new one is made at every --demo start; it is not stored or shown anywhere else)",
        flush=True,
    )
    if not await mg.tenants.list():
        await mg.tenants.add("demo", name="Demo tenant", admin_address=DEMO_ADMIN)
        await mg.submit("demo", Message(
            to="someone@example.com", subject="Welcome to mailgate",
            text="This message went through mailgate's outbox and its worker to the capture server.\n",
            html="<h1>Welcome to mailgate</h1><p>This message went through mailgate's outbox and its worker "
                 "to the capture server.</p>",
        ))  # fmt: skip


def _command() -> str:
    """How to call this mailgate again from here: `mailgate` when that is what PATH finds, else
    the path it was started by (`make run` starts .venv/bin/mailgate)."""
    import os
    import shutil

    me = os.path.realpath(sys.argv[0])
    found = shutil.which("mailgate")
    if found is not None and os.path.realpath(found) == me:
        return "mailgate"
    return os.path.relpath(me) if not os.path.relpath(me).startswith("..") else me


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(help="system-admin, tenant-admin or sender.", show_default=False)],
    tenant: Annotated[str | None, typer.Option(help="The tenant (tenant-admin and sender tokens).")] = None,
    name: Annotated[str, typer.Option(help="What the token is for (shown in `tokens list`).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Make a token. It is printed once, now: mailgate keeps only its hash."""

    async def work(mg: Mailgate) -> Any:
        return await mg.api_tokens.create(role, tenant, name=name)

    token, info = with_service(ctx, work, as_json)
    if as_json:
        print(dumps({"token": token, **info.to_dict()}))
        return
    print(token)
    print(f"token {info.id}: {info.role}{' of ' + info.tenant if info.tenant else ''}. Keep it now: it is not "
          "shown again (only its hash is stored).", file=sys.stderr)  # fmt: skip


@tokens_app.command("list")
def tokens_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Revoked tokens too.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The tokens (never the tokens themselves: their first characters, role and tenant)."""

    async def work(mg: Mailgate) -> Any:
        return await mg.api_tokens.list(include_revoked=all_)

    tokens = with_service(ctx, work, as_json)
    if as_json:
        print(dumps([t.to_dict() for t in tokens]))
        return
    for t in tokens:
        used = f"used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
        revoked = f"  REVOKED {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else ""
        print(f"{t.id:>5}  {t.prefix}…  {t.role:<13} {t.tenant or '-':<16} {used:<22} {t.name}{revoked}")


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context, token_id: Annotated[int, typer.Argument(help="The token's id (tokens list).")]
) -> None:
    """Revoke a token: it stops working at once in new processes, within 2 s in running ones."""

    async def work(mg: Mailgate) -> Any:
        return await mg.api_tokens.revoke(token_id)

    with_service(ctx, work)
    print(f"revoked token {token_id}")
