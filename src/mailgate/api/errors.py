"""Every error the API answers is JSON with a stable `code` (for programs) and a `message` (for
people), plus `problems` (each {"field", "problem"}) when the input was at fault: at most
MAX_PROBLEMS of them, then one saying how many more were left out.

| status | code |
| --- | --- |
| 400 | `invalid_json` (the body is not JSON), `bad_request` |
| 401 | `unauthorized` (no token, or not a valid one) |
| 403 | `forbidden` (the token's role does not allow it) |
| 404 | `not_found` (also: another tenant's data — it does not exist, as far as the caller can tell) |
| 405 | `method_not_allowed` |
| 409 | `conflict`, `sending_disabled`, `secret_unreadable` (a stored secret can't be decrypted with these keys) |
| 409 | `no_support_address` (a support request, and neither the tenant nor the system has a support address) |
| 413 | `payload_too_large` |
| 415 | `unsupported_media_type` |
| 422 | `invalid_input` |
| 429 | `too_many_requests` (too many test e-mails under way: try again after `Retry-After` seconds) |
| 502 | `upstream_failed` (a provider's token endpoint refused or could not be reached) |
| 503 | `unavailable` (the database can't be used just now: disk full, unreachable…; retry after `Retry-After` s) |
| 500 | `internal` (a bug: logged, never with a secret) |
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..access import Forbidden
from ..errors import Conflict, DeliveryError, InvalidInput, NotFound, SendingDisabled, traceback_of
from ..settings.secrets import SecretsError

log = logging.getLogger("mailgate.api")

MAX_PROBLEMS = 50  # listed in a reply; a body of two million bad items is still one small reply
_FIELD_LENGTH, _PROBLEM_LENGTH, _MESSAGE_LENGTH = 120, 240, 20_000
UNAVAILABLE_RETRY_AFTER = 5  # seconds: a database that restarts, or a disk an operator frees

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class Problem(BaseModel):
    field: str
    problem: str


class ErrorReply(BaseModel):
    """What every error answers."""

    code: str
    message: str
    problems: list[Problem] = []


class Unauthorized(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyRequests(Exception):
    """More of something under way than this process allows at once: 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def error(
    status: int,
    code: str,
    message: str,
    problems: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": _text(message, _MESSAGE_LENGTH)}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=status, headers=headers or None)


def _text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters and made encodable: a lone surrogate from a JSON body's
    "\\ud800" (quoted back in a field name) would otherwise fail the reply itself."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def invalid(problems: Sequence[tuple[str, str]], total: int | None = None) -> JSONResponse:
    """422 listing at most MAX_PROBLEMS problems, each cut short, and how many more there were
    (`total`: how many there were in all, when `problems` holds only the first ones)."""
    listed = _listed(problems)
    message = "; ".join(f"{p['field']}: {p['problem']}" if p["field"] else p["problem"] for p in listed)
    left_out = (len(problems) if total is None else total) - len(listed)
    if left_out > 0:
        more = f"and {left_out:,} more problems, not listed"
        listed.append({"field": "", "problem": more})
        message += f"; {more}"
    return error(422, "invalid_input", message, listed)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(x) for x in loc if x not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(x) for x in loc)


def _problem(x: Any) -> tuple[str, str]:
    field = _field(tuple(x.get("loc", ())))
    kind = x.get("type")
    if kind == "extra_forbidden":
        return field, "is not a field here"
    if kind == "missing":
        return field, "is required"
    if kind == "string_unicode":  # pydantic's words for a lone surrogate
        return field, "is not text: it contains a lone surrogate (an escape like \\ud800 without its pair)"
    return field, str(x.get("msg", "is not valid"))


# ---- the database can't be used just now ---------------------------------------------------------

_SQLITE_REASONS = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "a disk I/O error",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
    sqlite3.SQLITE_READONLY: "the database file is read-only",
    sqlite3.SQLITE_BUSY: "the database is locked by another writer",
    sqlite3.SQLITE_LOCKED: "the database is locked by another writer",
    sqlite3.SQLITE_NOMEM: "out of memory",
    sqlite3.SQLITE_CORRUPT: "the database file is damaged",
    sqlite3.SQLITE_NOTADB: "the database file is damaged",
}
_OS_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EIO: "a disk I/O error",
    errno.EROFS: "the file system is read-only",
}
# SQLSTATE classes and codes of PostgreSQL's errors that say the server can't serve just now.
_POSTGRES_REASONS = {
    "53100": "the disk is full",
    "53200": "the database server is out of memory",
    "53300": "the database server has too many connections",
    "57014": "a statement took too long and was cancelled",
    "57P01": "the connection was lost (the server is shutting down)",
    "57P02": "the connection was lost (the server crashed)",
    "57P03": "the database server is starting up or shutting down",
    "08": "the connection was lost",
    "28": "the database refused mailgate's credentials",
    "40": "a transaction conflicted with another",
    "53": "the database server is out of resources",
    "58": "a disk I/O error on the database server",
}
# A connection that failed before the server said anything has no SQLSTATE, only the driver's
# text, which names the host (maybe with a password in a URL): matched, never repeated.
_CONNECT_FAILURES = (
    ("connection refused", "cannot connect (connection refused)"),
    ("timeout expired", "cannot connect (timed out)"),
    ("timed out", "cannot connect (timed out)"),
    ("could not translate host name", "cannot connect (the host name does not resolve)"),
    ("name or service not known", "cannot connect (the host name does not resolve)"),
    ("no route to host", "cannot connect (no route to the host)"),
    ("server closed the connection", "the connection was lost"),
    ("connection is lost", "the connection was lost"),
    ("connection is closed", "the connection was lost"),
)


