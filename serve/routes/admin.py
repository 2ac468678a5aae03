"""Admin API (bearer `KTO_ADMIN_TOKEN`): versions with lineage, activate, roll back, history,
and the canary (registry.canary): show it with its latest evidence, start, promote, roll back,
pause, resume.

Changes go to the registry's active pointer, the truth every replica follows; this replica
switches before answering, the others within their poll interval.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from registry import BASE, VersionPruned
from registry import canary as canary_rules
from serve.deps import Admin, ServeState, State
from serve.errors import AUTHENTICATED, Conflict, responses
from serve.schemas import ActivateRequest, CanaryRequest, CanaryStartRequest, RollbackRequest

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["admin"], responses=responses(*AUTHENTICATED, 403))
CHANGES = responses(404, 409, 507)
"""What a change of the pointer or the canary may be refused with (507: the registry's disk is full)."""


@router.get("")
async def list_adapters(state: State, actor: Admin) -> dict:
    versions = await run_in_threadpool(state.registry.list_versions)
    active = await run_in_threadpool(state.registry.active)
    return {
        "active": active,
        "serving": state.hotswap.serving,
        "base_model": state.settings.base_model_id,
        "versions": [v.to_json() for v in versions],
    }


@router.get("/history")
async def history(state: State, actor: Admin) -> dict:
    entries = await run_in_threadpool(state.registry.history)
    return {"history": [e.to_json() for e in entries]}


@router.get("/canary")
async def show_canary(state: State, actor: Admin) -> dict:
    """The running canary (with the controller's latest evidence) and the last canary entry."""
    canary = await run_in_threadpool(state.registry.canary)
    entries = await run_in_threadpool(state.registry.history)
    last = next((e for e in reversed(entries) if e.action.startswith("canary_")), None)
    return {
        "canary": canary and canary.to_json(),
        "active": await run_in_threadpool(state.registry.active),
        "last": last and last.to_json(),
    }


@router.post("/canary", responses=CHANGES)
async def start_canary(body: CanaryStartRequest, state: State, actor: Admin) -> dict:
    await _check(state, body.version)
    entry = await run_in_threadpool(
        lambda: state.registry.start_canary(body.version, body.share, actor=actor, reason=body.reason)
    )
    return await _canary_settled(state, entry)


@router.post("/canary/promote", responses=CHANGES)
async def promote_canary(state: State, actor: Admin, body: CanaryRequest | None = None) -> dict:
    return await _decide(state, actor, body or CanaryRequest(), state.registry.promote_canary)


@router.post("/canary/rollback", responses=CHANGES)
async def rollback_canary(state: State, actor: Admin, body: CanaryRequest | None = None) -> dict:
    return await _decide(state, actor, body or CanaryRequest(), state.registry.rollback_canary)


async def _decide(state: ServeState, actor: str, body: CanaryRequest, decide) -> dict:
    """An operator's verdict on the running canary, recorded with the controller's latest evidence."""
    canary = await _running(state, body.version)
    entry = await run_in_threadpool(
        lambda: decide(canary.version, actor=actor, reason=body.reason, evidence=canary.evidence)
    )
    return await _canary_settled(state, entry)


@router.post("/canary/pause", responses=CHANGES)
async def pause_canary(state: State, actor: Admin, body: CanaryRequest | None = None) -> dict:
    return await _pause(state, actor, body or CanaryRequest(), True)


@router.post("/canary/resume", responses=CHANGES)
async def resume_canary(state: State, actor: Admin, body: CanaryRequest | None = None) -> dict:
    return await _pause(state, actor, body or CanaryRequest(), False)


async def _pause(state: ServeState, actor: str, body: CanaryRequest, paused: bool) -> dict:
    canary = await _running(state, body.version)
    entry = await run_in_threadpool(
        lambda: state.registry.pause_canary(canary.version, paused, actor=actor, reason=body.reason)
    )
    return await _canary_settled(state, entry)


async def _running(state: ServeState, version: str | None):
    """The running canary, of `version` if given; NoCanary (409) otherwise."""
    return canary_rules.require(await run_in_threadpool(state.registry.canary), version)


async def _canary_settled(state: ServeState, entry) -> dict:
    await state.hotswap.sync()  # route here now rather than at the next poll
    canary = await run_in_threadpool(state.registry.canary)
    return {
        "active": await run_in_threadpool(state.registry.active),
        "serving": state.hotswap.serving,
        "canary": canary and canary.to_json(),
        "entry": entry.to_json(),
    }


@router.post("/rollback", responses=CHANGES)
async def rollback(state: State, actor: Admin, body: RollbackRequest | None = None) -> dict:
    body = body or RollbackRequest()
    if body.to is not None and not _is_base(state, body.to):
        await _check(state, body.to)
    to = BASE if body.to is not None and _is_base(state, body.to) else body.to
    entry = await run_in_threadpool(lambda: state.registry.rollback(to, actor=actor, reason=body.reason))
    state.metrics.rollbacks.inc()
    return await _settled(state, entry)


@router.post("/{version}/activate", responses=CHANGES)
async def activate(version: str, state: State, actor: Admin, body: ActivateRequest | None = None) -> dict:
    body = body or ActivateRequest()
    target = None if _is_base(state, version) else version
    if target is not None:
        await _check(state, target)
    entry = await run_in_threadpool(lambda: state.registry.activate(target, actor=actor, reason=body.reason))
    return await _settled(state, entry)


def _is_base(state: ServeState, name: str) -> bool:
    return name in (BASE, state.settings.base_model_id)


async def _check(state: ServeState, version: str) -> None:
    """Refuse (409) a version this server cannot load, before the pointer moves."""
    info = await run_in_threadpool(state.registry.get, version)  # UnknownVersion -> 404
    if info.pruned_at is not None:  # its files are gone on purpose: not a broken version to reject
        raise VersionPruned(version, info.pruned_at)
    reasons = await run_in_threadpool(state.hotswap.check, version)
    if reasons:
        await run_in_threadpool(state.registry.reject, version, "; ".join(reasons))
        raise Conflict(f"version {version} cannot be served: {'; '.join(reasons)}", param="version")


async def _settled(state: ServeState, entry) -> dict:
    await state.hotswap.sync()  # switch here now rather than at the next poll
    return {"active": entry.version, "serving": state.hotswap.serving, "entry": entry.to_json()}


@router.get("/{version}", responses=responses(404))
async def version_page(version: str, state: State, actor: Admin) -> dict:
    """One version's page: its record (parent, training events and label counts in `lineage`,
    loss and gate in `metrics`, erasure `flags`), the versions trained from it, every history
    entry that names it (activations, rollbacks, canary steps and erasures with their evidence),
    and `served`: the responses it gave and their current votes, counted by the shared ledger."""
    info = await run_in_threadpool(state.registry.get, version)  # UnknownVersion -> 404
    versions = await run_in_threadpool(state.registry.list_versions)
    entries = await run_in_threadpool(state.registry.history)
    tally = await run_in_threadpool(state.ledger.tally, version)
    return {
        **info.to_json(),
        "children": [v.version for v in versions if v.parent == version],
        "history": [e.to_json() for e in entries if e.names(version)],
        "served": tally.to_json(),
    }
