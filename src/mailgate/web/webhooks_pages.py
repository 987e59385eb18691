"""The admin UI's webhooks of a tenant: the list with each one's state and last response, adding
one (its signing secret shown on that one page, never again), switching off and on, a new secret,
removing (after asking), and the latest deliveries with their last responses.

Who may: as for the tenant's mail server, `Principal.must_manage_settings(tenant)`. The rules (the
URL's form and destination policy, the event types, the bounds) are mg.webhooks' (webhooks.py).
A receiver's response is shown as mailgate kept it: an excerpt with control characters removed,
escaped by Jinja2 like every other value.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from ..errors import InvalidInput, NotFound
from ..events import EVENT_TYPES
from ..service import Mailgate
from .pages import User, _back, _scope, page
from .session import ADMIN, checked_form

router = APIRouter(prefix=ADMIN, include_in_schema=False)
DESCRIPTIONS = {
    "message.sent": "a message was accepted by the mail server (for at least one recipient)",
    "message.deferred": "an attempt failed for now; it is tried again later",
    "message.failed": "no recipient accepted the message, for good",
    "message.bounced": "a bounce came back after sending (coming with bounce processing)",
    "server.broken": "the mail server refused mailgate for good; mail waits",
    "server.recovered": "the mail server's settings were saved or it decrypts again; mail goes on",
}


def webhooks_page(tenant: str) -> str:
    return f"{ADMIN}/tenants/{tenant}/webhooks"


async def _context(mg: Mailgate, tenant: str) -> dict[str, Any]:
    return {
        "tenant": await mg.tenants.get(tenant),
        "hooks": await mg.webhooks.list(tenant),
        "deliveries": await mg.webhooks.deliveries(tenant, limit=50),
        "types": [(t, DESCRIPTIONS[t]) for t in EVENT_TYPES],
    }


@router.get("/tenants/{tenant}/webhooks")
async def webhooks_list(request: Request, tenant: str, user: User) -> HTMLResponse:
    mg = await _scope(request, user, tenant)
    return page(request, user, "webhooks.html", values={}, problems={}, **await _context(mg, tenant))


@router.post("/tenants/{tenant}/webhooks")
async def add_webhook(request: Request, tenant: str, user: User) -> Response:
    form = await checked_form(request)
    mg = await _scope(request, user, tenant)
    url = (form.get("url") or "").strip()
    chosen = [t for t in EVENT_TYPES if form.get(f"type:{t}")]
    try:
        secret, info = await mg.webhooks.create(tenant, url, chosen or None)
    except InvalidInput as e:
        problems: dict[str, list[str]] = {}
        for path, text in e.problems:
            problems.setdefault(path if path in ("url", "event_types") else "", []).append(text)
        values = {"url": url, "types": set(chosen)}
        context = await _context(mg, tenant)
        return page(request, user, "webhooks.html", 422, values=values, problems=problems, **context)
    # The secret is on this page and nowhere else: the reply is not cached, and no later page shows it.
    response = page(request, user, "webhook_secret.html", tenant=await mg.tenants.get(tenant), hook=info,
                    secret=secret)  # fmt: skip
    response.headers["Cache-Control"] = "no-store"
    return response


async def _hook(mg: Mailgate, tenant: str, webhook_id: str) -> int:
    if not webhook_id.isdigit() or not 0 < int(webhook_id) < 2**63:
        raise NotFound([("webhook", f"there is no webhook {webhook_id[:20]!r}")])
    return (await mg.webhooks.get(tenant, int(webhook_id))).id


@router.get("/tenants/{tenant}/webhooks/{webhook_id}/confirm/{action}")
async def confirm(request: Request, tenant: str, webhook_id: str, action: str, user: User) -> HTMLResponse:
    mg = await _scope(request, user, tenant)
    hook = await _hook(mg, tenant, webhook_id)
    questions = {
        "delete": "Remove this webhook? Its deliveries not made yet are dropped.",
        "rotate": "Make a new signing secret? The old one also signs for 24 hours, so the receiver can change over.",
    }
    if action not in questions:
        raise NotFound([("action", f"there is no action {action[:20]!r}")])
    return page(request, user, "confirm.html", target=f"{webhooks_page(tenant)}/{hook}/{action}",
                button="Make a new secret" if action == "rotate" else "Remove the webhook",
                question=questions[action], back=webhooks_page(tenant))  # fmt: skip


@router.post("/tenants/{tenant}/webhooks/{webhook_id}/{action}")
async def webhook_action(request: Request, tenant: str, webhook_id: str, action: str, user: User) -> Response:
    await checked_form(request)
    mg = await _scope(request, user, tenant)
    hook = await _hook(mg, tenant, webhook_id)
    if action == "delete":
        await mg.webhooks.delete(tenant, hook)
        return _back(request, webhooks_page(tenant), f"Webhook {hook} removed.")
    if action in ("enable", "disable"):
        await mg.webhooks.update(tenant, hook, enabled=action == "enable")
        return _back(
            request, webhooks_page(tenant), f"Webhook {hook} switched {'on' if action == 'enable' else 'off'}."
        )
    if action == "rotate":
        secret, info = await mg.webhooks.rotate(tenant, hook)
        response = page(request, user, "webhook_secret.html", tenant=await mg.tenants.get(tenant), hook=info,
                        secret=secret, rotated=True)  # fmt: skip
        response.headers["Cache-Control"] = "no-store"
        return response
    raise NotFound([("action", f"there is no action {action[:20]!r}")])
