"""Liveness, readiness and the Prometheus exposition.

Readiness means "can take chat and feedback now": the model runs, the active version was
loaded once, and events can be recorded. With Kafka behind the spool, a down broker does not
make the server unready (events wait in the spool, and `spool` in the body says so); a full
spool does, since every chat and rating would be refused. The registry (and the Redis ledger
beside it) is reported but does not decide: while it is away the replica keeps serving its
current version, and a load balancer that dropped every replica over a Redis restart would
turn a blip into an outage.

A full disk decides (`disk`): while a filesystem this server writes has less free than the
reserve (foundation.disk), chat and feedback answer 507, so the replica is not ready; it is
again once space is freed. Under `kto-loop up`, the learner and the labeler are reported
(`learner`, `labeler`, and `processes` with restarts and the last exit status) but do not
decide either: serving works without them, and a load balancer must not drop a replica because
its learner restarts.
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
    spaces = await run_in_threadpool(state.disk.spaces)
    checks["disk"] = all(s.writable for s in spaces)
    ready = all(ok for name, ok in checks.items() if name != "registry")
    status = "not ready" if not ready else "ready" if checks["registry"] else "ready, registry unreachable"
    body: dict = {"status": status, "checks": checks}
    body["disk"] = [{"path": str(s.path), "free_bytes": s.free_bytes, "reserve_bytes": s.reserve_bytes} for s in spaces]
    if state.processes is not None:
        processes = state.processes()
        checks.update({p.name: p.up for p in processes})  # after `ready`: reported, never deciding
        body["processes"] = {p.name: p.to_json() for p in processes}
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
