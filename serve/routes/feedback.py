"""`POST /v1/feedback`: a thumbs-up or thumbs-down on a response the caller received, or an
implicit signal about it (`"source": "implicit", "signal": "regenerate"`: ingest.signals).

Idempotent per (response_id, user): repeating a vote is a no-op; changing it writes a new
feedback event (the stream keeps both, the latest wins). A signal is an act, not a vote: each
one is an event, with the label its signal implies, and the ledger's vote is left alone; the
learner lets a thumb on the same answer win over any signal (learner.join). A 202 means the event is durable: on the
embedded bus, or in the local spool on its way to Kafka.

Order and concurrency: the ledger is read first (unknown response, wrong user and an unchanged
vote are answered without writing anything), then the event is published, and only then is the
vote set in the ledger, so a vote the ledger knows of always has its event durably written. (If
the ledger fails in between, the client gets a 503 and its retry writes the same label again,
which the learner's latest-wins join absorbs.) A vote that would write while the disk has less
free than its reserve is refused with 507 before anything is written (foundation.disk); a disk
that fills up between the two writes is a 507 too, and the retry is absorbed as above.
Replicas share the ledger and it sets votes atomically, with no lock in this process: two votes
on one response racing on two replicas (or two threads) both publish their events, and the
ledger's answer decides each one's status: exactly one is "recorded"; the other is "changed",
or "unchanged" when it repeated the label. Nothing is lost: the bus keeps both events and the
latest one wins downstream.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ingest.events import FeedbackEvent, encode_event
from ingest.signals import signal_of
from serve.deps import FeedbackCaller, State
from serve.errors import AUTHENTICATED, Forbidden, NotFound, Unauthorized, Unprocessable, responses
from serve.schemas import FeedbackAccepted, FeedbackRequest

logger = logging.getLogger(__name__)
router = APIRouter(tags=["feedback"], responses=responses(*AUTHENTICATED, 403, 404))

LABELS = {"up": "desirable", "down": "undesirable"}


@router.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, responses=responses(507))
async def feedback(body: FeedbackRequest, state: State, caller: FeedbackCaller) -> FeedbackAccepted:
    mismatch = body.mismatch()
    if mismatch is not None:
        raise Unprocessable(mismatch[1], param=mismatch[0], code="invalid_value")
    user = caller.user
    if user is None:
        raise Unauthorized("rating needs a user: the credential you chatted with (serve.auth)", code="anonymous")
    entry = await run_in_threadpool(state.ledger.lookup, body.response_id)
    if entry is None:
        raise NotFound(f"no response {body.response_id!r} (unknown, or too old to rate)", param="response_id")
    if entry.user != user:
        raise Forbidden("only the user who received a response may rate it", param="response_id")
    if body.source == "implicit":
        return await _signal(body, state, user, entry.version)
    assert body.label is not None  # a thumb (body.mismatch)
    label = LABELS[body.label]
    if entry.label == label:
        return FeedbackAccepted(
            id=entry.feedback_event_id, response_id=body.response_id, label=body.label, status="unchanged"
        )
    state.disk.check()  # DiskFull: a 507 before writing anything
    event = FeedbackEvent(response_id=body.response_id, user=user, label=label, comment=body.comment)
    await run_in_threadpool(state.bus.publish, state.topics.feedback, body.response_id, encode_event(event))
    previous = await run_in_threadpool(state.ledger.set_vote, body.response_id, user, label, event.event_id)
    state.metrics.feedback.labels(label=label, version=entry.version or "base").inc()
    status = "recorded" if previous is None else "changed" if previous != label else "unchanged"
    return FeedbackAccepted(id=event.event_id, response_id=body.response_id, label=body.label, status=status)


async def _signal(body: FeedbackRequest, state: State, user: str, version: str | None) -> FeedbackAccepted:
    assert body.signal is not None  # a signal (body.mismatch)
    signal = signal_of(body.signal)
    state.disk.check()
    event = FeedbackEvent(
        response_id=body.response_id,
        user=user,
        label=signal.label,
        source="implicit",
        signal=signal.name,
        comment=body.comment,
    )
    await run_in_threadpool(state.bus.publish, state.topics.feedback, body.response_id, encode_event(event))
    state.metrics.implicit_signals.labels(signal=signal.name).inc()
    thumb = "up" if signal.label == "desirable" else "down"
    return FeedbackAccepted(
        id=event.event_id,
        response_id=body.response_id,
        label=thumb,
        status="recorded",
        source="implicit",
        signal=signal.name,
    )
