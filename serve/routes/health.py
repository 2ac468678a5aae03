"""Liveness, readiness and the Prometheus exposition.

Readiness means "can take chat and feedback now": the model runs, the active version was
loaded once, and events can be recorded. With Kafka behind the spool, a down broker does not
make the server unready (events wait in the spool, and `spool` in the body says so); a full
spool does, since every chat and rating would be refused. The registry (and the Redis ledger
beside it) is reported but does not decide: while it is away the replica keeps serving its
current version, and a load balancer that dropped every replica over a Redis restart would
turn a blip into an outage.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from serve.deps import State

router = APIRouter(tags=["health"])

READY = {
    "description": "Ready: chat and feedback can be taken now",
    "content": {"application/json": {"schema": {"type": "object", "required": ["status", "checks"]}}},
}
METRICS = {
    "description": "The Prometheus text exposition",
    "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz", responses={200: READY, 503: {**READY, "description": "Not ready: `checks` says what is missing"}}
)
async def readyz(state: State) -> JSONResponse:
    checks = {"model": state.engine.alive, "adapters": state.hotswap.ready}
    for name, ping in (("bus", state.bus.ping), ("registry", state.registry.ping)):
        try:
            await run_in_threadpool(ping)
            checks[name] = True
        except Exception:
            checks[name] = False
    ready = all(ok for name, ok in checks.items() if name != "registry")
    status = "not ready" if not ready else "ready" if checks["registry"] else "ready, registry unreachable"
    body: dict = {"status": status, "checks": checks}
    if state.spool is not None:
        spool = state.spool.status()
        body["spool"] = {
            "depth": spool.depth,
            "max_events": spool.max_events,
            "oldest_age_seconds": round(spool.oldest_age_s, 3),
            "bus_reachable": spool.bus_up,
            "last_error": spool.last_error,
        }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: METRICS})
async def metrics(state: State) -> Response:
    state.metrics.forget_idle_versions(state.settings.ledger_ttl_s)  # ratings of them can no longer come
    state.metrics.running.set(state.engine.running)
    state.metrics.waiting.set(state.engine.waiting)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
