"""Audit (admin, bearer `KTO_ADMIN_TOKEN`): which version produced a response, who got it, and
how it was rated, from the response ledger.

The ledger forgets a response after its TTL (`KTO_LEDGER_TTL_S`): an older or unknown id is a
404. An unreachable ledger (or one whose entry still waits in the backlog) is a 503, mapped in
``serve.errors``.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from serve.deps import Admin, State
from serve.errors import AUTHENTICATED, NotFound, responses

router = APIRouter(prefix="/v1/responses", tags=["admin"], responses=responses(*AUTHENTICATED, 403))


@router.get("/{response_id}/version", responses=responses(404))
async def response_version(response_id: str, state: State, actor: Admin) -> dict:
    """`version` None: the base model answered; `label` None: not rated (yet)."""
    entry = await run_in_threadpool(state.ledger.lookup, response_id)
    if entry is None:
        raise NotFound(
            f"no response {response_id!r} in the ledger (never served here, or older than"
            f" its TTL of {state.settings.ledger_ttl_s:g} s)",
            param="response_id",
            code="unknown_response",
        )
    return {
        "response_id": entry.response_id,
        "version": entry.version,
        "base_model": state.settings.base_model_id,
        "user": entry.user,
        "label": entry.label,
    }
