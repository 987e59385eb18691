"""/v1/support-requests (write to support, with the system information attached) and
/v1/system-settings (the operator's settings kept in the database: the global support address)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import Field

from ..errors import InvalidInput
from ..support import MAX_SUBJECT, MAX_TEXT, NoSupportAddress
from .deps import Acting, Who
from .errors import ErrorReply, _listed, error
from .schemas import MAX_ADDRESS_LENGTH, Json, TenantId, _Input

router = APIRouter(responses={
    401: {"model": ErrorReply}, 403: {"model": ErrorReply}, 404: {"model": ErrorReply}, 422: {"model": ErrorReply},
    503: {"model": ErrorReply, "description": "The database can't be used just now: try again after Retry-After."},
})  # fmt: skip


class SupportRequestIn(_Input):
    """A support request. `tenant` is required with a system-admin token (a tenant's tokens write
    for their own). `reply_to`: where support answers (default: the tenant's admin address)."""

    tenant: TenantId | None = None
    subject: str = Field(max_length=MAX_SUBJECT)
    text: str = Field(max_length=MAX_TEXT)
    reply_to: Annotated[str, Field(max_length=MAX_ADDRESS_LENGTH)] | None = None
    attach_system_info: bool = True


class SupportRequestOut(_Input):
    id: int
    tenant: str
    status: str
    routed_to: str = Field(description='"tenant" (its own support address) or "global" (the global one).')
    sends_through: str | None = Field(description='The mail server it goes through: "tenant", "global", or null.')
    system_info_attached: bool
    warning: str | None = Field(description="Set when the request will wait (its mail server is marked broken, "
                                            "or sending is disabled).")  # fmt: skip


class SystemSettingsPatch(_Input):
    """Only the fields given change; `support_address: null` removes it."""

    support_address: Annotated[str, Field(max_length=MAX_ADDRESS_LENGTH)] | None = None


@router.post("/v1/support-requests", status_code=202, response_model=SupportRequestOut, tags=["support"],
             responses={409: {"model": ErrorReply, "description": "`no_support_address`: neither the tenant nor the "
                                  "system has a support address; `sending_disabled`."}})  # fmt: skip
async def support_request(body: SupportRequestIn, mg: Acting, who: Who, response: Response) -> Any:
    """Write to support: to the tenant's own support address when it has one and may set it, else
    to the global one. Stored in the tenant's outbox (202) and sent like any message, with
    `mailgate-system-info.json` attached unless `attach_system_info` is false — never a secret.
    The reply says which kind of address (`routed_to`), not the address."""
    who.must_be("system-admin", "tenant-admin", "sender")
    tenant = who.tenant_for(body.tenant)
    if tenant is None:
        raise InvalidInput([("tenant", "is required with a system-admin token")])
    try:
        done = await mg.support_request(tenant, subject=body.subject, text=body.text, reply_to=body.reply_to,
                                        attach_system_info=body.attach_system_info)  # fmt: skip
    except NoSupportAddress as e:
        return error(409, "no_support_address", str(e), _listed(e.problems))
    response.headers["Location"] = f"/v1/messages/{done.id}"
    return done.to_dict()


@router.get("/v1/system-settings", tags=["system"])
async def get_system_settings(mg: Acting, who: Who) -> Json:
    """The operator's settings kept in the database (system admin)."""
    who.must_be("system-admin")
    return (await mg.system.get()).to_dict()


@router.patch("/v1/system-settings", tags=["system"])
async def update_system_settings(body: SystemSettingsPatch, mg: Acting, who: Who) -> Json:
    """Change the fields given (system admin); audited like every settings change."""
    who.must_be("system-admin")
    given = body.model_fields_set
    return (
        await mg.system.update(
            support_address=body.support_address,
            clear_support_address="support_address" in given and body.support_address is None,
        )
    ).to_dict()
