"""FastAPI dependencies: the app state and the authenticated caller, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import AuthError
from gateway.logs import annotate
from gateway.state import AppState


async def get_state(request: Request) -> AppState:  # async: FastAPI would run a plain def in a thread
    state: AppState = request.app.state.banyan
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Missing API key: send it as `Authorization: Bearer <key>`.")
    return token.strip()


async def get_tenant_id(request: Request, state: StateDep) -> str:
    """The tenant the bearer key belongs to; 401 for anything else (the admin key included)."""
    tenant = await state.tenants.authenticate(_bearer(request))
    if tenant is None:
        raise AuthError("Incorrect API key provided.")
    annotate(tenant=tenant)
    return tenant


async def require_admin(request: Request, state: StateDep) -> None:
    expected = state.settings.admin_key.get_secret_value().encode()
    if not expected or not hmac.compare_digest(_bearer(request).encode(), expected):
        raise AuthError("Incorrect admin key provided.")


TenantDep = Annotated[str, Depends(get_tenant_id)]
AdminDep = Depends(require_admin)
