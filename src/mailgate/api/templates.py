"""Notification templates: the built-in kinds and their overrides, global (/v1/templates/…) and per
tenant (/v1/tenants/{tenant}/templates/…). Reading is open to every role within its tenant;
changing the global defaults takes a system admin, a tenant's own a system admin or its tenant
admin (as for mail servers). Every change is audited (service layer)."""

# No `from __future__ import annotations`: FastAPI reads the annotations of the routes made in
# _template_routes, which name a local type.
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import Field

from ..notifications.engine import MAX_SOURCE, MAX_SUBJECT_SOURCE
from .deps import Acting, Who
from .errors import ErrorReply
from .schemas import AddressText, Json, TenantPath, TenantQuery, _Input

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
    503: {"model": ErrorReply, "description": "The database can't be used just now: try again after Retry-After."},
}  # fmt: skip
router = APIRouter(responses=_ERRORS)
TAGS: list[str | Enum] = ["templates"]
Name = Annotated[str, Path(min_length=1, max_length=64, pattern="^[a-z][a-z0-9_]*$", examples=["invitation"])]
Locale = Annotated[str, Path(min_length=2, max_length=16, examples=["nl", "nl-BE"])]
Data = Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=100)]


class TemplateIn(_Input):
    """A scope's override, whole: an empty `html` makes text-only messages."""

    subject: str = Field(max_length=MAX_SUBJECT_SOURCE)
    text: str = Field(max_length=MAX_SOURCE)
    html: str = Field("", max_length=MAX_SOURCE)


class PreviewIn(_Input):
    """Unsaved parts to render instead of the saved ones, and values (left out: the samples)."""

    subject: str | None = Field(None, max_length=MAX_SUBJECT_SOURCE)
    text: str | None = Field(None, max_length=MAX_SOURCE)
    html: str | None = Field(None, max_length=MAX_SOURCE)
    data: Data | None = None


class TemplateTestIn(_Input):
    """Send the template as the tenant has it to `to`, with `data` (left out: the samples)."""

    to: AddressText
    data: Data | None = None


@router.get("/v1/templates", tags=TAGS)
async def list_templates(mg: Acting, who: Who, tenant: TenantQuery = None) -> Json:
    """Every template: its variables (with sample values) and, per locale, whether the global
    defaults or the tenant (with `?tenant=`; a tenant's token: its own) override it."""
    tenant = who.tenant_for(tenant)
    return {"templates": [t.to_dict() for t in await mg.templates.list(tenant)]}


async def _global_read(who: Who) -> str | None:
    return None


async def _global_write(who: Who) -> str | None:
    who.must_manage_settings("global")
    return None


async def _tenant_read(tenant: TenantPath, who: Who) -> str | None:
    who.may_see_tenant(tenant)
    return tenant


async def _tenant_write(tenant: TenantPath, who: Who) -> str | None:
    who.must_manage_settings(tenant)
    return tenant


def _template_routes(
    prefix: str, read: Callable[..., Awaitable[str | None]], write: Callable[..., Awaitable[str | None]]
) -> None:
    Reading = Annotated[str | None, Depends(read)]
    Writing = Annotated[str | None, Depends(write)]

    @router.get(prefix + "/{name}/{locale}", tags=TAGS)
    async def get_template(name: Name, locale: Locale, scope: Reading, mg: Acting) -> Json:
        """The text this scope uses for the locale: `locale` in the answer is the one found (nl-BE
        falls back to nl, then en), `source` whose it is (built-in, global or tenant)."""
        return (await mg.templates.get(name, locale, scope)).to_dict()

    @router.put(prefix + "/{name}/{locale}", tags=TAGS)
    async def set_template(name: Name, locale: Locale, scope: Writing, mg: Acting, body: TemplateIn) -> Json:
        """Override the template in this locale for this scope. Checked in the sandbox: only the
        template's declared variables, no calls, no nested loops, bounded sizes."""
        return (await mg.templates.save(name, locale, scope, subject=body.subject, text=body.text,
                                        html=body.html)).to_dict()  # fmt: skip

    @router.delete(prefix + "/{name}/{locale}", tags=TAGS)
    async def reset_template(name: Name, locale: Locale, scope: Writing, mg: Acting) -> Json:
        """Remove this scope's override in this locale; answers what the scope uses now."""
        return (await mg.templates.reset(name, locale, scope)).to_dict()

    @router.post(prefix + "/{name}/{locale}/preview", tags=TAGS)
    async def preview_template(name: Name, locale: Locale, scope: Reading, mg: Acting, body: PreviewIn) -> Json:
        """Render with the sample values (or `data`), and unsaved parts if given. Show the HTML in a
        sandboxed frame only."""
        rendered = await mg.templates.preview(name, locale, scope, subject=body.subject, text=body.text,
                                              html=body.html, data=body.data)  # fmt: skip
        return rendered.to_dict()


_template_routes("/v1/templates", _global_read, _global_write)
_template_routes("/v1/tenants/{tenant}/templates", _tenant_read, _tenant_write)


@router.post("/v1/tenants/{tenant}/templates/{name}/{locale}/test", status_code=202, tags=TAGS)
async def test_template(
    name: Name, locale: Locale, scope: Annotated[str | None, Depends(_tenant_write)], mg: Acting, body: TemplateTestIn
) -> Json:
    """Send a test of the template, as the tenant has it, to one address (the samples fill what
    `data` leaves out). A message like any other: see it in /v1/messages."""
    assert scope is not None
    await mg.tenants.get(scope)  # 404 for a tenant that does not exist
    samples = mg.templates.sample_data(name)
    done = await mg.accept_template(scope, name, {**samples, **(body.data or {})}, to=[body.to], locale=locale)
    return {"id": done.id, "tenant": scope, "status": done.status, "replayed": done.replayed}
