"""Tenants, mail servers (the global one and each tenant's own), delegated OAuth consent, and the
audit log. Servers are the settings document of DESIGN.md, read and written whole; secrets are
write-only: reading shows {"set": true|false}, and a changed destination must bring them again."""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations,
# and those of the routes made in _server_routes name a local type (their scope's dependency).
import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from ..errors import DeliveryError, InvalidInput, NotFound
from ..service import CALLBACK_PATH
from .deps import Acting, Service, Who
from .errors import ErrorReply
from .limits import while_connected
from .schemas import AuthorizeUrl, Json, TenantIn, TenantPatch, TenantPath, TenantQuery, TestEmailIn

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
    503: {"model": ErrorReply, "description": "The database can't be used just now: try again after Retry-After."},
}  # fmt: skip
router = APIRouter(responses=_ERRORS)
log = logging.getLogger("mailgate.api")
DOCUMENT = Body(
    description="The mail server document (DESIGN.md). Secrets: a value replaces the stored one, null removes it, "
    "absent or {\"set\": true} keeps it (unless a destination field changed).",
    examples=[{
        "kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
        "smtp": {"host": "smtp.example.com", "port": 587, "security": "starttls-required"},
        "auth": {"method": "password", "username": "u", "password": "p"},
    }],
)  # fmt: skip


# ---- mail servers: the global one and each tenant's own, the same routes under two prefixes ----


async def _global_scope(who: Who) -> str:
    who.must_manage_settings("global")
    return "global"


async def _tenant_scope(tenant: TenantPath, mg: Acting, who: Who) -> str:
    who.must_manage_settings(tenant)
    await mg.tenants.get(tenant)  # 404 for a tenant that does not exist, whoever asks
    return tenant


def _server_routes(prefix: str, scope_of: Callable[..., Awaitable[str]]) -> None:
    """GET/PUT/DELETE, enable, disable, health, test, and the OAuth consent of the mail server at
    `prefix`, whose scope ("global" or the tenant) and permission `scope_of` settles."""
    Scope = Annotated[str, Depends(scope_of)]
    servers: list[str | Enum] = ["mail servers"]
    oauth: list[str | Enum] = ["oauth"]

    @router.get(prefix, tags=servers)
    async def get_server(scope: Scope, mg: Acting) -> Json:
        """The mail server, secrets shown only as {"set": true|false}."""
        info = await mg.servers.get(scope)
        if info is None:
            raise NotFound([("server", f"no mail server is set for {scope}")])
        return info.to_dict()

    @router.put(prefix, tags=servers)
    async def set_server(scope: Scope, mg: Acting, document: Annotated[Json, DOCUMENT]) -> Json:
        """Save the mail server, whole."""
        return (await mg.servers.set(scope, document)).to_dict()

    @router.delete(prefix, status_code=204, tags=servers)
    async def delete_server(scope: Scope, mg: Acting) -> Response:
        """Remove the mail server: a tenant then sends through the global one; without the global
        one, sending is disabled for every tenant."""
        if await mg.servers.get(scope) is None:
            raise NotFound([("server", f"no mail server is set for {scope}")])
        await mg.servers.delete(scope)
        return Response(status_code=204)

    @router.post(prefix + "/enable", tags=servers)
    async def enable_server(scope: Scope, mg: Acting) -> Json:
        """Switch the mail server on ("use mail server")."""
        return (await mg.servers.enable(scope)).to_dict()

    @router.post(prefix + "/disable", tags=servers)
    async def disable_server(scope: Scope, mg: Acting) -> Json:
        """Switch the mail server off (the global one: no tenant can send)."""
        return (await mg.servers.disable(scope)).to_dict()

    @router.get(prefix + "/health", tags=servers)
    async def server_health(scope: Scope, mg: Acting) -> Json:
        """Status, last successful send, last failure, token expiry, consent, coming expiries."""
        return (await mg.servers.health(scope)).to_dict()

    @router.post(prefix + "/test", tags=servers, responses={
        429: {"model": ErrorReply, "description": "Too many test e-mails under way (for this mail server, or in all): "
                                                  "try again after Retry-After."},
    })  # fmt: skip
    async def test_server(scope: Scope, body: TestEmailIn, mg: Acting, request: Request) -> Any:
        """Send a test e-mail through the mail server: named steps that stop at the first failure,
        each with its duration, details, and for the failed one the cause and the fix. 200
        whether or not a step failed (`ok` says). At most 2 run at once per mail server (16 in
        all): 429 beyond. A client that goes away stops its run."""
        with request.app.state.test_emails.take(scope, "test e-mails"):
            answered, report = await while_connected(
                request, mg.test_server(scope, body.to, body.settings, dry_run=body.dry_run)
            )
        if not answered or report is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        return report.to_dict()

    @router.post(prefix + "/oauth/connect", response_model=AuthorizeUrl, tags=oauth)
    async def connect(scope: Scope, mg: Acting) -> Any:
        """Start the consent of the mail server (token source `delegated`): open the URL."""
        return {"authorize_url": await mg.begin_consent(scope)}

    @router.post(prefix + "/oauth/reset", tags=oauth)
    async def reset(scope: Scope, mg: Acting) -> Json:
        """Forget the mail server's stored tokens (the seed's "Reset")."""
        return (await mg.reset_consent(scope)).to_dict()


