"""The admin UI's notification template editor: the templates of a scope (the global defaults, or a
tenant's own), one template's subject, text and HTML in one locale with a live preview of the
sample data, reset to the default, and a test message through the outbox.

Who may: as for mail servers, `Principal.must_manage_settings(scope)` — a system admin for every
scope, a tenant admin for their tenant only. The rules of what a template may hold, the fallback
between locales and scopes, and the audit are mg.templates' (notifications/store.py).

Template HTML is written by tenant admins, who are untrusted: it is shown only inside an
`<iframe sandbox srcdoc>` (an opaque origin, no script), on pages whose Content-Security-Policy
(`EDITOR_CSP`) allows the e-mail's inline styles and images from data: URLs, and nothing else: no
script but the admin UI's own files, no fetch, frame or form to anywhere.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from ..accounts import UserInfo
from ..errors import InvalidInput, MailgateError, NotFound
from ..message import Message
from ..notifications import KINDS, Kind, Rendered, TemplateText
from ..notifications.engine import TemplateError
from ..notifications.kinds import normalize_locale
from ..service import Mailgate
from .pages import User, _back, _htmx, _scope, page
from .session import ADMIN, checked_form

router = APIRouter(prefix=ADMIN, include_in_schema=False)

# The sandboxed frame's document (srcdoc) inherits this policy: e-mail HTML keeps its inline
# styles and data: images, and can load nothing from the network (no tracking pixel reaches the
# admin's address, no link opens inside the frame). `frame-ancestors 'none'` joins it (headers.py).
EDITOR_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'"
)
# A test of a template is one message through the outbox to an address the admin types: a few a
# minute per scope (like the test e-mail's runs per mail server), so that the form can't be used
# to send a tenant's or the operator's mail in bulk.
MAX_TEMPLATE_TESTS_PER_SCOPE = 5
TEMPLATE_TEST_WINDOW = 60.0  # seconds
PARTS = ("subject", "text", "html")


def templates_page(scope: str, name: str | None = None, locale: str | None = None) -> str:
    """Where the editor shows the templates of `scope`, or one of them in one locale."""
    url = f"{ADMIN}/templates/{scope}"
    if name is not None:
        url += f"/{name}"
        if locale is not None:
            url += f"/{locale}"
    return url


async def _templates_scope(request: Request, user: UserInfo, scope: str) -> tuple[Mailgate, str | None]:
    """The service acting as `user`, and the tenant of `scope` (None: the global defaults), once
    `user` may manage it (NotFound for another tenant, Forbidden for a tenant admin and global)."""
    mg = await _scope(request, user, scope)
    return mg, None if scope == "global" else scope


def _kind(name: str) -> Kind:
    kind = KINDS.get(name)
    if kind is None:
        raise NotFound([("template", f"there is no template {name[:64]!r}")])
    return kind


def _tag(locale: str) -> str:
    tag = normalize_locale(locale)
    if tag is None:
        raise NotFound([("locale", f"{locale[:32]!r} is not a language tag such as en, nl or nl-BE")])
    return tag


def _guarded(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = EDITOR_CSP
    return response


def _problems(error: InvalidInput) -> dict[str, list[str]]:
    """A service's problems by form field: a part's next to it, the rest (locale, data.<name>) on top."""
    problems: dict[str, list[str]] = {}
    for path, text in error.problems:
        if path in PARTS:
            problems.setdefault(path, []).append(text)
        else:
            problems.setdefault("", []).append(f"{path}: {text}" if path else text)
    return problems


def _typed(form: dict[str, str]) -> dict[str, str]:
    # Browsers send a textarea's lines ending in CRLF (the HTML form encoding): the template keeps
    # the newlines it was written with.
    return {part: (form.get(part) or "").replace("\r\n", "\n") for part in PARTS}


# ---- the list --------------------------------------------------------------------------------


@router.get("/templates")
async def templates_home(
    request: Request, user: User, tenant: Annotated[str, Query(max_length=64)] = ""
) -> RedirectResponse:
    """The templates the admin manages: a system admin's global defaults (or the tenant picked on
    that page), a tenant admin's tenant's."""
    scope = (tenant or "global") if user.principal.is_system_admin else str(user.tenant)
    return RedirectResponse(templates_page(quote(scope, safe="")), status_code=303)


@router.get("/templates/{scope}")
async def templates_list(request: Request, scope: str, user: User) -> HTMLResponse:
    mg, tenant = await _templates_scope(request, user, scope)
    context: dict[str, Any] = {
        "scope": scope,
        "tenant": await mg.tenants.get(tenant) if tenant else None,
        "infos": await mg.templates.list(tenant),
        "tenants": await mg.tenants.list() if tenant is None else [],
    }
    return page(request, user, "templates.html", **context)


@router.get("/templates/{scope}/{name}")
async def template_locale(
    request: Request, scope: str, name: str, user: User, locale: Annotated[str, Query(max_length=32)] = ""
) -> RedirectResponse:
    """The list's "another locale" form: to that locale's editor."""
    await _templates_scope(request, user, scope)
    _kind(name)
    return RedirectResponse(templates_page(scope, name, _tag(locale.strip())), status_code=303)


# ---- one template in one locale ----------------------------------------------------------------


async def _editor(
    request: Request,
    user: UserInfo,
    scope: str,
    name: str,
    locale: str,
    *,
    typed: dict[str, str] | None = None,
    problems: dict[str, list[str]] | None = None,
    status: int = 200,
    sent: dict[str, Any] | None = None,
) -> HTMLResponse:
    """The editor's page: the text in the form (what was typed, or what the scope uses), and its
    preview with the sample data (of the typed text, when there is one)."""
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    current = await mg.templates.get(kind.name, tag, tenant)
    values = typed if typed is not None else {part: getattr(current, part) for part in PARTS}
    rendered, preview_problems = await _preview(mg, kind, tag, tenant, typed)
    context: dict[str, Any] = {
        "scope": scope, "tenant": await mg.tenants.get(tenant) if tenant else None, "kind": kind, "locale": tag,
        "current": current, "own": _own(current, tag, tenant), "values": values, "problems": problems or {},
        "rendered": rendered, "preview_problems": preview_problems, "sent": sent,
        "tenants": await mg.tenants.list() if tenant is None else [],
    }  # fmt: skip
    return _guarded(page(request, user, "template_edit.html", status, **context))


def _own(current: TemplateText, tag: str, tenant: str | None) -> bool:
    """Whether the scope has its own text for exactly this locale (which Reset removes)."""
    return current.locale == tag and current.source == ("tenant" if tenant else "global")


async def _preview(
    mg: Mailgate, kind: Kind, tag: str, tenant: str | None, typed: dict[str, str] | None
) -> tuple[Rendered | None, dict[str, list[str]]]:
    try:
        if typed is None:
            return await mg.templates.preview(kind.name, tag, tenant), {}
        return await mg.templates.preview(kind.name, tag, tenant, subject=typed["subject"], text=typed["text"],
                                          html=typed["html"]), {}  # fmt: skip
    except TemplateError as e:
        return None, _problems(e)


@router.get("/templates/{scope}/{name}/{locale}")
async def template_page(request: Request, scope: str, name: str, locale: str, user: User) -> HTMLResponse:
    return await _editor(request, user, scope, name, locale)


@router.post("/templates/{scope}/{name}/{locale}")
async def save_template(request: Request, scope: str, name: str, locale: str, user: User) -> Response:
    form = await checked_form(request)
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    typed = _typed(form)
    try:
        await mg.templates.save(
            kind.name, tag, tenant, subject=typed["subject"], text=typed["text"], html=typed["html"]
        )
    except TemplateError as e:
        return await _editor(request, user, scope, name, tag, typed=typed, problems=_problems(e), status=422)
    where = "every tenant without its own" if tenant is None else "this tenant"
    return _back(request, templates_page(scope, kind.name, tag), f"Saved: {where} now sends this {tag} text.")


@router.post("/templates/{scope}/{name}/{locale}/preview")
async def preview_template(request: Request, scope: str, name: str, locale: str, user: User) -> HTMLResponse:
    """The typed, unsaved text rendered with the sample data: the preview alone for htmx, else the
    whole editor with it."""
    form = await checked_form(request)
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    typed = _typed(form)
    if not _htmx(request):
        return await _editor(request, user, scope, name, tag, typed=typed)
    rendered, problems = await _preview(mg, kind, tag, tenant, typed)
    # 422 is the refusal htmx swaps in (base.html's responseHandling): the problems show in place.
    return _guarded(page(request, user, "template_preview.html", 422 if problems else 200, rendered=rendered,
                         preview_problems=problems))  # fmt: skip


@router.get("/templates/{scope}/{name}/{locale}/reset")
async def confirm_reset(request: Request, scope: str, name: str, locale: str, user: User) -> HTMLResponse:
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    current = await mg.templates.get(kind.name, tag, tenant)
    if not _own(current, tag, tenant):
        raise NotFound([("template", f"{kind.title} in {tag} has no text of this scope's own to reset")])
    return page(request, user, "template_reset.html", scope=scope, kind=kind, locale=tag, tenant=tenant,
                back=templates_page(scope, kind.name, tag))  # fmt: skip


@router.post("/templates/{scope}/{name}/{locale}/reset")
async def reset_template(request: Request, scope: str, name: str, locale: str, user: User) -> Response:
    await checked_form(request)
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    now_used = await mg.templates.reset(kind.name, tag, tenant)
    default = {"built-in": "the built-in text", "global": "the global default"}.get(now_used.source, now_used.source)
    return _back(request, templates_page(scope, kind.name, tag),
                    f"Reset: {kind.title} in {tag} is {default} ({now_used.locale}) again.")  # fmt: skip


# ---- a test of the template ----------------------------------------------------------------------


def _test_slot(request: Request, scope: str) -> bool:
    """Take one of the scope's tests of this minute; False when they are used up."""
    sent: dict[str, deque[float]] | None = getattr(request.app.state, "template_tests", None)
    if sent is None:
        sent = request.app.state.template_tests = {}
    at = time.monotonic()
    recent = sent.setdefault(scope, deque())
    while recent and at - recent[0] > TEMPLATE_TEST_WINDOW:
        recent.popleft()
    if len(recent) >= MAX_TEMPLATE_TESTS_PER_SCOPE:
        return False
    recent.append(at)
    return True


