"""Tenants, mail servers (the global one and each tenant's own), delegated OAuth consent, and the
audit log. Servers are the settings document of DESIGN.md, read and written whole; secrets are
write-only: reading shows {"set": true|false}, and a changed destination must bring them again."""

from __future__ import annotations

import html
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from ..errors import NotFound
from ..service import CALLBACK_PATH
from .deps import Acting, Service, Who
from .errors import ErrorReply
from .schemas import AuthorizeUrl, Json, TenantIn, TenantPatch, TestEmailIn

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
}  # fmt: skip
router = APIRouter(responses=_ERRORS)
DOCUMENT = Body(
    description="The mail server document (DESIGN.md). Secrets: a value replaces the stored one, null removes it, "
    "absent or {\"set\": true} keeps it (unless a destination field changed).",
    examples=[{
        "kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
        "smtp": {"host": "smtp.example.com", "port": 587, "security": "starttls-required"},
        "auth": {"method": "password", "username": "u", "password": "p"},
    }],
)  # fmt: skip


# ---- mail servers ------------------------------------------------------------------------------


async def _get_server(mg: Any, scope: str) -> Json:
    info = await mg.servers.get(scope)
    if info is None:
        raise NotFound([("server", f"no mail server is set for {scope}")])
    result: Json = info.to_dict()
    return result


@router.get("/v1/servers/global", tags=["mail servers"])
async def get_global_server(mg: Acting, who: Who) -> Json:
    """The global mail server, secrets shown only as {"set": true|false}."""
    who.must_manage_settings("global")
    return await _get_server(mg, "global")


@router.put("/v1/servers/global", tags=["mail servers"])
async def set_global_server(mg: Acting, who: Who, document: Annotated[Json, DOCUMENT]) -> Json:
    """Save the global mail server, whole."""
    who.must_manage_settings("global")
    result: Json = (await mg.servers.set("global", document)).to_dict()
    return result


@router.delete("/v1/servers/global", status_code=204, tags=["mail servers"])
async def delete_global_server(mg: Acting, who: Who) -> Response:
    """Remove the global mail server: sending is then disabled for every tenant."""
    who.must_manage_settings("global")
    await _delete(mg, "global")
    return Response(status_code=204)


@router.post("/v1/servers/global/enable", tags=["mail servers"])
async def enable_global_server(mg: Acting, who: Who) -> Json:
    who.must_manage_settings("global")
    result: Json = (await mg.servers.enable("global")).to_dict()
    return result


@router.post("/v1/servers/global/disable", tags=["mail servers"])
async def disable_global_server(mg: Acting, who: Who) -> Json:
    """Switch the global mail server off: no tenant can send."""
    who.must_manage_settings("global")
    result: Json = (await mg.servers.disable("global")).to_dict()
    return result


@router.get("/v1/tenants/{tenant}/server", tags=["mail servers"])
async def get_tenant_server(tenant: str, mg: Acting, who: Who) -> Json:
    """The tenant's own mail server, secrets shown only as {"set": true|false}."""
    await _may_manage(mg, who, tenant)
    return await _get_server(mg, tenant)


@router.put("/v1/tenants/{tenant}/server", tags=["mail servers"])
async def set_tenant_server(tenant: str, mg: Acting, who: Who, document: Annotated[Json, DOCUMENT]) -> Json:
    """Save the tenant's own mail server, whole."""
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.servers.set(tenant, document)).to_dict()
    return result


@router.delete("/v1/tenants/{tenant}/server", status_code=204, tags=["mail servers"])
async def delete_tenant_server(tenant: str, mg: Acting, who: Who) -> Response:
    """Remove the tenant's own mail server: it sends through the global one."""
    await _may_manage(mg, who, tenant)
    await _delete(mg, tenant)
    return Response(status_code=204)


@router.post("/v1/tenants/{tenant}/server/enable", tags=["mail servers"])
async def enable_tenant_server(tenant: str, mg: Acting, who: Who) -> Json:
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.servers.enable(tenant)).to_dict()
    return result


@router.post("/v1/tenants/{tenant}/server/disable", tags=["mail servers"])
async def disable_tenant_server(tenant: str, mg: Acting, who: Who) -> Json:
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.servers.disable(tenant)).to_dict()
    return result


