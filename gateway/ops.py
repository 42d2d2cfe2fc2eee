"""Operations routes: liveness, readiness (engines, Redis, object storage) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from gateway.deps import StateDep

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _probe(check: Any) -> str | None:
    try:
        await asyncio.wait_for(check, timeout=3.0)
        return None
    except Exception as e:  # readiness reports any failure by kind, never raises
        return type(e).__name__


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    redis_error, store_error, engines = await asyncio.gather(
        _probe(state.redis.ping()), _probe(state.store.ping()), state.engines.check())
    checks: dict[str, Any] = {
        "redis": "ok" if redis_error is None else f"failed: {redis_error}",
        "object_storage": "ok" if store_error is None else f"failed: {store_error}",
        "engines": {url: "ok" if ok else "failed" for url, ok in engines.items()},
    }
    ready = redis_error is None and store_error is None and any(engines.values())
    failed = [name for name, value in checks.items() if value != "ok" and name != "engines"]
    if not any(engines.values()):
        failed.append("engines")
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if not ready:
        body["error"] = {"message": f"Not ready: {', '.join(failed)} unavailable.", "type": "server_error",
                         "param": None, "code": "dependency_unavailable" if "engines" not in failed
                         else "engine_unavailable"}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
