"""Delivery events for pollers (`GET /v1/events?after=`) and tenants' webhooks
(/v1/tenants/{tenant}/webhooks). Events: any role within its tenant (a system admin: any tenant,
or all). Webhooks: a system admin, or the tenant's admin (as for its mail server). The signing
secret is in the reply that makes it (and a rotation's), never again."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import Field

from ..events import EVENT_TYPES, MAX_PAGE
from ..webhooks import MAX_URL
from .deps import Acting, Who
from .errors import ErrorReply
from .schemas import Json, TenantPath, TenantQuery, _Input

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
    503: {"model": ErrorReply, "description": "The database can't be used just now: try again after Retry-After."},
}  # fmt: skip
router = APIRouter(responses=_ERRORS)
TAGS: list[str | Enum] = ["events"]
WebhookId = Annotated[int, Path(ge=1, le=2**63 - 1)]
EventType = Annotated[str, Field(max_length=32, examples=list(EVENT_TYPES))]


class WebhookIn(_Input):
    """A webhook: where to POST (https), which event types (left out: all), on or off."""

    url: str = Field(max_length=MAX_URL, examples=["https://app.example.com/hooks/mailgate"])
    event_types: list[EventType] | None = Field(None, max_length=len(EVENT_TYPES))
    enabled: bool = True


class WebhookChange(_Input):
    enabled: bool | None = None
    event_types: list[EventType] | None = Field(None, max_length=len(EVENT_TYPES))


@router.get("/v1/events", tags=TAGS)
async def list_events(
    mg: Acting,
    who: Who,
    tenant: TenantQuery = None,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> Json:
    """The tenant's events after id `after`, oldest first, and `next`: the `after` of the next
    call (the same when there was nothing new). Ids only grow; events are kept 30 days."""
    events = await mg.events.list(who.tenant_for(tenant), after=after, limit=limit)
    return {"events": [e.to_dict() for e in events], "next": events[-1].id if events else after}


@router.post("/v1/tenants/{tenant}/webhooks", status_code=201, tags=TAGS)
async def add_webhook(tenant: TenantPath, body: WebhookIn, mg: Acting, who: Who) -> Json:
    """Make a webhook. The reply holds its signing secret (`whsec_…`): shown this once."""
    who.must_manage_settings(tenant)
    secret, info = await mg.webhooks.create(tenant, body.url, body.event_types, enabled=body.enabled)
    return {**info.to_dict(), "secret": secret}


@router.get("/v1/tenants/{tenant}/webhooks", tags=TAGS)
async def list_webhooks(tenant: TenantPath, mg: Acting, who: Who) -> Json:
    who.must_manage_settings(tenant)
    await mg.tenants.get(tenant)
    return {"webhooks": [w.to_dict() for w in await mg.webhooks.list(tenant)]}


@router.get("/v1/tenants/{tenant}/webhooks/{webhook_id}", tags=TAGS)
async def get_webhook(tenant: TenantPath, webhook_id: WebhookId, mg: Acting, who: Who) -> Json:
    """The webhook, and its latest deliveries with their last responses."""
    who.must_manage_settings(tenant)
    info = await mg.webhooks.get(tenant, webhook_id)
    return {**info.to_dict(), "deliveries": await mg.webhooks.deliveries(tenant, webhook_id)}


@router.patch("/v1/tenants/{tenant}/webhooks/{webhook_id}", tags=TAGS)
async def change_webhook(tenant: TenantPath, webhook_id: WebhookId, body: WebhookChange, mg: Acting, who: Who) -> Json:
    """Switch it on or off, or change its event types."""
    who.must_manage_settings(tenant)
    return (await mg.webhooks.update(tenant, webhook_id, enabled=body.enabled, event_types=body.event_types)).to_dict()


@router.post("/v1/tenants/{tenant}/webhooks/{webhook_id}/rotate", tags=TAGS)
async def rotate_webhook_secret(tenant: TenantPath, webhook_id: WebhookId, mg: Acting, who: Who) -> Json:
    """A new signing secret, shown this once; the old one signs too for 24 hours."""
    who.must_manage_settings(tenant)
    secret, info = await mg.webhooks.rotate(tenant, webhook_id)
    return {**info.to_dict(), "secret": secret}


@router.delete("/v1/tenants/{tenant}/webhooks/{webhook_id}", status_code=204, tags=TAGS)
async def remove_webhook(tenant: TenantPath, webhook_id: WebhookId, mg: Acting, who: Who) -> Response:
    who.must_manage_settings(tenant)
    await mg.webhooks.delete(tenant, webhook_id)
    return Response(status_code=204)
