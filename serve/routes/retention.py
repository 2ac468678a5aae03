"""Admin API for retention (registry.retention): prune now, pin and unpin versions.

The learner prunes on its own schedule; these are for operators: to free space at once, to see
what a prune would take (`dry_run`), and to keep a version whatever happens (a pin). The policy
is this server's settings: `KTO_ROLLBACK_DEPTH`, `KTO_RETENTION_GRACE_S`.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from registry.retention import Policy
from serve.deps import Admin, ServeState, State
from serve.errors import AUTHENTICATED, responses
from serve.schemas import PinRequest, PruneRequest

router = APIRouter(prefix="/v1/adapters", tags=["admin"], responses=responses(*AUTHENTICATED, 403))


@router.post("/prune", responses=responses(507))
async def prune(state: State, actor: Admin, body: PruneRequest | None = None) -> dict:
    """Delete the files of every version the policy lets go (each one a `prune` history entry);
    `kept` says why each other version stays."""
    body = body or PruneRequest()
    policy = Policy(depth=state.settings.rollback_depth, grace_s=state.settings.retention_grace_s)
    report = await run_in_threadpool(
        lambda: state.registry.prune(policy, actor=actor, dry_run=body.dry_run, reason=body.reason)
    )
    usage = await run_in_threadpool(state.registry.disk_usage)
    return {**report.to_json(), "on_disk": {"versions": usage.versions, "bytes": usage.bytes}}


@router.put("/{version}/pin", responses=responses(404, 507))
async def pin(version: str, state: State, actor: Admin, body: PinRequest | None = None) -> dict:
    """Keep the version's files whatever retention says; 404 `version_pruned` when they are gone."""
    return await _pin(state, version, True, actor, body)


@router.delete("/{version}/pin", responses=responses(404, 507))
async def unpin(version: str, state: State, actor: Admin) -> dict:
    """Let retention decide for the version again."""
    return await _pin(state, version, False, actor, None)


async def _pin(state: ServeState, version: str, pinned: bool, actor: str, body: PinRequest | None) -> dict:
    reason = (body or PinRequest()).reason
    entry = await run_in_threadpool(lambda: state.registry.pin(version, pinned, actor=actor, reason=reason))
    return {"version": version, "pinned": pinned, "entry": entry and entry.to_json()}
