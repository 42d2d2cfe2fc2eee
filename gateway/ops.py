"""Operations routes: liveness, readiness (engines, Redis, object storage) and Prometheus metrics.

``/readyz`` is public: it names the role of a dependency that failed (``engine``, ``redis``, ``object_store``),
never an address or an error; the details go to the log. Its check is cached for ``readiness_cache_s``
(:class:`gateway.health.Readiness`), and it answers 503 as soon as the gateway drains for a shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from gateway.deps import StateDep
from gateway.errors import error_body
from gateway.health import ROLES, probe
from gateway.state import AppState

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(state: AppState) -> dict[str, bool]:
    """Each role's health; with several base models, ``engine`` needs a healthy replica of every base, and
    ``engine:<base id>`` says which base has none."""
    (redis_ok, store_ok), pools = await asyncio.gather(
        asyncio.gather(probe(state.redis.ping(), role="redis"), probe(state.store.ping(), role="object_store")),
        asyncio.gather(*(base.engines.check() for base in state.bases.values())))
    per_base = {base: any(replicas.values()) for base, replicas in zip(state.bases, pools, strict=True)}
    checks = {"redis": redis_ok, "object_store": store_ok, "engine": all(per_base.values())}
    if len(per_base) > 1:
        checks.update({f"engine:{base}": ok for base, ok in per_base.items()})
    return checks


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    if state.drain.draining:
        return JSONResponse({"status": "draining", **error_body("The gateway is shutting down.",
                                                                type_="server_error")}, status_code=503)
    failed = await state.readiness.failed(lambda: _check(state))
    body: dict[str, Any] = {"status": "unavailable" if failed else "ready",
                            "checks": {role: "failed" if role in failed else "ok" for role in ROLES}}
    body["checks"].update({role: "failed" for role in failed if role not in ROLES})
    if failed:
        code = "engine_unavailable" if "engine" in failed else "dependency_unavailable"
        body.update(error_body(f"Not ready: {', '.join(failed)} unavailable.", type_="server_error", code=code))
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