async def _may_manage(mg: Any, who: Any, tenant: str) -> None:
    who.must_manage_settings(tenant)
    await mg.tenants.get(tenant)  # 404 for a tenant that does not exist, whoever asks


async def _delete(mg: Any, scope: str) -> None:
    if await mg.servers.get(scope) is None:
        raise NotFound([("server", f"no mail server is set for {scope}")])
    await mg.servers.delete(scope)


# ---- credential health -------------------------------------------------------------------------


@router.get("/v1/servers/global/health", tags=["mail servers"])
async def global_server_health(mg: Acting, who: Who) -> Json:
    """Status, last successful send, last failure, token expiry, consent, coming expiries."""
    who.must_manage_settings("global")
    result: Json = (await mg.servers.health("global")).to_dict()
    return result


@router.get("/v1/tenants/{tenant}/server/health", tags=["mail servers"])
async def tenant_server_health(tenant: str, mg: Acting, who: Who) -> Json:
    """The tenant's own mail server: status, last successful send, last failure, token expiry."""
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.servers.health(tenant)).to_dict()
    return result


# ---- the test e-mail ---------------------------------------------------------------------------


@router.post("/v1/servers/global/test", tags=["mail servers"])
async def test_global_server(body: TestEmailIn, mg: Acting, who: Who) -> Json:
    """Send a test e-mail through the global mail server: named steps that stop at the first
    failure, each with its duration, details, and for the failed one the cause and the fix.
    200 whether or not a step failed (`ok` says)."""
    who.must_manage_settings("global")
    result: Json = (await mg.test_server("global", body.to, body.settings, dry_run=body.dry_run)).to_dict()
    return result


@router.post("/v1/tenants/{tenant}/server/test", tags=["mail servers"])
async def test_tenant_server(tenant: str, body: TestEmailIn, mg: Acting, who: Who) -> Json:
    """Send a test e-mail through the tenant's own mail server, as named steps (see the global one)."""
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.test_server(tenant, body.to, body.settings, dry_run=body.dry_run)).to_dict()
    return result


# ---- delegated OAuth consent -------------------------------------------------------------------


@router.post("/v1/servers/global/oauth/connect", response_model=AuthorizeUrl, tags=["oauth"])
async def connect_global(mg: Acting, who: Who) -> Any:
    """Start the consent of the global mail server (token source `delegated`): open the URL."""
    who.must_manage_settings("global")
    return {"authorize_url": await mg.begin_consent("global")}


@router.post("/v1/servers/global/oauth/reset", tags=["oauth"])
async def reset_global(mg: Acting, who: Who) -> Json:
    """Forget the global mail server's stored tokens."""
    who.must_manage_settings("global")
    result: Json = (await mg.reset_consent("global")).to_dict()
    return result


@router.post("/v1/tenants/{tenant}/server/oauth/connect", response_model=AuthorizeUrl, tags=["oauth"])
async def connect_tenant(tenant: str, mg: Acting, who: Who) -> Any:
    """Start the consent of the tenant's mail server (token source `delegated`): open the URL."""
    await _may_manage(mg, who, tenant)
    return {"authorize_url": await mg.begin_consent(tenant)}


@router.post("/v1/tenants/{tenant}/server/oauth/reset", tags=["oauth"])
async def reset_tenant(tenant: str, mg: Acting, who: Who) -> Json:
    """Forget the tenant's mail server's stored tokens (the seed's "Reset")."""
    await _may_manage(mg, who, tenant)
    result: Json = (await mg.reset_consent(tenant)).to_dict()
    return result


@router.get(CALLBACK_PATH, tags=["oauth"], status_code=303, response_class=RedirectResponse, responses={303: {}})
async def oauth_callback(
    mg: Service,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str, Query(max_length=4000)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
    error_description: Annotated[str, Query(max_length=2000)] = "",
) -> RedirectResponse:
    """Where the provider sends the admin back after consent (no token: the state is the key).
    Redirects to a page that says whether the mailbox is connected."""
    from ..errors import DeliveryError, InvalidInput

    if error:
        return _done(ok=False, text=f"The consent was not given: {error}. {error_description}".strip())
    try:
        result = await mg.complete_consent(state, code)
    except (InvalidInput, DeliveryError) as e:
        return _done(ok=False, text=str(e))
    return _done(ok=True, text=f"Connected: {result.mailbox} now sends the mail of {result.scope}.")


