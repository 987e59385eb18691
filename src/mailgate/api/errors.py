"""Every error the API answers is JSON with a stable `code` (for programs) and a `message` (for
people), plus `problems` (each {"field", "problem"}) when the input was at fault.

| status | code |
| --- | --- |
| 400 | `invalid_json` (the body is not JSON), `bad_request` |
| 401 | `unauthorized` (no token, or not a valid one) |
| 403 | `forbidden` (the token's role does not allow it) |
| 404 | `not_found` (also: another tenant's data — it does not exist, as far as the caller can tell) |
| 405 | `method_not_allowed` |
| 409 | `conflict`, `sending_disabled` |
| 413 | `payload_too_large` |
| 415 | `unsupported_media_type` |
| 422 | `invalid_input` |
| 502 | `upstream_failed` (a provider's token endpoint refused or could not be reached) |
| 500 | `internal` (a bug: logged, never with a secret) |
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..access import Forbidden
from ..errors import Conflict, DeliveryError, InvalidInput, NotFound, SendingDisabled

log = logging.getLogger("mailgate.api")

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
    500: "internal",
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


def error(
    status: int,
    code: str,
    message: str,
    problems: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=status, headers=headers or None)


def _problems(e: InvalidInput) -> list[dict[str, str]]:
    return [{"field": f, "problem": p} for f, p in e.problems]


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(x) for x in loc if x not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(x) for x in loc)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(x.get("type") == "json_invalid" for x in errors):
            return error(400, "invalid_json", "the request body is not valid JSON")
        problems = []
        for x in errors:
            field = _field(tuple(x.get("loc", ())))
            text = str(x.get("msg", "is not valid"))
            if x.get("type") == "extra_forbidden":
                text = "is not a field here"
            elif x.get("type") == "missing":
                text = "is required"
            problems.append({"field": field, "problem": text})
        return error(422, "invalid_input", "; ".join(f"{p['field']}: {p['problem']}" for p in problems), problems)

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
        return error(404, "not_found", str(e), _problems(e))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict) -> JSONResponse:
        return error(409, "conflict", str(e), _problems(e))

    @app.exception_handler(InvalidInput)
    async def _input(request: Request, e: InvalidInput) -> JSONResponse:
        return error(422, "invalid_input", str(e), _problems(e))

    @app.exception_handler(SendingDisabled)
    async def _disabled(request: Request, e: SendingDisabled) -> JSONResponse:
        return error(409, "sending_disabled", str(e))

    @app.exception_handler(DeliveryError)
    async def _upstream(request: Request, e: DeliveryError) -> JSONResponse:
        return error(502, "upstream_failed", str(e))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # The type and the route only: an exception's text may quote a request's secret.
        log.error("internal error in %s %s: %s\n%s", request.method, request.url.path, type(e).__name__,
                  "".join(traceback.format_tb(e.__traceback__)))  # fmt: skip
        return error(500, "internal", "mailgate failed to answer this request; the operator's log has the error type")