def unavailable(e: BaseException) -> str | None:
    """A short reason, in mailgate's words, when `e` says the database can't be used just now (the
    disk is full, it can't be reached, the connection was lost…); None for anything else (a bug)."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    seen: BaseException | None = e
    for _ in range(5):  # the exception, the driver's beneath it, and what caused that
        if seen is None:
            return None
        if isinstance(seen, PoolTimeout):
            return "every database connection is busy"
        if isinstance(seen, DBAPIError):
            if seen.connection_invalidated:
                return "the connection was lost"
            seen = seen.orig
            continue
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            return None if code is None else _SQLITE_REASONS.get(code & 0xFF)
        reason = _postgres(seen)
        if reason is not None:
            return reason
        if isinstance(seen, OSError) and seen.errno in _OS_REASONS:
            return _OS_REASONS[seen.errno]
        seen = seen.__cause__
    return None


def _postgres(e: BaseException) -> str | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg comes with mailgate
        return None
    if not isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
        return None
    state = getattr(e, "sqlstate", None)
    if state:
        return _POSTGRES_REASONS.get(state) or _POSTGRES_REASONS.get(state[:2]) or "the database server refused"
    text = str(e).lower()
    fallback = "cannot connect" if isinstance(e, psycopg.OperationalError) else None  # else a misuse: a bug
    return next((reason for words, reason in _CONNECT_FAILURES if words in text), fallback)


def _database_down(request: Request, reason: str, e: BaseException) -> JSONResponse:
    # The type and our reason only: a driver's text may quote SQL, a message's data, or a URL.
    log.warning("database unavailable in %s %s: %s (%s)", request.method, request.url.path, reason, type(e).__name__)
    request.app.state.database_trouble = (time.monotonic(), reason, type(e).__name__)
    message = "mailgate's database can't be used just now; try again in a few seconds (the operator's log says why)"
    return error(503, "unavailable", message, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})


def database_trouble(app: FastAPI, within: float) -> tuple[str, str] | None:
    """(reason, error type) of the last time a route found the database unavailable, if that was
    less than `within` seconds ago: /readyz tells it, since a full disk fails writes while the
    reads it makes itself still work."""
    seen = getattr(app.state, "database_trouble", None)
    if seen is None or time.monotonic() - seen[0] > within:
        return None
    return seen[1], seen[2]


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(x.get("type") == "json_invalid" for x in errors[:MAX_PROBLEMS]):
            return error(400, "invalid_json", "the request body is not valid JSON")
        return invalid([_problem(x) for x in errors[:MAX_PROBLEMS]], total=len(errors))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else "the request was refused"
        return error(e.status_code, _CODES.get(e.status_code, "error"), message, headers=dict(e.headers or {}))

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, e: Unauthorized) -> JSONResponse:
        return error(401, "unauthorized", e.message, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, e: Forbidden) -> JSONResponse:
        return error(403, "forbidden", str(e))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, e: NotFound) -> JSONResponse:
        return error(404, "not_found", str(e), _listed(e.problems))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict) -> JSONResponse:
        return error(409, "conflict", str(e), _listed(e.problems))

    @app.exception_handler(InvalidInput)
    async def _input(request: Request, e: InvalidInput) -> JSONResponse:
        return invalid(e.problems)

    @app.exception_handler(SendingDisabled)
    async def _disabled(request: Request, e: SendingDisabled) -> JSONResponse:
        return error(409, "sending_disabled", str(e))

    @app.exception_handler(SecretsError)
    async def _keys(request: Request, e: SecretsError) -> JSONResponse:
        return error(409, "secret_unreadable", str(e))  # which secret and what to do; never a secret

    @app.exception_handler(TooManyRequests)
    async def _busy(request: Request, e: TooManyRequests) -> JSONResponse:
        return error(429, "too_many_requests", e.message, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(DeliveryError)
    async def _upstream(request: Request, e: DeliveryError) -> JSONResponse:
        return error(502, "upstream_failed", str(e))

    async def _maybe_unavailable(request: Request, e: Exception) -> JSONResponse:
        reason = unavailable(e)
        if reason is None:
            raise e  # a bug: answered 500 by _bug, and raised again for the server's log
        return _database_down(request, reason, e)

    from sqlalchemy.exc import SQLAlchemyError

    app.add_exception_handler(SQLAlchemyError, _maybe_unavailable)
    app.add_exception_handler(OSError, _maybe_unavailable)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # The type and the route only: an exception's text may quote a request's secret.
        log.error("internal error in %s %s: %s", request.method, request.url.path, traceback_of(e))
        return error(500, "internal", "mailgate failed to answer this request; the operator's log has the error type")


def _listed(problems: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The first MAX_PROBLEMS problems as the reply lists them, each cut short."""
    return [
        {"field": _text(f, _FIELD_LENGTH), "problem": _text(p, _PROBLEM_LENGTH)} for f, p in problems[:MAX_PROBLEMS]
    ]
