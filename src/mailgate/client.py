"""A small Python client of mailgate's HTTP API: `Client` (sync) and `AsyncClient`, with retries
that never send a message twice.

    with Client("https://mail.example.net", "mgt_…") as mail:
        sent = mail.send(to="alice@example.org", subject="Welcome", text="…",
                         attachments=[("terms.pdf", pdf_bytes, "application/pdf")])
        mail.get(sent.id)["status"]

Every submit carries an `Idempotency-Key` (made here when the caller gives none), and the retries
of one `send` reuse it: a reply lost after the server committed the message is retried, and the
server answers the first message again (200, `replayed`) instead of storing a second one.

Retried: connection failures and timeouts, 429 and 503 (after their Retry-After, when it is no
longer than `max_retry_after`), and 500/502/504 — every request this client makes is safe to
repeat (reads, and submits under their key). Other errors raise at once, each a subclass of
`ApiError` carrying the API's `code`, `message` and `problems`.

httpx2 is imported when a client is made, not with this module: a Django settings module that
names the backend, or the CLI, does not pay for it.
"""

from __future__ import annotations

import base64
import random
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar

if TYPE_CHECKING:
    import httpx2

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "Submitted",
    "TransportFailed",
    "Unauthorized",
    "Unavailable",
]

USER_AGENT = "mailgate-client/0.1"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is the caller's decision, not a hidden sleep
_BACKOFF_BASE, _BACKOFF_MAX = 0.25, 8.0
_RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})

Addresses = str | Sequence[str] | None
# (filename, bytes, content type) or, for an inline part the HTML refers to as cid:…, with its content id.
AttachmentInput = tuple[str, bytes, str] | tuple[str, bytes, str, str | None]