_server_routes("/v1/servers/global", _global_scope)
_server_routes("/v1/tenants/{tenant}/server", _tenant_scope)


# ---- delegated OAuth consent: where the provider comes back -------------------------------------


@router.get(CALLBACK_PATH, tags=["oauth"], status_code=303, response_class=RedirectResponse, responses={303: {}})
async def oauth_callback(
    request: Request,
    mg: Service,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str, Query(max_length=4000)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
    error_description: Annotated[str, Query(max_length=2000, description="Never shown.")] = "",
) -> RedirectResponse:
    """Where the provider sends the admin back after consent (no token: the state is the key).
    Redirects to a page that says whether the mailbox is connected: the mail server's page of the
    admin UI when the consent was started there, else a small page of its own. Anyone can make a
    link here, so neither page shows words from the link: the provider's `error` picks one of
    mailgate's sentences, and its `error_description` is never shown."""
    from ..web.session import SESSION_COOKIE, flash, server_page

    admin = SESSION_COOKIE in request.cookies
    scope = None
    if error:
        result = _OAUTH_ERRORS.get(error, "refused")
    else:
        try:
            connected = await mg.complete_consent(state, code)
        except InvalidInput as e:
            otherwise = "no_refresh_token" if e.field.startswith("auth.token") else "expired"
            result = _CONSENT_PROBLEMS.get(e.field, otherwise)
        except DeliveryError as e:
            # Its text quotes the token endpoint, which whoever set up the mail server chose: the
            # operator's log has it, no page does.
            log.warning("a consent's code was not exchanged: %s", e)
            result = "failed"
        else:
            result, scope = "connected", connected.scope
    ok, text = CONSENT_RESULTS[result]
    if not admin:
        return RedirectResponse(f"{CALLBACK_PATH}/done?{urlencode({'result': result})}", status_code=303)
    if scope is not None:  # the mailbox and tenant come from the stored settings, not the link
        text = f"Connected: {connected.mailbox} now sends the mail of {scope}."
    response = RedirectResponse("/admin" if scope is None else server_page(scope) + "#consent", status_code=303)
    flash(response, mg, text, ok=ok, secure=request.url.scheme == "https")
    return response


