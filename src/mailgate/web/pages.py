"""The admin UI's pages under /admin: sign-in, the global mail server, tenants, the test e-mail,
delegated OAuth consent, the message log, the audit log, and captured mail in demo mode.

Routes only parse the form, ask `Principal` (access.py) whether the signed-in admin may, call the
service, and render; the rules are the service's, exactly as for the API.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from ..access import Principal
from ..accounts import SignInRefused, UserInfo
from ..api.limits import MAX_TEST_EMAILS_PER_SCOPE
from ..diagnostics.testmail import EWS_STEPS, GRAPH_STEPS, SMTP_STEPS, Step, StepReport
from ..errors import Conflict, InvalidInput, MailgateError, NotFound
from ..outbox.store import MAX_ID, STATUSES
from ..service import Mailgate
from . import forms
from .headers import AdminHeaders, harden
from .session import (
    ADMIN,
    CSRF_FIELD,
    SignInNeeded,
    checked_form,
    clear_flash,
    current_user,
    end_session,
    flash,
    login_csrf_ok,
    login_token,
    read_flash,
    server_page,
    session_token,
    set_login_cookie,
    start_session,
)

log = logging.getLogger("mailgate.web")
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(STATUSES=STATUSES, CSRF_FIELD=CSRF_FIELD, forms=forms)


def _show(value: Any) -> str:
    """A detail's value in a line: mappings as "key: value; …", lists comma-separated."""
    if value is None:
        return "—"
    if value == "":
        return "(empty)"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_show(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _at(value: str | datetime | None) -> str:
    """A time (or its ISO text) as the pages show times: 2026-11-22 06:07:31 UTC."""
    if not value:
        return "—"
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["show"] = _show
templates.env.filters["at"] = _at
router = APIRouter(prefix=ADMIN, include_in_schema=False)
User = Annotated[UserInfo, Depends(current_user)]
TEST_RUNS_KEPT = 100
TEST_RUN_AGE = 600.0  # a test run's report is kept this long (seconds) for the page that polls it


def _mg(request: Request, user: UserInfo | None = None) -> Mailgate:
    mg: Mailgate = request.app.state.mg
    return mg.acting_as(user.actor) if user is not None else mg


def page(request: Request, user: UserInfo | None, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, name, {"user": user, "csrf": getattr(request.state, "csrf", ""), "demo": _capture(request),
                        "notice": read_flash(request), **context}, status_code=status,
    )  # fmt: skip
    clear_flash(request, response)
    return response


def _htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _back(request: Request, url: str, text: str | None = None, *, ok: bool = True) -> Response:
    """After a form: to `url` (htmx follows HX-Redirect), with a notice."""
    response: Response
    if _htmx(request):
        response = Response(status_code=204, headers={"HX-Redirect": url})
    else:
        response = RedirectResponse(url, status_code=303)
    if text:
        flash(response, request.app.state.mg, text, ok=ok, secure=request.url.scheme == "https")
    return response


def _capture(request: Request) -> Any:
    return getattr(request.app.state, "capture", None)


# ---- signing in --------------------------------------------------------------------------------


def _safe_next(url: str) -> str:
    """Only a path of this admin UI: never another site."""
    parts = urlsplit(url)
    inside = url == ADMIN or url.startswith((ADMIN + "/", ADMIN + "?"))
    if parts.scheme or parts.netloc or not inside or "\\" in url:
        return ADMIN
    return url


@router.get("/login")
async def login_page(request: Request, next: str = ADMIN) -> HTMLResponse:
    return _login_form(request, "", _safe_next(next), None, 200)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    email, password = str(form.get("email") or ""), str(form.get("password") or "")
    next_url = _safe_next(str(form.get("next") or ADMIN))
    if not login_csrf_ok(request, str(form.get(CSRF_FIELD) or "")):
        return _login_form(request, email, next_url, "The sign-in form had expired: please sign in again.", 403)
    try:
        token, _ = await request.app.state.mg.users.sign_in(email, password)
    except SignInRefused as e:
        return _login_form(request, email, next_url, e.problems[0][1], 401)
    response = RedirectResponse(next_url, status_code=303)
    start_session(response, request, token)
    return response


def _login_form(request: Request, email: str, next_url: str, problem: str | None, status: int) -> HTMLResponse:
    token, cookie = login_token(request)
    response = page(request, None, "login.html", status, next=next_url, email=email, problem=problem,
                    login_token=token)  # fmt: skip
    if cookie is not None:
        set_login_cookie(request, response, cookie)
    return response


@router.post("/logout")
async def logout(request: Request, user: User) -> Response:
    await checked_form(request)
    token = session_token(request)
    if token:
        await request.app.state.mg.users.sign_out(token)
    response = RedirectResponse(f"{ADMIN}/login", status_code=303)
    end_session(response)
    return response


@router.get("")
async def home(user: User) -> Response:
    if user.principal.is_system_admin:
        return RedirectResponse(f"{ADMIN}/global", status_code=303)
    return RedirectResponse(f"{ADMIN}/tenants/{user.tenant}", status_code=303)


# ---- mail servers --------------------------------------------------------------------------------


async def _server_context(mg: Mailgate, scope: str, form: forms.ServerForm | None = None) -> dict[str, Any]:
    info = await mg.servers.get(scope)
    health = await mg.servers.health(scope) if info is not None else None
    if form is None:
        form = forms.from_document(info.document if info else None, info.enabled if info else True, scope=scope)
    delegated = (
        form.values.get("kind") in ("smtp", "ews")
        and form.values.get("auth.method") == "oauth2"
        and form.values.get("auth.token.grant") == "delegated"
    )
    # A delegated Graph server: the same Connect and Reset; the mailbox is the one that consented.
    graph_delegated = form.values.get("kind") == "graph" and form.values.get("graph.auth") == "delegated"
    connected_mailbox = None
    if info is not None and delegated:
        connected_mailbox = form.value("auth.username")
    elif info is not None and graph_delegated:
        graph = info.document.get("graph") or {}
        connected_mailbox = graph.get("mailbox") if (graph.get("refresh_token") or {}).get("set") else None
    return {"scope": scope, "info": info, "health": health, "form": form, "delegated": delegated or graph_delegated,
            "connected_mailbox": connected_mailbox}  # fmt: skip


async def _scope(request: Request, user: UserInfo, scope: str) -> Mailgate:
    user.principal.must_manage_settings(scope)
    mg = _mg(request, user)
    if scope != "global":
        await mg.tenants.get(scope)
    return mg


@router.get("/global")
async def global_page(request: Request, user: User) -> HTMLResponse:
    mg = await _scope(request, user, "global")
    return page(request, user, "server_page.html", tenant=None, system=await mg.system.get(),
                **await _server_context(mg, "global"))  # fmt: skip


@router.post("/servers/{scope}")
async def save_server(request: Request, scope: str, user: User) -> Response:
    form = await checked_form(request)
    mg = await _scope(request, user, scope)
    info = await mg.servers.get(scope)
    stored = forms.from_document(info.document).secrets_set if info else set()
    document, shown = forms.to_document(form, stored, scope=scope)
    document["enabled"] = shown.values.get("enabled", True)
    if not shown.problems:
        try:
            await mg.servers.set(scope, document)
        except InvalidInput as e:
            forms.attach_problems(shown, e.problems)
        else:
            return _back(request, server_page(scope) + "#server", "Mail server saved.")
    if scope == "global":
        context = {"tenant": None, **await _server_context(mg, scope, shown)}
    else:
        context = await _tenant_context(mg, user.principal, scope, shown)
    return page(request, user, "server_page.html", status=422, tenant_problems={}, **context)


@router.get("/servers/{scope}/confirm/{action}")
async def confirm(request: Request, scope: str, action: str, user: User) -> HTMLResponse:
    """Asks before what can't be undone: forgetting the tokens, removing the server."""
    await _scope(request, user, scope)
    questions = {
        "reset": "Forget the stored tokens? Mail waits until an admin connects the mailbox again. (A Graph mail "
        "server also forgets the mailbox and the sender address the consent set.)",
        "delete": "Remove this mail server? A tenant then sends through the global server; without a global "
        "server no tenant can send.",
    }
    if action not in questions:
        raise NotFound([("action", f"there is no action {action!r}")])
    return page(request, user, "confirm.html", scope=scope, action=action, question=questions[action],
                back=server_page(scope))  # fmt: skip


# ---- the test e-mail, live -----------------------------------------------------------------------


@dataclass
class TestRun:
    id: str
    user_id: int
    scope: str
    to: str
    names: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    steps: dict[str, Step] = field(default_factory=dict)
    running: str | None = None
    report: StepReport | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None

    def on_step(self, step: Step, done: bool) -> None:
        self.steps[step.name] = step
        self.running = None if done else step.name

    @property
    def done(self) -> bool:
        return self.report is not None or self.error is not None


def _runs(request: Request) -> dict[str, TestRun]:
    runs: dict[str, TestRun] | None = getattr(request.app.state, "test_runs", None)
    if runs is None:
        runs = request.app.state.test_runs = {}
    at = time.monotonic()
    for key in [k for k, r in runs.items() if at - r.started > TEST_RUN_AGE and r.done]:
        del runs[key]
    while len(runs) >= TEST_RUNS_KEPT:  # the oldest finished ones make room; a running one stays
        finished = next((k for k, r in runs.items() if r.done), None)
        if finished is None:
            break
        del runs[finished]
    return runs


@router.post("/servers/{scope}/test")
async def start_test(request: Request, scope: str, user: User) -> Response:
    form = await checked_form(request)
    mg = await _scope(request, user, scope)
    to = (form.get("to") or "").strip() or user.email
    loaded = await mg.servers.get(scope)
    if loaded is None:
        raise NotFound([("server", f"no mail server is set for {scope}: save one first")])
    names = GRAPH_STEPS if loaded.document.get("kind") == "graph" else SMTP_STEPS
    if loaded.document.get("kind") == "ews":
        names = EWS_STEPS
    run = TestRun(secrets.token_urlsafe(12), user.id, scope, to, names)

    async def work() -> None:
        try:
            run.report = await mg.test_server(scope, to, on_step=run.on_step, dry_run=bool(form.get("dry_run")))
        except MailgateError as e:
            run.error = str(e)
        except Exception as e:  # a bug: the page must still stop waiting
            log.error("the test e-mail of %s failed inside mailgate: %s", scope, type(e).__name__)
            run.error = "the test e-mail failed inside mailgate; the operator's log has the error type"

    runs = _runs(request)
    if len(runs) >= TEST_RUNS_KEPT:  # every one of them still running
        raise Conflict([("test", f"{len(runs)} test e-mails are under way; send this one when one has finished")])
    if sum(1 for r in runs.values() if r.scope == scope and not r.done) >= MAX_TEST_EMAILS_PER_SCOPE:
        # As over the API: one tenant's slow or silent server can't take every run there is.
        raise Conflict([("test", f"{MAX_TEST_EMAILS_PER_SCOPE} test e-mails of this mail server are under way; "
                                 "send this one when one has finished")])  # fmt: skip
    runs[run.id] = run
    run.task = asyncio.create_task(work())
    if not _htmx(request):  # without JavaScript: wait, and show the whole report
        await asyncio.wait_for(asyncio.shield(run.task), timeout=300)
    return page(request, user, "test_run.html" if _htmx(request) else "test_page.html", run=run,
                back=server_page(scope))  # fmt: skip


@router.get("/tests/{run_id}")
async def test_progress(request: Request, run_id: str, user: User) -> HTMLResponse:
    run = _runs(request).get(run_id)
    if run is None or run.user_id != user.id:
        raise NotFound([("test", "this test run is over or unknown: send the test e-mail again")])
    return page(request, user, "test_run.html", run=run, back=server_page(run.scope))


# Registered after the test e-mail's route, which it would otherwise shadow.
@router.post("/servers/{scope}/{action}")
async def server_action(request: Request, scope: str, action: str, user: User) -> Response:
    await checked_form(request)
    mg = await _scope(request, user, scope)
    if action == "enable":
        await mg.servers.enable(scope)
        return _back(request, server_page(scope), "Mail server switched on.")
    if action == "disable":
        await mg.servers.disable(scope)
        return _back(request, server_page(scope), "Mail server switched off.")
    if action == "delete":
        if await mg.servers.get(scope) is not None:
            await mg.servers.delete(scope)
        return _back(request, server_page(scope), "Mail server removed.")
    if action == "reset":
        await mg.reset_consent(scope)
        return _back(request, server_page(scope), "The stored tokens are forgotten: connect the mailbox again.")
    if action == "connect":
        url = await mg.begin_consent(scope)
        if _htmx(request):
            return Response(status_code=204, headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)
    raise NotFound([("action", f"there is no action {action!r}")])


# ---- tenants -------------------------------------------------------------------------------------


@router.get("/tenants")
async def tenants_page(request: Request, user: User) -> HTMLResponse:
    user.principal.must_be("system-admin")
    rows = await _tenant_rows(_mg(request, user))
    return page(request, user, "tenants.html", rows=rows, problems={}, values={})


async def _tenant_rows(mg: Mailgate) -> list[dict[str, Any]]:
    """Each tenant with the server it sends through (its own, the global one, or none) and that
    server's health."""
    rows = []
    for tenant in await mg.tenants.list():
        resolution = await mg.servers.resolve(tenant.id, secrets=False)  # where, not how: no decrypting
        sender = tenant.id if resolution.source == "tenant" else "global"
        health = await mg.servers.health(sender) if resolution.source is not None else None
        rows.append({"tenant": tenant, "resolution": resolution, "health": health})
    return rows


@router.post("/tenants")
async def add_tenant(request: Request, user: User) -> Response:
    form = await checked_form(request)
    user.principal.must_be("system-admin")
    mg = _mg(request, user)
    tenant_id = (form.get("id") or "").strip()
    try:
        await mg.tenants.add(
            tenant_id, name=(form.get("name") or "").strip() or tenant_id,
            may_use_own_server=bool(form.get("may_use_own_server")),
            support_address=(form.get("support_address") or "").strip() or None,
            may_set_support_address=bool(form.get("may_set_support_address")),
            admin_address=(form.get("admin_address") or "").strip() or None,
        )  # fmt: skip
    except InvalidInput as e:
        problems: dict[str, list[str]] = {}
        for path, text in e.problems:
            problems.setdefault("id" if path == "tenant" else path, []).append(text)
        return page(request, user, "tenants.html", status=422, rows=await _tenant_rows(mg), problems=problems,
                    values=form)  # fmt: skip
    return _back(request, f"{ADMIN}/tenants/{tenant_id}", f"Tenant {tenant_id} added.")


async def _tenant_context(
    mg: Mailgate, principal: Principal, tenant_id: str, form: forms.ServerForm | None = None
) -> dict[str, Any]:
    tenant = await mg.tenants.get(tenant_id)
    resolution = await mg.servers.resolve(tenant_id, secrets=False)
    context = await _server_context(mg, tenant_id, form)
    return {"tenant": tenant, "resolution": resolution, "may_edit_all": principal.is_system_admin, **context}


@router.get("/tenants/{tenant_id}")
async def tenant_page(request: Request, tenant_id: str, user: User) -> HTMLResponse:
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    principal.may_see_tenant(tenant_id)
    mg = _mg(request, user)
    context = await _tenant_context(mg, principal, tenant_id)
    return page(request, user, "server_page.html", tenant_problems={}, **context)


@router.post("/tenants/{tenant_id}")
async def update_tenant(request: Request, tenant_id: str, user: User) -> Response:
    form = await checked_form(request)
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    principal.may_see_tenant(tenant_id)
    mg = _mg(request, user)
    current = await mg.tenants.get(tenant_id)
    text = {k: (form.get(k) or "").strip() for k in ("name", "support_address", "admin_address")}
    if principal.is_system_admin:
        given = {"name", "may_use_own_server", "may_set_support_address", "support_address", "admin_address"}
    else:
        given = {"admin_address"} | ({"support_address"} if current.may_set_support_address else set())
    principal.may_change_tenant_fields(tenant_id, given, may_set_support_address=current.may_set_support_address)
    try:
        await mg.tenants.update(
            tenant_id,
            name=text["name"] or None if "name" in given else None,
            may_use_own_server=bool(form.get("may_use_own_server")) if "may_use_own_server" in given else None,
            may_set_support_address=bool(form.get("may_set_support_address"))
            if "may_set_support_address" in given else None,
            support_address=text["support_address"] or None if "support_address" in given else None,
            clear_support_address="support_address" in given and not text["support_address"],
            admin_address=text["admin_address"] or None,
            clear_admin_address=not text["admin_address"],
        )  # fmt: skip
    except InvalidInput as e:
        problems: dict[str, list[str]] = {}
        for path, problem in e.problems:
            problems.setdefault(path, []).append(problem)
        context = await _tenant_context(mg, principal, tenant_id)
        return page(request, user, "server_page.html", status=422, tenant_problems=problems, **context)
    return _back(request, f"{ADMIN}/tenants/{tenant_id}", "Tenant settings saved.")


# ---- messages ------------------------------------------------------------------------------------


def _day(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInput([(name, f"{value!r} is a date: YYYY-MM-DD")]) from None


@router.get("/messages")
async def messages_page(
    request: Request,
    user: User,
    tenant: Annotated[str, Query(max_length=64)] = "",
    status: Annotated[str, Query(max_length=16)] = "",
    recipient: Annotated[str, Query(max_length=320)] = "",
    since: Annotated[str, Query(max_length=10)] = "",
    until: Annotated[str, Query(max_length=10)] = "",
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> HTMLResponse:
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    mg = _mg(request, user)
    filters = {"tenant": tenant, "status": status, "recipient": recipient, "since": since, "until": until}
    problem = None
    found: list[Any] = []
    try:
        scope = principal.tenant_for(tenant or None)
        end = _day(until, "until")
        found = await mg.queue.list_messages(
            tenant_id=scope, status=status or None, recipient=recipient or None, since=_day(since, "since"),
            until=end + timedelta(days=1) if end else None, before=before, limit=50,
        )  # fmt: skip
    except NotFound:
        problem = f"there is no tenant {tenant!r}"
    except InvalidInput as e:
        problem = str(e)
    more = {k: v for k, v in filters.items() if v}
    next_url = f"?{urlencode({**more, 'before': found[-1].id})}" if len(found) == 50 else None
    tenants = await mg.tenants.list() if principal.is_system_admin else []
    return page(request, user, "messages.html", messages=found, filters=filters, problem=problem,
                next_url=next_url, tenants=tenants, status=422 if problem else 200)  # fmt: skip


@router.get("/messages/{message_id}")
async def message_page(request: Request, message_id: int, user: User) -> HTMLResponse:
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    if not 1 <= message_id <= MAX_ID:
        raise NotFound([("message", f"there is no message {message_id}")])
    detail = await _mg(request, user).queue.get(message_id, tenant_id=principal.tenant_for(None))
    return page(request, user, "message.html", m=detail.to_dict())


@router.post("/messages/{message_id}/{action}")
async def message_action(request: Request, message_id: int, action: str, user: User) -> Response:
    await checked_form(request)
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    if action not in ("retry", "cancel") or not 1 <= message_id <= MAX_ID:
        raise NotFound([("message", f"there is no message {message_id}")])
    queue = _mg(request, user).queue
    tenant = principal.tenant_for(None)
    url = f"{ADMIN}/messages/{message_id}"
    try:
        if action == "retry":
            await queue.retry(message_id, tenant_id=tenant)
        else:
            await queue.cancel(message_id, tenant_id=tenant)
    except Conflict as e:  # not in a state that allows it: said on the page, not as an error page
        return _back(request, url, str(e), ok=False)
    return _back(request, url, "Sent again now." if action == "retry" else "Cancelled.")


# ---- the audit log -------------------------------------------------------------------------------


@router.get("/audit")
async def audit_page(request: Request, user: User, tenant: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    principal = user.principal
    principal.must_be("system-admin", "tenant-admin")
    mg = _mg(request, user)
    try:
        scope = principal.tenant_for(tenant or None)
    except NotFound:
        scope, tenant = "\x00", ""  # nothing
    records = await mg.audit_log(scope, limit=200) if scope != "\x00" else []
    return page(request, user, "audit.html", records=[r.to_dict() for r in records], tenant=tenant)


# ---- captured mail (serve --demo) ----------------------------------------------------------------


def _captured(request: Request, user: UserInfo) -> Any:
    user.principal.must_be("system-admin")  # captured mail is every tenant's
    capture = _capture(request)
    if capture is None:
        raise NotFound([("captured", "mail is captured only by `mailgate serve --demo`")])
    return capture


@router.get("/captured")
async def captured_page(request: Request, user: User) -> HTMLResponse:
    capture = _captured(request, user)
    return page(request, user, "captured.html", messages=capture.messages(), capture=capture)


@router.get("/captured/{message_id}")
async def captured_message(request: Request, message_id: int, user: User) -> HTMLResponse:
    found = _captured(request, user).get(message_id)
    if found is None:
        raise NotFound([("captured", f"there is no captured message {message_id}")])
    return page(request, user, "captured_message.html", m=found)


@router.get("/captured/{message_id}/html")
async def captured_html(request: Request, message_id: int, user: User) -> HTMLResponse:
    """The message's html part alone, for a sandboxed frame: no scripts, nothing fetched."""
    found = _captured(request, user).get(message_id)
    if found is None or found.html is None:
        raise NotFound([("captured", f"captured message {message_id} has no html part")])
    return HTMLResponse(found.html, headers={
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                   "frame-ancestors 'self'",
        "X-Frame-Options": "SAMEORIGIN",  # framed by its message's page, and by nothing else
        "X-Content-Type-Options": "nosniff",
    })  # fmt: skip


# ---- errors as pages -----------------------------------------------------------------------------


def install(app: Any) -> None:
    """Mount the pages and static files on `app`. The API's error replies (errors.py) become pages
    under /admin; a page that needs a signed-in admin sends the browser to sign in."""
    from fastapi.staticfiles import StaticFiles

    from .session import CsrfRefused
    from .support import router as support_router
    from .templates_pages import router as templates_router
    from .webhooks_pages import router as webhooks_router

    app.include_router(router)
    app.include_router(support_router)  # the support form and the system settings (web/support.py)
    app.include_router(templates_router)  # the notification template editor (web/templates_pages.py)
    app.include_router(webhooks_router)  # a tenant's webhooks (web/webhooks_pages.py)
    app.mount(f"{ADMIN}/static", StaticFiles(directory=HERE / "static"), name="admin-static")
    app.add_middleware(AdminHeaders)
    for kind, handler in list(app.exception_handlers.items()):
        app.exception_handlers[kind] = _as_page(handler)

    async def sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInNeeded)
        url = f"{ADMIN}/login?{urlencode({'next': exc.next_url})}"
        if _htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)

    async def refused(request: Request, exc: Exception) -> Response:
        return _error(request, 403, "This form had expired or did not come from this page: reload it and try again.")

    app.add_exception_handler(SignInNeeded, sign_in)
    app.add_exception_handler(CsrfRefused, refused)


def _as_page(handler: Any) -> Any:
    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        path = request.url.path
        if not (path == ADMIN or path.startswith(ADMIN + "/")) or not isinstance(response, Response):
            return response  # type: ignore[no-any-return]
        import json

        try:
            text = json.loads(bytes(response.body))["message"]
        except (ValueError, KeyError, TypeError):
            text = "The request was refused."
        return _error(request, response.status_code, text)

    return handle


def _error(request: Request, status: int, text: str) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, "error.html", {"user": None, "csrf": "", "demo": None, "notice": None, "status": status,
                                "text": text}, status_code=status,
    )  # fmt: skip
    # The page of an unexpected error is sent from outside every middleware (Starlette's
    # ServerErrorMiddleware), so AdminHeaders never sees it.
    harden(response.headers, request.url.path)
    return response