# ---- results and errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """What a submit answered: the message's id, its tenant and status (`queued`, or `held`), and
    whether the idempotency key had been used before (the first message's answer, nothing new)."""

    id: int
    tenant: str
    status: str
    replayed: bool
    idempotency_key: str


class ApiError(Exception):
    """An error answer of the API (or, for TransportFailed, none at all). `code` is the API's
    stable code (`invalid_input`, `unauthorized`…), `problems` its (field, problem) list."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        problems: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message
        self.problems = list(problems)
        self.retry_after = retry_after


class Unauthorized(ApiError):
    """401: no token, or not a valid one (revoked, mistyped)."""


class Forbidden(ApiError):
    """403: the token's role may not do this."""


class NotFound(ApiError):
    """404: no such message — or another tenant's, which is the same to a tenant's token."""


class Conflict(ApiError):
    """409: `conflict`, or `sending_disabled` (the message says why)."""


class InvalidInput(ApiError):
    """422: every problem with the message at once, in `problems`."""


class Unavailable(ApiError):
    """429 or 503 after the retries, or with a Retry-After longer than the client waits."""


class TransportFailed(ApiError):
    """No answer: the connection failed or timed out on every attempt."""


_ERRORS: dict[int, type[ApiError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 422: InvalidInput, 429: Unavailable,
    503: Unavailable,
}  # fmt: skip


def _error_of(response: httpx2.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    problems = [
        (str(p.get("field", "")), str(p.get("problem", ""))) for p in body.get("problems") or [] if isinstance(p, dict)
    ]
    code = str(body.get("code") or "error")
    message = str(body.get("message") or response.reason_phrase or "the request failed")
    kind = _ERRORS.get(response.status_code, ApiError)
    return kind(response.status_code, code, message, problems, _retry_after(response))


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # the HTTP-date form: not worth trusting a clock we don't share
        return None


# ---- what a submit sends ---------------------------------------------------------------------------


def _list(value: Addresses) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _attachment(item: AttachmentInput | Any) -> dict[str, Any]:
    if isinstance(item, tuple):
        filename, data, content_type, *rest = item
        content_id = rest[0] if rest else None
    else:  # a mailgate.Attachment, or anything shaped like one
        filename, data, content_type = item.filename, item.data, item.content_type
        content_id = getattr(item, "content_id", None)
    return {
        "filename": filename,
        "content_type": content_type,
        "content_base64": base64.b64encode(bytes(data)).decode("ascii"),
        "content_id": content_id,
    }


def message_body(
    *,
    to: Addresses = None,
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    from_: str | None = None,
    cc: Addresses = None,
    bcc: Addresses = None,
    reply_to: Addresses = None,
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[AttachmentInput | Any] = (),
    tenant: str | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    """The JSON `POST /v1/messages` takes. The server checks it (every problem at once, 422)."""
    body: dict[str, Any] = {"to": _list(to), "subject": subject}
    for name, value in (("cc", _list(cc)), ("bcc", _list(bcc)), ("reply_to", _list(reply_to))):
        if value:
            body[name] = value
    optional = {"from": from_, "text": text, "html": html, "tenant": tenant, "message_id": message_id}
    body.update((k, v) for k, v in optional.items() if v is not None)
    if headers:
        body["headers"] = dict(headers)
    files = [_attachment(a) for a in attachments]
    if files:
        body["attachments"] = files
    return body


def new_idempotency_key() -> str:
    return f"mgc-{uuid.uuid4().hex}"


def _submitted(response: httpx2.Response, key: str) -> Submitted:
    data = response.json()
    return Submitted(int(data["id"]), str(data["tenant"]), str(data["status"]), bool(data.get("replayed")), key)


# ---- retries ----------------------------------------------------------------------------------------
#
# The request/retry policy of both clients, without I/O: a generator that yields the next request to
# make, with the seconds to wait before it, and is sent each request's outcome (the response, or the
# transport error); its return value is the operation's result. `Client` and `AsyncClient` only drive
# it (`_run`), each with its own I/O.


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


_T = TypeVar("_T")
if TYPE_CHECKING:
    _Plan: TypeAlias = Generator[tuple[float, _Call], httpx2.Response | Exception, _T]


class _Retries:
    """When to try again and how long to wait first; shared by both clients."""

    def __init__(self, retries: int, max_retry_after: float) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.retries, self.max_retry_after = retries, max_retry_after

    def backoff(self, attempt: int) -> float:
        # Full jitter: clients that failed together don't come back together.
        return random.uniform(0, min(_BACKOFF_MAX, _BACKOFF_BASE * 2**attempt))

    def exchange(self, call: _Call) -> _Plan[httpx2.Response]:
        """Make `call` until an answer is final: the response, or its ApiError raised."""
        delay, attempt = 0.0, 0
        while True:
            outcome = yield delay, call
            if isinstance(outcome, Exception):  # no answer
                if attempt >= self.retries:
                    raise TransportFailed(
                        None, "transport_failed", f"mailgate did not answer: {type(outcome).__name__}"
                    ) from outcome
                delay = self.backoff(attempt)
            else:
                told = _retry_after(outcome)
                if (outcome.status_code not in _RETRIED_STATUSES or attempt >= self.retries
                        or (told is not None and told > self.max_retry_after)):  # fmt: skip
                    if outcome.status_code >= 400:
                        raise _error_of(outcome)
                    return outcome
                delay = self.backoff(attempt) if told is None else told
            attempt += 1


def _submit_plan(retries: _Retries, body: Mapping[str, Any], idempotency_key: str | None) -> _Plan[Submitted]:
    key = idempotency_key or new_idempotency_key()
    call = _Call("POST", "/v1/messages", json=dict(body), headers={"Idempotency-Key": key})
    return _submitted((yield from retries.exchange(call)), key)


def _get_plan(retries: _Retries, message_id: int) -> _Plan[dict[str, Any]]:
    data: dict[str, Any] = (yield from retries.exchange(_Call("GET", f"/v1/messages/{int(message_id)}"))).json()
    return data


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT, "Accept": "application/json"}


# ---- the clients ------------------------------------------------------------------------------------


class Client:
    """The sync client. `base_url` is where `mailgate serve` answers; `token` a sender token (its
    tenant is the message's) or a system-admin token (then `tenant=` is required on `send`)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        import httpx2

        self._retries = _Retries(retries, max_retry_after)
        self._http = httpx2.Client(
            base_url=base_url, headers=_headers(token), timeout=timeout, follow_redirects=False, transport=transport
        )

    def send(
        self,
        *,
        to: Addresses = None,
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        from_: str | None = None,
        cc: Addresses = None,
        bcc: Addresses = None,
        reply_to: Addresses = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[AttachmentInput | Any] = (),
        tenant: str | None = None,
        message_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Submit a message to the outbox; a worker delivers it. Raises an ApiError subclass."""
        body = message_body(to=to, subject=subject, text=text, html=html, from_=from_, cc=cc, bcc=bcc,
                            reply_to=reply_to, headers=headers, attachments=attachments, tenant=tenant,
                            message_id=message_id)  # fmt: skip
        return self.submit(body, idempotency_key=idempotency_key)

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Submitted:
        """Submit a message given as the API's JSON (`message_body` makes one)."""
        return self._run(_submit_plan(self._retries, body, idempotency_key))

    def get(self, message_id: int) -> dict[str, Any]:
        """The message: status, every recipient's outcome, every attempt with the server's replies."""
        return self._run(_get_plan(self._retries, message_id))

    def _run(self, plan: _Plan[_T]) -> _T:
        import httpx2

        try:
            delay, call = next(plan)
            while True:
                time.sleep(delay)
                try:
                    outcome: httpx2.Response | Exception = self._http.request(
                        call.method, call.path, json=call.json, headers=call.headers
                    )
                except httpx2.TransportError as e:
                    outcome = e
                delay, call = plan.send(outcome)
        except StopIteration as done:
            result: _T = done.value
            return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio: the same arguments, `await`ed methods."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        import httpx2

        self._retries = _Retries(retries, max_retry_after)
        self._http = httpx2.AsyncClient(
            base_url=base_url, headers=_headers(token), timeout=timeout, follow_redirects=False, transport=transport
        )

    async def send(
        self,
        *,
        to: Addresses = None,
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        from_: str | None = None,
        cc: Addresses = None,
        bcc: Addresses = None,
        reply_to: Addresses = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[AttachmentInput | Any] = (),
        tenant: str | None = None,
        message_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        body = message_body(to=to, subject=subject, text=text, html=html, from_=from_, cc=cc, bcc=bcc,
                            reply_to=reply_to, headers=headers, attachments=attachments, tenant=tenant,
                            message_id=message_id)  # fmt: skip
        return await self.submit(body, idempotency_key=idempotency_key)

    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Submitted:
        return await self._run(_submit_plan(self._retries, body, idempotency_key))

    async def get(self, message_id: int) -> dict[str, Any]:
        return await self._run(_get_plan(self._retries, message_id))

    async def _run(self, plan: _Plan[_T]) -> _T:
        import asyncio

        import httpx2

        try:
            delay, call = next(plan)
            while True:
                await asyncio.sleep(delay)
                try:
                    outcome: httpx2.Response | Exception = await self._http.request(
                        call.method, call.path, json=call.json, headers=call.headers
                    )
                except httpx2.TransportError as e:
                    outcome = e
                delay, call = plan.send(outcome)
        except StopIteration as done:
            result: _T = done.value
            return result

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