# What a consent's end may say: mailgate's own sentences, picked by a short code.
CONSENT_RESULTS: dict[str, tuple[bool, str]] = {
    "connected": (True, "The mailbox is connected: mailgate sends the mail server's mail through it now."),
    "denied": (False, "The consent was not given: the account that signed in declined it."),
    "consent_required": (False, "The provider wants an interactive sign-in or an administrator's consent first: "
                                "connect again and go through the provider's pages."),
    "misconfigured": (False, "The provider refused mailgate's request as it is set up: check the mail server's "
                             "client id and scope, and the redirect URL of the app's registration."),
    "provider_unavailable": (False, "The provider could not answer just now: connect again in a few minutes."),
    "refused": (False, "The provider refused the consent."),
    "expired": (False, "This consent is no longer under way (it was used or reset, took longer than 10 minutes, "
                       "or the mail server's settings changed): connect again from mailgate."),
    "no_refresh_token": (False, "The provider granted no refresh token, so mailgate can't stay connected: ask for "
                                "offline access in the scope (Google: access_type=offline) and connect again."),
    "failed": (False, "The provider's token endpoint refused the consent or could not be reached: connect again; "
                      "if it keeps failing, the operator's log has the error."),
}  # fmt: skip
CONSENT_RESULTS |= {
    "no_mailbox": (False, "The provider did not say which mailbox consented (no usable id_token): connect again, "
                          "signing in with the mailbox's own account."),
}  # fmt: skip
# A delegated Graph consent's problems, by the field they name (oauth/consent.py).
_CONSENT_PROBLEMS = {"graph.refresh_token": "no_refresh_token", "graph.mailbox": "no_mailbox"}
_UNKNOWN_RESULT = (False, "mailgate can't tell from this link how the consent ended: the mail server's page in "
                          "mailgate says whether it is connected.")  # fmt: skip
# RFC 6749 4.1.2.1 and OpenID Connect Core 3.1.2.6: the codes a provider sends back.
_OAUTH_ERRORS = {
    "access_denied": "denied",
    "consent_required": "consent_required",
    "interaction_required": "consent_required",
    "login_required": "consent_required",
    "account_selection_required": "consent_required",
    "invalid_request": "misconfigured",
    "invalid_client": "misconfigured",
    "unauthorized_client": "misconfigured",
    "unsupported_response_type": "misconfigured",
    "invalid_scope": "misconfigured",
    "server_error": "provider_unavailable",
    "temporarily_unavailable": "provider_unavailable",
}


@router.get(CALLBACK_PATH + "/done", response_class=HTMLResponse, tags=["oauth"], include_in_schema=False)
async def oauth_done(result: Annotated[str, Query(max_length=32)] = "") -> HTMLResponse:
    ok, text = CONSENT_RESULTS.get(result, _UNKNOWN_RESULT)
    title = "Mailbox connected" if ok else "Mailbox not connected"
    page = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{title}</title>"
        f"<h1>{title}</h1><p>{text}</p><p>You can close this window.</p></html>"
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
async def get_tenant(tenant: TenantPath, mg: Acting, who: Who) -> Json:
    who.must_be("system-admin", "tenant-admin")
    who.may_see_tenant(tenant)
    return (await mg.tenants.get(tenant)).to_dict()


@router.patch("/v1/tenants/{tenant}", tags=["tenants"])
async def update_tenant(tenant: TenantPath, body: TenantPatch, mg: Acting, who: Who) -> Json:
    """Change the fields given. A tenant admin may change only `admin_address`, and
    `support_address` when the tenant may set it."""
    who.must_be("system-admin", "tenant-admin")
    who.may_see_tenant(tenant)
    given = body.model_fields_set
    current = await mg.tenants.get(tenant)
    who.may_change_tenant_fields(tenant, given, may_set_support_address=current.may_set_support_address)
    return (
        await mg.tenants.update(
            tenant, name=body.name, may_use_own_server=body.may_use_own_server, support_address=body.support_address,
            clear_support_address="support_address" in given and body.support_address is None,
            may_set_support_address=body.may_set_support_address, admin_address=body.admin_address,
            clear_admin_address="admin_address" in given and body.admin_address is None,
        )
    ).to_dict()  # fmt: skip


@router.delete("/v1/tenants/{tenant}", status_code=204, tags=["tenants"])
async def remove_tenant(tenant: TenantPath, mg: Acting, who: Who) -> Response:
    """Remove a tenant, its own mail server and its API tokens (the audit log stays; its messages stay
    in the log until they are purged)."""
    who.must_be("system-admin")
    await mg.tenants.remove(tenant)
    return Response(status_code=204)


# ---- audit log ---------------------------------------------------------------------------------


@router.get("/v1/audit", tags=["audit"])
async def audit_log(
    mg: Acting, who: Who, tenant: TenantQuery = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[Json]:
    """Settings changes, newest first: all of them (system admin), or the tenant's (tenant admin)."""
    who.must_be("system-admin", "tenant-admin")
    tenant = who.tenant_for(tenant)
    return [r.to_dict() for r in await mg.audit_log(tenant, limit=limit)]
