"""Signed-in admins: the session cookie, CSRF tokens, one-time notices ("flash").

The session cookie is `token.signature`: a random token whose SHA-256 names the session row
(accounts.py), signed with a key derived from the secret keys, HttpOnly, SameSite=Lax (the OAuth
provider's redirect back is a top-level GET that must carry it), Secure when served over https.
Every form and htmx request carries a CSRF token: an HMAC of the session token, so nothing is
stored for it. Before sign-in, the sign-in form is tied to a random cookie the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from fastapi import Request, Response

from ..accounts import SESSION_MAX, UserInfo

if TYPE_CHECKING:
    from ..service import Mailgate

SESSION_COOKIE = "mailgate_session"
LOGIN_COOKIE = "mailgate_login"
FLASH_COOKIE = "mailgate_flash"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
ADMIN = "/admin"


def server_page(scope: str) -> str:
    """Where the admin UI shows the mail server of `scope` ("global" or a tenant)."""
    return f"{ADMIN}/global" if scope == "global" else f"{ADMIN}/tenants/{scope}"


class SignInNeeded(Exception):
    """No valid session: the page sends the browser to the sign-in page."""

    def __init__(self, next_url: str = ADMIN) -> None:
        self.next_url = next_url


class CsrfRefused(Exception):
    """A form without a valid CSRF token (403)."""


def _key(mg: Mailgate) -> bytes:
    return mg.derived_key("admin ui cookies")


def _mac(mg: Mailgate, purpose: str, value: str) -> str:
    digest = hmac.new(_key(mg), f"{purpose}:{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _unsigned(mg: Mailgate, purpose: str, cookie: str | None) -> str | None:
    if not cookie or "." not in cookie or len(cookie) > 300:
        return None
    value, _, signature = cookie.rpartition(".")
    return value if hmac.compare_digest(signature, _mac(mg, purpose, value)) else None


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


# ---- the session ---------------------------------------------------------------------------------


def session_token(request: Request) -> str | None:
    return _unsigned(request.app.state.mg, "session", request.cookies.get(SESSION_COOKIE))


async def current_user(request: Request) -> UserInfo:
    """The signed-in admin, or SignInNeeded."""
    token = session_token(request)
    user = await request.app.state.mg.users.session(token) if token else None
    if user is None:
        path = request.url.path if request.method == "GET" else ADMIN
        raise SignInNeeded(path + (f"?{request.url.query}" if request.url.query and request.method == "GET" else ""))
    request.state.csrf = _mac(request.app.state.mg, "csrf", token or "")
    return user  # type: ignore[no-any-return]


def start_session(response: Response, request: Request, token: str) -> None:
    mg: Mailgate = request.app.state.mg
    response.set_cookie(
        SESSION_COOKIE, f"{token}.{_mac(mg, 'session', token)}", max_age=int(SESSION_MAX.total_seconds()),
        path="/", httponly=True, samesite="lax", secure=_secure(request),
    )  # fmt: skip
    response.delete_cookie(LOGIN_COOKIE, path=ADMIN)


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


# ---- CSRF ----------------------------------------------------------------------------------------


async def checked_form(request: Request) -> dict[str, str]:
    """The posted form, once its CSRF token matches the session's (call after current_user)."""
    form = await request.form()
    given = request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD) or "")
    expected = getattr(request.state, "csrf", None)
    if not expected or not hmac.compare_digest(given, expected):
        raise CsrfRefused()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def login_token(request: Request) -> tuple[str, str | None]:
    """The sign-in form's CSRF token, tied to a random cookie: (the token, a new cookie value to
    set, or None when the browser has a valid one)."""
    mg: Mailgate = request.app.state.mg
    nonce = _unsigned(mg, "login", request.cookies.get(LOGIN_COOKIE))
    cookie = None
    if nonce is None:
        nonce = secrets.token_urlsafe(16)
        cookie = f"{nonce}.{_mac(mg, 'login', nonce)}"
    return _mac(mg, "login-csrf", nonce), cookie


def set_login_cookie(request: Request, response: Response, cookie: str) -> None:
    response.set_cookie(LOGIN_COOKIE, cookie, max_age=3600, path=ADMIN, httponly=True, samesite="strict",
                        secure=_secure(request))  # fmt: skip


def login_csrf_ok(request: Request, given: str) -> bool:
    mg: Mailgate = request.app.state.mg
    nonce = _unsigned(mg, "login", request.cookies.get(LOGIN_COOKIE))
    return nonce is not None and hmac.compare_digest(given, _mac(mg, "login-csrf", nonce))


# ---- one-time notices ----------------------------------------------------------------------------


def flash(response: Response, mg: Mailgate, text: str, *, ok: bool = True, secure: bool = False) -> None:
    """A notice for the next admin page (signed: a link can't make the page say something)."""
    value = base64.urlsafe_b64encode(f"{int(ok)}{text[:500]}".encode()).decode()
    response.set_cookie(FLASH_COOKIE, f"{value}.{_mac(mg, 'flash', value)}", max_age=300, path=ADMIN,
                        httponly=True, samesite="lax", secure=secure)  # fmt: skip


def read_flash(request: Request) -> tuple[bool, str] | None:
    """The notice left for this page: (ok, text), or None."""
    value = _unsigned(request.app.state.mg, "flash", request.cookies.get(FLASH_COOKIE))
    if value is None:
        return None
    try:
        text = base64.urlsafe_b64decode(value).decode()
    except ValueError:
        return None
    return text[:1] == "1", text[1:]


def clear_flash(request: Request, response: Response) -> None:
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path=ADMIN)
