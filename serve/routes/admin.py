"""Admin API (bearer `KTO_ADMIN_TOKEN`): versions with lineage, activate, roll back, history.

Changes go to the registry's active pointer, the truth every replica follows; this replica
switches before answering, the others within their poll interval.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from registry import BASE
from serve.deps import Admin, ServeState, State
from serve.errors import Conflict
from serve.schemas import ActivateRequest, RollbackRequest

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["admin"])


@router.get("")
async def list_adapters(state: State, actor: Admin) -> dict:
    versions = await run_in_threadpool(state.registry.list_versions)
    active = await run_in_threadpool(state.registry.active)
    return {"active": active, "serving": state.hotswap.serving, "base_model": state.settings.base_model_id,
            "versions": [v.to_json() for v in versions]}


@router.get("/history")
async def history(state: State, actor: Admin) -> dict:
    entries = await run_in_threadpool(state.registry.history)
    return {"history": [e.to_json() for e in entries]}


@router.post("/rollback")
async def rollback(state: State, actor: Admin, body: RollbackRequest | None = None) -> dict:
    body = body or RollbackRequest()
    if body.to is not None and not _is_base(state, body.to):
        await _check(state, body.to)
    to = BASE if body.to is not None and _is_base(state, body.to) else body.to
    entry = await run_in_threadpool(lambda: state.registry.rollback(to, actor=actor, reason=body.reason))
    return await _settled(state, entry)


@router.post("/{version}/activate")
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
    await run_in_threadpool(state.registry.get, version)  # UnknownVersion -> 404
    reasons = await run_in_threadpool(state.hotswap.check, version)
    if reasons:
        await run_in_threadpool(state.registry.reject, version, "; ".join(reasons))
        raise Conflict(f"version {version} cannot be served: {'; '.join(reasons)}", param="version")


async def _settled(state: ServeState, entry) -> dict:
    await state.hotswap.sync()  # switch here now rather than at the next poll
    return {"active": entry.version, "serving": state.hotswap.serving, "entry": entry.to_json()}
