"""The annotation queue's API (serve.annotation_queue has the rules, serve.annotation_strategies
the order): annotators take one answer at a time and label it; admins set the strategy and the
guidelines and read the agreement.

- `GET /v1/annotations/next` (annotator): the answer they hold, else the next by the strategy,
  leased to them; `item: null` when none waits. No user id is shown.
- `POST /v1/annotations` (annotator) `{"response_id", "label": "up" | "down"}`: 202 once the
  label is a durable `source: "annotator"` feedback event on the feedback topic, for the user the
  answer was served to, naming the annotator as `rater`. 403 for an answer not assigned to them;
  a repeat is idempotent (the same label: `unchanged`, nothing written; another: `changed`).
- `POST /v1/annotations/skip` (annotator): give the answer back; it never comes back to them.
- `GET`/`PUT /v1/annotations/config` (admin): the strategy and guidelines in force.
- `GET /v1/annotations/agreement` (admin): Krippendorff's α overall and per annotator (serve.agreement).

Annotator rights are separate from admin ones: an annotator credential reaches only the first
three, and an admin's is not an annotator's.
"""

from __future__ import annotations

import logging
import random
import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ingest.events import FeedbackEvent, encode_event
from registry import RegistryError
from serve.agreement import agreement
from serve.annotation_queue import Annotation, AnnotationQueue, Candidate, ItemGone, Label, NotAssigned
from serve.annotation_strategies import Arms, Strategy, order, uncertainty
from serve.deps import Admin, Annotator, ServeState, State
from serve.errors import AUTHENTICATED, Forbidden, NotFound, responses
from serve.schemas import (
    AnnotationAccepted,
    AnnotationConfig,
    AnnotationItem,
    AnnotationRequest,
    AnnotationTask,
    SkipRequest,
)

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/annotations", tags=["annotations"], responses=responses(*AUTHENTICATED, 403))

LABELS: dict[str, Label] = {"up": "desirable", "down": "undesirable"}
CANDIDATES = 64
"""Answers a strategy chooses among at one request."""
SCORED = 16
"""Of those, how many the `uncertain` strategy scores (two forward passes each, on the engine)."""


def _queue(state: ServeState) -> AnnotationQueue:
    assert state.annotations is not None  # create_app opens it
    return state.annotations


@router.get("/next", response_model=AnnotationTask, responses=responses(503, 507))  # it takes a lease
async def next_item(state: State, annotator: Annotator) -> AnnotationTask:
    queue, now = _queue(state), time.time()
    config = await config_in_force(state)
    lease_s = state.settings.annotation_lease_s
    held = await run_in_threadpool(queue.held, annotator, now)
    # What they hold first (a reloaded page shows the same answer), else the strategy's order,
    # leasing the first that is still free (another annotator may take one meanwhile).
    chosen = [held] if held else [(rid, now + lease_s) for rid in await _choose(state, queue, annotator, now, config)]
    for response_id, expires in chosen:
        if held is None and not await run_in_threadpool(queue.assign, response_id, annotator, now, lease_s):
            continue
        item = await run_in_threadpool(queue.item, response_id)
        if item is not None:
            shown = AnnotationItem(
                response_id=item.response_id,
                messages=item.messages,
                completion=item.completion,
                lease_expires_at=expires,
            )
            return AnnotationTask(item=shown, guidelines=config["guidelines"])
    return AnnotationTask(item=None, guidelines=config["guidelines"])


async def _choose(state: ServeState, queue: AnnotationQueue, annotator: str, now: float, config: dict) -> list[str]:
    strategy: Strategy = config["strategy"]
    candidates = await run_in_threadpool(
        queue.candidates, annotator, now, newest=strategy != "uniform", limit=CANDIDATES
    )
    arms = await run_in_threadpool(_arms, state) if strategy == "canary" else None
    scores = await _uncertainty(state, queue, candidates) if strategy == "uncertain" else None
    return [c.response_id for c in order(strategy, candidates, arms=arms, scores=scores, rng=random.Random())]


def _arms(state: ServeState) -> Arms | None:
    try:
        canary = state.registry.canary()
    except RegistryError as exc:  # the registry away for a moment: newest first meanwhile
        logger.warning("annotation queue: cannot read the canary (%s); newest first", exc)
        return None
    if canary is None:
        return None
    evidence = canary.evidence or {}
    return Arms(
        frozenset(canary.versions),
        canary.baseline,
        candidate_labels=(evidence.get("candidate") or {}).get("n", 0),
        baseline_labels=(evidence.get("baseline") or {}).get("n", 0),
    )


