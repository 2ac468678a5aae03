"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from serve.deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    checks = {"model": state.engine.alive, "adapters": state.hotswap.ready}
    for name, ping in (("bus", state.bus.ping), ("registry", state.registry.ping)):
        try:
            await run_in_threadpool(ping)
            checks[name] = True
        except Exception:
            checks[name] = False
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    state.metrics.running.set(state.engine.running)
    state.metrics.waiting.set(state.engine.waiting)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
