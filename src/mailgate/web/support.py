"""The admin UI's "Contact support" form for a tenant (its tenant admin, and system admins) and the
global support address on the global page (system admins): the same service calls as the API's
/v1/support-requests and /v1/system-settings."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse

from ..accounts import UserInfo
from ..errors import InvalidInput, SendingDisabled
from ..outbox.store import MAX_ID
from ..support import ATTACHMENT_NAME, MAX_SUBJECT, MAX_TEXT, NoSupportAddress, attachment_bytes, system_information
from .pages import _back, _mg, page
from .session import ADMIN, checked_form, current_user

router = APIRouter(prefix=ADMIN, include_in_schema=False)
User = Annotated[UserInfo, Depends(current_user)]


async def _context(request: Request, user: UserInfo, tenant_id: str) -> dict[str, Any]:
    """The tenant, where its request would go, and the system information it would attach now."""
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    principal.may_see_tenant(tenant_id)
    mg = _mg(request, user)
    tenant = await mg.tenants.get(tenant_id)
    from ..support import support_route

    try:
        route = await support_route(mg, tenant)
    except NoSupportAddress:
        route = None
    preview = attachment_bytes(await system_information(mg, tenant_id)).decode()
    resolution = await mg.servers.resolve(tenant_id, secrets=False)
    return {"tenant": tenant, "route": route, "preview": preview, "attachment_name": ATTACHMENT_NAME,
            "max_subject": MAX_SUBJECT, "max_text": MAX_TEXT, "resolution": resolution}  # fmt: skip


@router.get("/tenants/{tenant_id}/support")
async def support_page(
    request: Request, tenant_id: str, user: User, sent: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None
) -> HTMLResponse:
    context = await _context(request, user, tenant_id)
    values = {"reply_to": user.email, "attach_system_info": True}
    return page(request, user, "support.html", values=values, problems={}, sent=sent, **context)


@router.post("/tenants/{tenant_id}/support")
async def send_support_request(request: Request, tenant_id: str, user: User) -> Response:
    form = await checked_form(request)
    context = await _context(request, user, tenant_id)
    subject, text, reply_to = form.get("subject") or "", form.get("text") or "", (form.get("reply_to") or "").strip()
    attach = bool(form.get("attach_system_info"))
    values = {"subject": subject, "text": text, "reply_to": reply_to, "attach_system_info": attach}
    problems: dict[str, list[str]] = {}
    try:
        done = await _mg(request, user).support_request(
            tenant_id, subject=subject, text=text, reply_to=reply_to or None, attach_system_info=attach
        )
    except InvalidInput as e:  # NoSupportAddress too: its field is support_address
        for path, problem in e.problems:
            problems.setdefault(path, []).append(problem)
    except SendingDisabled as e:
        problems["support_address"] = [f"sending is disabled: {e}"]
    if problems:
        return page(request, user, "support.html", status=422, values=values, problems=problems, sent=None,
                    **context)  # fmt: skip
    notice = f"Support request sent: message {done.id}."
    if done.warning:
        notice += f" Note: {done.warning}"
    return _back(request, f"{ADMIN}/tenants/{tenant_id}/support?sent={done.id}", notice, ok=done.warning is None)


@router.post("/system")
async def update_system_settings(request: Request, user: User) -> Response:
    """The global page's system settings form (system admins)."""
    form = await checked_form(request)
    user.principal.must_be("system-admin")
    address = (form.get("support_address") or "").strip()
    try:
        await _mg(request, user).system.update(support_address=address or None, clear_support_address=not address)
    except InvalidInput as e:
        return _back(request, f"{ADMIN}/global#system", "Not saved: " + str(e), ok=False)
    return _back(request, f"{ADMIN}/global#system", "System settings saved.")