def _done(*, ok: bool, text: str) -> RedirectResponse:
    return RedirectResponse(f"{CALLBACK_PATH}/done?{urlencode({'ok': int(ok), 'text': text[:500]})}", status_code=303)


@router.get(CALLBACK_PATH + "/done", response_class=HTMLResponse, tags=["oauth"], include_in_schema=False)
async def oauth_done(ok: int = 0, text: str = "") -> HTMLResponse:
    title = "Mailbox connected" if ok else "Mailbox not connected"
    page = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{title}</title>"
        f"<h1>{title}</h1><p>{html.escape(text[:500])}</p><p>You can close this window.</p></html>"
    )
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'"})


# ---- tenants -----------------------------------------------------------------------------------


@router.get("/v1/tenants", tags=["tenants"])
async def list_tenants(mg: Acting, who: Who) -> list[Json]:
    """Every tenant (system admin); a tenant admin sees its own."""
    who.must_be("system-admin", "tenant-admin")
    if who.is_system_admin:
        return [t.to_dict() for t in await mg.tenants.list()]
    return [(await mg.tenants.get(who.tenant or "")).to_dict()]


@router.post("/v1/tenants", status_code=201, tags=["tenants"], responses={409: {"model": ErrorReply}})
async def add_tenant(body: TenantIn, mg: Acting, who: Who, response: Response) -> Json:
    who.must_be("system-admin")
    info = await mg.tenants.add(
        body.id, name=body.name, may_use_own_server=body.may_use_own_server, support_address=body.support_address,
        may_set_support_address=body.may_set_support_address, admin_address=body.admin_address,
    )  # fmt: skip
    response.headers["Location"] = f"/v1/tenants/{info.id}"
    return info.to_dict()


@router.get("/v1/tenants/{tenant}", tags=["tenants"])
async def get_tenant(tenant: str, mg: Acting, who: Who) -> Json:
    who.must_be("system-admin", "tenant-admin")
    who.may_see_tenant(tenant)
    return (await mg.tenants.get(tenant)).to_dict()


@router.patch("/v1/tenants/{tenant}", tags=["tenants"])
async def update_tenant(tenant: str, body: TenantPatch, mg: Acting, who: Who) -> Json:
    """Change the fields given. A tenant admin may change only `admin_address`, and
    `support_address` when the tenant may set it."""
    who.must_be("system-admin", "tenant-admin")
    who.may_see_tenant(tenant)
    given = body.model_fields_set
    if not who.is_system_admin:
        from ..access import Forbidden

        if others := given - {"support_address", "admin_address"}:
            raise Forbidden(f"only a system admin changes {', '.join(sorted(others))}")
        if "support_address" in given and not (await mg.tenants.get(tenant)).may_set_support_address:
            raise Forbidden("this tenant may not set its support address (a system admin decides)")
    return (
        await mg.tenants.update(
            tenant, name=body.name, may_use_own_server=body.may_use_own_server, support_address=body.support_address,
            clear_support_address="support_address" in given and body.support_address is None,
            may_set_support_address=body.may_set_support_address, admin_address=body.admin_address,
            clear_admin_address="admin_address" in given and body.admin_address is None,
        )
    ).to_dict()  # fmt: skip


@router.delete("/v1/tenants/{tenant}", status_code=204, tags=["tenants"])
async def remove_tenant(tenant: str, mg: Acting, who: Who) -> Response:
    """Remove a tenant, its own mail server and its API tokens (the audit log stays; its messages stay
    in the log until they are purged)."""
    who.must_be("system-admin")
    await mg.tenants.remove(tenant)
    return Response(status_code=204)


# ---- audit log ---------------------------------------------------------------------------------


@router.get("/v1/audit", tags=["audit"])
async def audit_log(
    mg: Acting, who: Who, tenant: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[Json]:
    """Settings changes, newest first: all of them (system admin), or the tenant's (tenant admin)."""
    who.must_be("system-admin", "tenant-admin")
    tenant = who.tenant_for(tenant)
    return [r.to_dict() for r in await mg.audit_log(tenant, limit=limit)]
