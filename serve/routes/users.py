"""Admin (bearer `KTO_ADMIN_TOKEN`): erase one user's data on request.

`DELETE /v1/users/{user}` answers 202 once the erasure is under way:

1. the user's entries leave the response ledger here (their answers can no longer be rated or
   audited), their answers leave the annotation queue, and their API keys are revoked;
2. an erasure event goes on the bus (durable when this returns, like a rating); the learner
   removes the user's responses and ratings from its replay buffer and join state, flags in
   the registry the versions trained on them, and records the erasure in the history
   (learner.erasure). `GET /v1/adapters/history` shows it once done, under the returned request_id.

Not erased: the raw events already on the bus, which stay until its retention drops them
(Kafka's `retention.ms`; the embedded log keeps them); aggregate counts (metrics, tallies).
A repeat is harmless: it finds nothing left to remove and records one more history entry.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from ingest.events import ErasureEvent, encode_event
from serve.deps import Admin, State
from serve.errors import AUTHENTICATED, responses

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/users", tags=["admin"], responses=responses(*AUTHENTICATED, 403))


@router.delete("/{user:path}", status_code=202, responses=responses(507))  # :path: an id may hold "/"
async def erase_user(
    state: State,
    actor: Admin,
    user: Annotated[str, Path(min_length=1, max_length=256, description="the X-User-Id to erase")],
    reason: Annotated[str, Query(max_length=1000, description="recorded in the history")] = "",
) -> dict:
    if state.spool is not None:
        state.spool.check_room()  # SpoolFull: a 503 before anything is removed
    removed = await run_in_threadpool(state.ledger.forget_user, user)
    if state.annotations is not None:
        await run_in_threadpool(state.annotations.forget_user, user)
    if state.keys is not None:  # a credential is personal data too, and must not outlive its user
        await run_in_threadpool(state.keys.forget_user, user)
    event = ErasureEvent(user=user, actor=actor, reason=reason)
    await run_in_threadpool(state.bus.publish, state.topics.erasures, user, encode_event(event))
    logger.info("%s requested erasure %s (%d ledger entries removed)", actor, event.event_id, removed)
    return {"request_id": event.event_id, "user": user, "status": "accepted", "ledger_entries_removed": removed}
