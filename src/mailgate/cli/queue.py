"""`mailgate worker` and `mailgate queue …`: delivering the outbox, and the operator's view of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import EXIT_INPUT, app, dumps, fail, queue_app, with_service

if TYPE_CHECKING:
    from ..service import Mailgate

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
MessageId = Annotated[int, typer.Argument(help="The message's id (as `send` and `queue list` show it).")]


@app.command()
def worker(
    ctx: typer.Context,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Stop when no message is due.")] = False,
) -> None:
    """Deliver queued messages until stopped (SIGTERM or Ctrl-C: sends under way finish, the rest
    is given back for the next worker). Several workers may share one PostgreSQL database."""
    import asyncio
    import logging
    import signal

    logging.getLogger("mailgate").setLevel(logging.INFO)

    async def work(mg: Mailgate) -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await mg.run_worker(stop, until_idle=until_idle)

    stats = with_service(ctx, work)
    print(f"worker stopped: {stats.sent} sent, {stats.deferred} deferred, {stats.failed} failed, "
          f"{stats.released} given back")  # fmt: skip


@queue_app.command("list")
def queue_list(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's messages.")] = None,
    status: Annotated[str | None, typer.Option(help="Only messages with this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List messages, newest first."""

    async def work(mg: Mailgate) -> Any:
        return await mg.queue.list_messages(tenant_id=tenant, status=status, limit=limit)

    messages = with_service(ctx, work, as_json)
    if as_json:
        print(dumps([m.to_dict() for m in messages]))
        return
    for m in messages:
        r = m.recipients
        print(f"{m.id:>8}  {m.status:<9} {m.tenant:<16} {m.created_at:%Y-%m-%d %H:%M:%S}  "
              f"{r['accepted']}/{sum(r.values())} accepted  {m.subject[:40]}")  # fmt: skip


@queue_app.command("show")
def queue_show(ctx: typer.Context, message: MessageId, as_json: JsonFlag = False) -> None:
    """A message: status, every recipient's outcome, every attempt with the server's replies."""

    async def work(mg: Mailgate) -> Any:
        return await mg.queue.get(message)

    detail = with_service(ctx, work, as_json).to_dict()
    if as_json:
        print(dumps(detail))
        return
    for key in ("id", "tenant", "status", "subject", "message_id", "created_at", "attempts", "next_attempt_at",
                "last_error", "body_purged"):  # fmt: skip
        print(f"{key + ':':<17} {'' if detail[key] is None else detail[key]}")
    print("recipients:")
    for r in detail["recipient_outcomes"]:
        reply = " ".join(str(x) for x in (r["code"], r["enhanced"], r["text"]) if x)
        print(f"  {r['status']:<9} {r['recipient']}  {reply}")
    print("attempts:")
    for a in detail["attempt_log"]:
        server = a["server"]["address"] or a["server"]["scope"] or "-"
        print(f"  #{a['number']} {a['started_at']} {a['duration_ms']} ms via {server}: {a['outcome']} {a['text']}")
        if a["note"]:
            print(f"     note: {a['note']}")


@queue_app.command("retry")
def queue_retry(
    ctx: typer.Context,
    message: Annotated[int | None, typer.Argument(help="The message's id.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed message instead of one.")] = False,
    tenant: Annotated[str | None, typer.Option(help="With --failed: only this tenant's.")] = None,
) -> None:
    """Send a message again now, to every recipient that has not accepted it."""
    if (message is None) == (not failed):
        fail(EXIT_INPUT, "give a message id, or --failed")

    async def work(mg: Mailgate) -> Any:
        if failed:
            return await mg.queue.retry_failed(tenant_id=tenant)
        return await mg.queue.retry(message)  # type: ignore[arg-type]

    result = with_service(ctx, work)
    print(f"queued again: {len(result)} failed message(s)" if failed else f"queued again: message {message}")


@queue_app.command("cancel")
def queue_cancel(ctx: typer.Context, message: MessageId) -> None:
    """Cancel a message that is waiting (queued, deferred or held)."""

    async def work(mg: Mailgate) -> Any:
        return await mg.queue.cancel(message)

    with_service(ctx, work)
    print(f"cancelled message {message}")


@queue_app.command("stats")
def queue_stats(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """How many messages are in each status, how many are due, and the oldest waiting one's age."""

    async def work(mg: Mailgate) -> Any:
        return await mg.queue.stats()

    stats = with_service(ctx, work, as_json)
    if as_json:
        print(dumps(stats))
        return
    for status, n in stats["by_status"].items():
        print(f"{status + ':':<11} {n}")
    print(f"due now:    {stats['due_now']}")
    age = stats["oldest_waiting_age_s"]
    print(f"oldest waiting: {'-' if age is None else f'{age:.0f} s'}")


@queue_app.command("purge")
def queue_purge(ctx: typer.Context) -> None:
    """Remove old bodies and log lines now (the worker also does it by itself)."""

    async def work(mg: Mailgate) -> Any:
        return await mg.queue.purge()

    bodies, lines = with_service(ctx, work)
    print(f"removed {bodies} message bodies and {lines} old messages")
