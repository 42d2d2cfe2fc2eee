"""FastAPI dependencies: the app state and the authenticated caller, as ``Annotated`` aliases.

Keys are checked from the headers alone by :class:`gateway.middleware.AuthMiddleware`, before any body is read;
it puts the caller in the request scope (``scope["state"]``), where these dependencies find it. A route outside
the middleware's prefixes (or an app without it) is checked here, with the same functions.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import AuthError
from gateway.logs import annotate
from gateway.state import AppState

TENANT_SCOPE_KEY = "tenant"
"""Where the middleware puts the authenticated tenant id (``scope["state"]``, i.e. ``request.state``)."""
ADMIN_SCOPE_KEY = "admin"
"""Set (True) in ``scope["state"]`` once the admin key was checked."""


async def get_state(request: Request) -> AppState:  # async: FastAPI would run a plain def in a thread
    state: AppState = request.app.state.banyan
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def bearer_token(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer <key>`` header (:class:`AuthError` for anything else)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Missing API key: send it as `Authorization: Bearer <key>`.")
    return token.strip()


async def authenticate_tenant(state: AppState, authorization: str | None) -> str:
    """The tenant the bearer key belongs to; :class:`AuthError` for anything else (the admin key included, and the
    keys of a tenant being deleted: :meth:`gateway.tenants.Tenants.authenticate` answers None for them)."""
    tenant = await state.tenants.authenticate(bearer_token(authorization))
    if tenant is None:
        raise AuthError("Incorrect API key provided.")
    return tenant


def check_admin(state: AppState, authorization: str | None) -> None:
    expected = state.settings.admin_key.get_secret_value().encode()
    if not expected or not hmac.compare_digest(bearer_token(authorization).encode(), expected):
        raise AuthError("Incorrect admin key provided.")


async def get_tenant_id(request: Request, state: StateDep) -> str:
    """The tenant the bearer key belongs to; 401 for anything else (the admin key included)."""
    tenant = getattr(request.state, TENANT_SCOPE_KEY, None)
    if not isinstance(tenant, str):
        tenant = await authenticate_tenant(state, request.headers.get("authorization"))
    annotate(tenant=tenant)
    return tenant


async def require_admin(request: Request, state: StateDep) -> None:
    if getattr(request.state, ADMIN_SCOPE_KEY, None) is not True:
        check_admin(state, request.headers.get("authorization"))


TenantDep = Annotated[str, Depends(get_tenant_id)]
AdminDep = Depends(require_admin)
