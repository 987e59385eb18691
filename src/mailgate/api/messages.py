"""/v1/messages: submit (whole, or as a notification template and its data), read, retry and
cancel messages. A sender or tenant-admin token sees only its tenant's messages; another tenant's
message does not exist for it (404)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from ..access import Principal
from ..message import Message
from ..notifications.store import Rendered
from ..outbox.store import MAX_ID, STATUSES
from ..service import Mailgate
from .deps import Service, Who
from .errors import ErrorReply
from .schemas import BatchIn, BatchItem, BatchResults, Json, MessageIn, Submitted, TenantQuery

MessageId = Annotated[int, Path(ge=1, le=MAX_ID)]
router = APIRouter(prefix="/v1/messages", tags=["messages"], responses={
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
    503: {"model": ErrorReply, "description": "The database can't be used just now: try again after Retry-After."},
})  # fmt: skip


@router.post("", status_code=202, response_model=Submitted, responses={
    200: {"model": Submitted, "description": "The idempotency key was used before: the first message."},
    409: {"model": ErrorReply},
})  # fmt: skip
async def submit(
    body: MessageIn,
    mg: Service,
    who: Who,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Any:
    """Store a message in the outbox (202); a worker delivers it. The same `Idempotency-Key` for
    the same tenant answers the first message (200, `replayed: true`) and stores nothing new."""
    who.must_be("system-admin", "sender")
    tenant = _tenant_of(body.tenant, who)
    rendered = await _rendered(mg, tenant, body)
    message = body.to_message(rendered)
    done = await mg.accept(tenant, message, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/messages/{done.id}"
    if done.replayed:  # the first message's answer again; nothing new was stored
        response.status_code = 200
    locale = rendered.locale if rendered is not None else None
    return {"id": done.id, "tenant": tenant, "status": done.status, "replayed": done.replayed, "locale": locale}


@router.post("/batch", response_model=BatchResults, response_model_exclude_none=True)
async def submit_batch(body: BatchIn, mg: Service, who: Who) -> Any:
    """Store up to 500 messages (200): `results` answers each in order, `{"id", "tenant",
    "status", "replayed"}` or `{"error": {"status", "code", "message", "problems"}}` as
    POST /v1/messages would have answered it alone. The valid ones are committed together."""
    from pydantic import ValidationError

    from ..errors import InvalidInput, NotFound, SendingDisabled
    from .errors import _listed, _problem

    who.must_be("system-admin", "sender")
    results: list[dict[str, Any] | None] = [None] * len(body.messages)
    groups: dict[str, list[tuple[int, Message, str | None]]] = {}
    # What templates render to, all items together, is held to what one request may carry: an
    # item's 64 K characters of data render to up to 3 × 512 K, so 500 of them were ~750 M
    # characters in memory from a request of ~32 MB.
    budget = mg.config.max_request_size
    for i, raw in enumerate(body.messages):
        if not isinstance(raw, dict):
            listed = _listed([(f"messages[{i}]", f"is {_json_kind(raw)}, not a JSON object (a message)")])
            results[i] = _failed(422, "invalid_input", "the message is not valid", listed)
            continue
        try:
            item = BatchItem.model_validate(raw)
            tenant = _tenant_of(item.tenant or body.tenant, who)
            rendered = await _rendered(mg, tenant, item)  # a template, as a single submit
            if rendered is not None:
                budget -= len(rendered.subject) + len(rendered.text) + len(rendered.html or "")
                if budget < 0:
                    limit = f"{mg.config.max_request_size:,} characters together (MAILGATE_MAX_REQUEST_SIZE)"
                    results[i] = _failed(413, "batch_too_large", f"the batch's templates render to more than "
                                         f"{limit}: send this message in another batch")  # fmt: skip
                    continue
            message = item.to_message(rendered)
            groups.setdefault(tenant, []).append((i, message, item.idempotency_key))
        except ValidationError as e:
            problems = [_problem(x) for x in e.errors()]
            results[i] = _failed(422, "invalid_input", "the message is not valid", _listed(problems))
        except NotFound as e:
            results[i] = _failed(404, "not_found", str(e), _listed(e.problems))
        except InvalidInput as e:
            results[i] = _failed(422, "invalid_input", str(e), _listed(e.problems))
    for tenant, members in groups.items():
        try:
            await mg.tenants.get(tenant)  # a system admin may name one that does not exist
            answers: list[Any] = await mg.accept_many(tenant, [(m, k) for _, m, k in members])
        except NotFound as e:
            answers = [_failed(404, "not_found", str(e), _listed(e.problems))] * len(members)
        except SendingDisabled as e:
            answers = [_failed(409, "sending_disabled", str(e))] * len(members)
        for (i, _, _), answer in zip(members, answers, strict=True):
            if isinstance(answer, InvalidInput):
                answer = _failed(422, "invalid_input", str(answer), _listed(answer.problems))
            elif not isinstance(answer, dict):
                answer = {"id": answer.id, "tenant": tenant, "status": answer.status, "replayed": answer.replayed}
            results[i] = answer
    return {"results": results}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _failed(status: int, code: str, message: str, problems: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message[:20_000], "problems": problems or []}}


@router.get("")
async def list_messages(
    mg: Service,
    who: Who,
    tenant: TenantQuery = None,
    status: Annotated[str | None, Query(max_length=16, description=f"One of {', '.join(STATUSES)}.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only messages with a smaller id (next page).")
    ] = None,
) -> Json:
    """Messages, newest first: `next_before` is the `before` of the next page (null at the end)."""
    tenant = who.tenant_for(tenant)
    if tenant is not None:
        await mg.tenants.get(tenant)
    found = await mg.queue.list_messages(tenant_id=tenant, status=status, limit=limit, before=before)
    return {
        "messages": [m.to_dict() for m in found],
        "next_before": found[-1].id if len(found) == limit else None,
    }


@router.get("/{message_id}")
async def get_message(message_id: MessageId, mg: Service, who: Who) -> Json:
    """A message: status, every recipient's outcome, every attempt with the server's replies."""
    return (await mg.queue.get(message_id, tenant_id=who.tenant_for(None))).to_dict()


@router.post("/{message_id}/retry", responses={409: {"model": ErrorReply}})
async def retry(message_id: MessageId, mg: Service, who: Who) -> Json:
    """Send again now to every recipient that has not accepted it."""
    who.must_be("system-admin", "tenant-admin")
    return (await mg.queue.retry(message_id, tenant_id=who.tenant_for(None))).to_dict()


@router.post("/{message_id}/cancel", responses={409: {"model": ErrorReply}})
async def cancel(message_id: MessageId, mg: Service, who: Who) -> Json:
    """Cancel a message that is waiting (queued, deferred or held)."""
    who.must_be("system-admin", "tenant-admin")
    return (await mg.queue.cancel(message_id, tenant_id=who.tenant_for(None))).to_dict()


async def _rendered(mg: Mailgate, tenant: str, body: MessageIn) -> Rendered | None:
    """A template's parts, as the tenant has it; a missing or unknown variable is a 422 naming it."""
    from ..errors import InvalidInput

    if problems := body.template_problems():
        raise InvalidInput(problems)
    if body.template is None:
        return None
    return await mg.templates.render(body.template, body.locale, tenant, body.data)


def _tenant_of(named: str | None, who: Principal) -> str:
    from ..errors import InvalidInput

    tenant = who.tenant_for(named)
    if tenant is None:
        raise InvalidInput([("tenant", "is required with a system-admin token")])
    assert isinstance(tenant, str)
    return tenant
