"""What every route takes: the service, and the principal its bearer token names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..access import Principal
from ..service import Mailgate
from .errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API token: `mailgate tokens create --role …`")


async def service(request: Request) -> Mailgate:  # async: FastAPI would run a plain def in a thread
    mg: Mailgate = request.app.state.mg
    return mg


async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None:
        raise Unauthorized("send an API token: Authorization: Bearer mgt_…")
    mg: Mailgate = request.app.state.mg
    found = await mg.api_tokens.authenticate(credentials.credentials)
    if found is None:
        raise Unauthorized("this API token is not valid (unknown, or revoked)")
    return found


async def acting(request: Request, who: Annotated[Principal, Depends(principal)]) -> Mailgate:
    """The service, with changes audited under the token's name."""
    mg: Mailgate = request.app.state.mg
    return mg.acting_as(who.actor)


Service = Annotated[Mailgate, Depends(service)]
Acting = Annotated[Mailgate, Depends(acting)]
Who = Annotated[Principal, Depends(principal)]