async def _uncertainty(state: ServeState, queue: AnnotationQueue, candidates: list[Candidate]) -> dict[str, float]:
    newest = sorted(candidates, key=lambda c: c.created_at, reverse=True)[:SCORED]
    items = [i for i in [await run_in_threadpool(queue.item, c.response_id) for c in newest] if i is not None]
    assert state.scorer is not None  # create_app makes it
    ratios = await state.scorer.log_ratios(
        state.hotswap.serving, {i.response_id: (i.prompt_token_ids, i.completion_token_ids) for i in items}
    )
    return uncertainty(ratios)


@router.post("", status_code=202, response_model=AnnotationAccepted, responses=responses(404, 503, 507))
async def annotate(body: AnnotationRequest, state: State, annotator: Annotator) -> AnnotationAccepted:
    queue, now, label = _queue(state), time.time(), LABELS[body.label]
    previous = await _held(queue, body.response_id, annotator, now)
    if previous is not None and previous.label == label:
        return AnnotationAccepted(
            id=previous.event_id, response_id=body.response_id, label=body.label, status="unchanged"
        )
    item = await run_in_threadpool(queue.item, body.response_id)
    if item is None:
        raise NotFound(f"no answer {body.response_id!r} in the annotation queue", param="response_id")
    state.disk.check()  # DiskFull: a 507 before writing anything
    event = FeedbackEvent(
        response_id=item.response_id, user=item.user, label=label, source="annotator", rater=annotator
    )
    await run_in_threadpool(state.bus.publish, state.topics.feedback, item.response_id, encode_event(event))
    try:
        # `now`, as checked: a lease that runs out while the event is written still counts.
        await run_in_threadpool(queue.annotate, Annotation(item.response_id, annotator, label, event.event_id, now))
    except (NotAssigned, ItemGone) as exc:  # erased meanwhile: the event is out, the learner drops it
        logger.info("annotation %s of %s not kept in the queue: %r", event.event_id, item.response_id, exc)
    state.metrics.annotations.labels(label=label).inc()
    status = "recorded" if previous is None else "changed"
    return AnnotationAccepted(id=event.event_id, response_id=item.response_id, label=body.label, status=status)


async def _held(queue: AnnotationQueue, response_id: str, annotator: str, now: float) -> Annotation | None:
    try:
        return await run_in_threadpool(queue.annotation, response_id, annotator, now)
    except NotAssigned:
        raise Forbidden(
            f"answer {response_id!r} is not assigned to you: take answers with GET /v1/annotations/next",
            param="response_id",
            code="not_assigned",
        ) from None
    except ItemGone:
        raise NotFound(f"no answer {response_id!r} in the annotation queue", param="response_id") from None


@router.post("/skip", response_model=dict, responses=responses(503, 507))
async def skip(body: SkipRequest, state: State, annotator: Annotator) -> dict:
    queue = _queue(state)
    try:
        await run_in_threadpool(queue.skip, body.response_id, annotator, time.time())
    except NotAssigned:
        raise Forbidden(
            f"answer {body.response_id!r} is not assigned to you", param="response_id", code="not_assigned"
        ) from None
    return {"response_id": body.response_id, "status": "skipped"}


async def config_in_force(state: ServeState) -> dict:
    settings = state.settings
    stored = await run_in_threadpool(_queue(state).config)
    return {
        "strategy": stored.get("strategy", settings.annotation_strategy),
        "guidelines": stored.get("guidelines", settings.annotation_guidelines),
        "overlap": settings.annotation_overlap,
        "share": settings.annotation_share,
        "lease_s": settings.annotation_lease_s,
    }


@router.get("/config", response_model=dict)
async def get_config(state: State, actor: Admin) -> dict:
    return await config_in_force(state)


@router.put("/config", response_model=dict, responses=responses(503, 507))
async def put_config(body: AnnotationConfig, state: State, actor: Admin) -> dict:
    changes = body.model_dump(exclude_none=True)
    await run_in_threadpool(_queue(state).set_config, changes)
    logger.info("%s set the annotation config: %s", actor, changes)
    return await config_in_force(state)


@router.get("/agreement", response_model=dict)
async def get_agreement(state: State, actor: Admin) -> dict:
    queue = _queue(state)
    annotations = await run_in_threadpool(queue.annotations)
    overall, per = agreement(annotations)
    return {
        "overall": overall.to_json(),
        "annotators": {who: a.to_json() for who, a in per.items()},
        "annotations": len(annotations),
        "open_items": await run_in_threadpool(queue.open_items),
        "measure": "Krippendorff's alpha, nominal, on answers with two or more annotations (serve.agreement)",
    }
