"""Admin (bearer `KTO_ADMIN_TOKEN`): the operator's rules, which the labeler applies to every answer.

`PUT /v1/rules` takes the whole set, `{"rules": [...]}` (labelers.rules says what a rule holds),
and stores it as the next version in the registry, where every labeler finds it within seconds;
it answers 200 with the stored set and its version. An invalid set is a 422 naming the rule and
the field, and nothing is stored. `GET /v1/rules` gives the current set (version null before the
first), `GET /v1/rules/history` every version.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from labelers.rules import RuleSet
from registry import RuleSetVersion
from serve.deps import Admin, State
from serve.errors import AUTHENTICATED, responses

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/rules", tags=["admin"], responses=responses(*AUTHENTICATED, 403))


@router.get("")
async def current_rules(state: State, actor: Admin) -> dict[str, Any]:
    current = await run_in_threadpool(state.registry.rules)
    return {"version": None, "rules": []} if current is None else _shown(current)


@router.put("", responses=responses(507))
async def put_rules(
    state: State,
    actor: Admin,
    rule_set: RuleSet,
    reason: Annotated[str, Query(max_length=1000, description="recorded with the version")] = "",
) -> dict[str, Any]:
    # Stored with every default filled in: what was in effect, whatever later releases default to.
    rules = rule_set.model_dump(mode="json", exclude_none=True)
    stored = await run_in_threadpool(state.registry.put_rules, rules, actor=actor, reason=reason)
    return _shown(stored)


@router.get("/history")
async def rules_history(state: State, actor: Admin) -> dict[str, Any]:
    versions = await run_in_threadpool(state.registry.rule_history)
    return {"versions": [_shown(v) for v in versions]}


def _shown(version: RuleSetVersion) -> dict[str, Any]:
    return {**version.to_json(), "rules": version.rules.get("rules", [])}