@router.post("/templates/{scope}/{name}/{locale}/test")
async def test_template(request: Request, scope: str, name: str, locale: str, user: User) -> HTMLResponse:
    """The saved template with its sample data, as one message through the outbox. A tenant's is
    sent as `mg.submit_template` sends it for that tenant; the global default through the tenant
    the system admin picks (the template of the global scope, whatever that tenant overrides)."""
    form = await checked_form(request)
    mg, tenant = await _templates_scope(request, user, scope)
    kind, tag = _kind(name), _tag(locale)
    to = (form.get("to") or "").strip() or user.email
    through = tenant or (form.get("tenant") or "").strip()
    result: dict[str, Any] = {"to": to, "tenant": through}
    status = 200
    if not through:
        result["problem"], status = "Pick the tenant whose mail server sends the test.", 422
    elif not _test_slot(request, scope):
        result["problem"] = (f"{MAX_TEMPLATE_TESTS_PER_SCOPE} tests of these templates were sent in the last minute: "
                             "send this one in a minute.")  # fmt: skip
        status = 429
    else:
        try:
            if tenant is not None:
                result["id"] = await mg.submit_template(tenant, kind.name, kind.sample_data, to=to, locale=tag)
            else:
                await mg.tenants.get(through)
                rendered = await mg.templates.render(kind.name, tag, None, kind.sample_data)
                message = Message(to=to, subject=rendered.subject, text=rendered.text, html=rendered.html)
                result["id"] = await mg.submit(through, message)
        except MailgateError as e:  # a bad address, sending disabled, an unknown tenant: said in place
            result["problem"], status = str(e), 422
    if _htmx(request):
        # htmx swaps 422 in place (base.html), not 429: the refusal is shown where the result goes.
        return page(request, user, "template_test.html", 422 if status == 429 else status, sent=result)
    return await _editor(request, user, scope, name, tag, sent=result, status=status)
