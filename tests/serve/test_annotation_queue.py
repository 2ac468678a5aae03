"""The annotation queue's store, on both backends (the embedded file and Redis): leases, slots,
overlap, idempotent annotations, skips, erasure, retention; and the strategies' order.

Tests taking ``queue`` run twice; the strategies and the agreement are pure and run once.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from foundation.urls import with_prefix
from serve.agreement import agreement
from serve.annotation_queue import (
    Annotation,
    AnnotationQueue,
    Candidate,
    ItemGone,
    NotAssigned,
    QueueItem,
    open_annotation_queue,
)
from serve.annotation_strategies import Arms, order, uncertainty, wants_overlap

LEASE_S = 60.0
T0 = time.time()
"""The test's now (reset for each test: the items' times and the TTLs are measured from it)."""


@pytest.fixture(autouse=True)
def now() -> None:
    global T0
    T0 = time.time()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A file, or a key prefix of the test's own on the session's redis-server (removed after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'annotations.sqlite3'}"
        return
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield with_prefix(request.getfixturevalue("services").registry_url, prefix)
    import redis

    with redis.Redis.from_url(request.getfixturevalue("services").registry_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def queue(queue_url: str) -> Iterator[AnnotationQueue]:
    opened = open_annotation_queue(queue_url, ttl_s=3600, max_items=1000)
    yield opened
    opened.close()


def item(rid: str, *, user: str = "alice", version: str | None = "v1", at: float = 0.0, required: int = 1) -> QueueItem:
    return QueueItem(
        rid,
        user,
        version,
        T0 + at,
        [{"role": "user", "content": f"question {rid}"}],
        f"answer {rid}",
        [1, 2, 3],
        [4, 5],
        required=required,
    )


def annotation(rid: str, who: str, label: str = "desirable", at: float = 1.0) -> Annotation:
    return Annotation(rid, who, label, f"e-{rid}-{who}-{label}", T0 + at)  # type: ignore[arg-type]


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.response_id for c in candidates]


def test_items_keep_their_conversation_and_come_newest_first(queue: AnnotationQueue) -> None:
    for n in range(3):
        queue.add(item(f"r{n}", at=n))
    queue.add(item("r0", user="mallory", at=9))  # queued before: ignored
    assert queue.item("r0") == item("r0")
    assert queue.item("nope") is None
    assert ids(queue.candidates("ann", T0, newest=True, limit=10)) == ["r2", "r1", "r0"]
    assert sorted(ids(queue.candidates("ann", T0, newest=False, limit=10))) == ["r0", "r1", "r2"]
    assert queue.open_items() == 3 and queue.held("ann", T0) is None


def test_a_lease_holds_the_slot_until_it_runs_out(queue: AnnotationQueue) -> None:
    queue.add(item("r1"))
    assert queue.assign("r1", "ann", T0, LEASE_S)
    assert queue.held("ann", T0 + 1) == ("r1", pytest.approx(T0 + LEASE_S))
    assert not queue.assign("r1", "bob", T0 + 1, LEASE_S)  # one annotator wanted, and it is taken
    assert queue.candidates("bob", T0 + 1, newest=True, limit=10) == []
    later = T0 + LEASE_S + 1
    assert queue.held("ann", later) is None
    assert queue.annotation("r1", "ann", later) is None  # ran out, but nobody took it: still Ann's to label
    assert ids(queue.candidates("bob", later, newest=True, limit=10)) == ["r1"]
    assert queue.assign("r1", "bob", later, LEASE_S)
    with pytest.raises(NotAssigned):
        queue.annotation("r1", "ann", later)  # ran out, and Bob has it now


def test_an_overlap_item_goes_to_two_annotators_and_no_third(queue: AnnotationQueue) -> None:
    queue.add(item("r1", required=2))
    assert queue.assign("r1", "ann", T0, LEASE_S) and queue.assign("r1", "bob", T0, LEASE_S)
    assert not queue.assign("r1", "cat", T0, LEASE_S)
    queue.annotate(annotation("r1", "ann"))
    assert ids(queue.candidates("cat", T0 + 2, newest=True, limit=10)) == []
    queue.annotate(annotation("r1", "bob", "undesirable"))
    assert queue.open_items() == 0
    assert {(a.annotator, a.label) for a in queue.annotations()} == {("ann", "desirable"), ("bob", "undesirable")}


def test_an_annotation_needs_the_lease_and_a_repeat_returns_the_first(queue: AnnotationQueue) -> None:
    queue.add(item("r1"))
    queue.add(item("r2"))
    with pytest.raises(NotAssigned):
        queue.annotate(annotation("r1", "ann"))
    with pytest.raises(ItemGone):
        queue.annotation("nope", "ann", T0)
    queue.assign("r1", "ann", T0, LEASE_S)
    assert queue.annotation("r1", "ann", T0) is None
    assert queue.annotate(annotation("r1", "ann")) is None
    assert queue.held("ann", T0) is None  # the lease ended with the label
    # Long after the lease, their own annotation still lets them change it (and only them).
    later = T0 + 10 * LEASE_S
    assert queue.annotation("r1", "ann", later) == annotation("r1", "ann")
    assert queue.annotate(annotation("r1", "ann", "undesirable", at=later - T0)) == annotation("r1", "ann")
    with pytest.raises(NotAssigned):
        queue.annotate(annotation("r1", "bob"))
    assert [a.label for a in queue.annotations()] == ["undesirable"]
    assert ids(queue.candidates("ann", later, newest=True, limit=10)) == ["r2"]  # never the one they labeled
    assert queue.open_items() == 1


def test_a_skip_gives_the_slot_back_and_the_item_never_returns_to_that_annotator(queue: AnnotationQueue) -> None:
    queue.add(item("r1"))
    with pytest.raises(NotAssigned):
        queue.skip("r1", "ann", T0)
    queue.assign("r1", "ann", T0, LEASE_S)
    queue.skip("r1", "ann", T0 + 1)
    assert queue.held("ann", T0 + 1) is None
    assert queue.candidates("ann", T0 + 1, newest=True, limit=10) == []
    assert not queue.assign("r1", "ann", T0 + 1, LEASE_S)
    assert ids(queue.candidates("bob", T0 + 1, newest=True, limit=10)) == ["r1"]


def test_an_erased_users_items_leave_with_all_about_them(queue: AnnotationQueue) -> None:
    queue.add(item("a1", user="alice"))
    queue.add(item("b1", user="bob"))
    queue.add(item("b2", user="bob"))
    queue.assign("b1", "ann", T0, LEASE_S)
    queue.annotate(annotation("b1", "ann"))
    queue.assign("b2", "ann", T0, LEASE_S)
    assert queue.forget_user("bob") == 2
    assert queue.item("b1") is None and queue.item("b2") is None
    assert ids(queue.candidates("cat", T0, newest=True, limit=10)) == ["a1"]
    assert queue.annotations() == [] and queue.held("ann", T0) is None
    with pytest.raises(ItemGone):
        queue.annotate(annotation("b2", "ann"))
    assert queue.forget_user("bob") == 0


def test_run_time_config_is_kept(queue: AnnotationQueue) -> None:
    assert queue.config() == {}
    queue.set_config({"strategy": "uncertain", "guidelines": "Be kind. 👍"})
    queue.set_config({"strategy": "newest"})
    assert queue.config() == {"strategy": "newest", "guidelines": "Be kind. 👍"}


def test_old_items_and_those_past_the_bound_leave_oldest_unannotated_first(queue_url: str) -> None:
    queue = open_annotation_queue(queue_url, ttl_s=100, max_items=2)
    try:
        queue.add(item("labeled", at=-10))
        queue.assign("labeled", "ann", T0, LEASE_S)
        queue.annotate(annotation("labeled", "ann"))
        for n in range(3):
            queue.add(item(f"new{n}", at=n))
        queue.add(item("old", at=-200))  # within a minute of the first add: no purge yet
        assert queue.item("old") is not None
        # Past the TTL: "old". Then two answers over the bound of 2, the oldest nobody annotated.
        assert queue.purge(T0 + 1) == 3
        assert queue.item("old") is None and queue.item("new0") is None and queue.item("new1") is None
        assert queue.item("labeled") is not None and queue.item("new2") is not None
        assert [a.response_id for a in queue.annotations()] == ["labeled"]
    finally:
        queue.close()


def test_each_strategy_orders_what_the_store_offers(queue: AnnotationQueue) -> None:
    # Six answers: two of the canary's candidate (v2), two of its baseline (v1), two of an older version.
    for n, version in enumerate(["v0", "v1", "v2", "v0", "v1", "v2"]):
        queue.add(item(f"r{n}", version=version, at=n))

    def first(strategy, annotator: str, **kwargs) -> str:
        offered = queue.candidates(annotator, T0, newest=strategy != "uniform", limit=64)
        for c in order(strategy, offered, **kwargs):
            if queue.assign(c.response_id, annotator, T0, LEASE_S):
                return c.response_id
        raise AssertionError("nothing assigned")

    assert first("newest", "a1") == "r5"
    behind = Arms(frozenset({"v2"}), "v1", candidate_labels=2, baseline_labels=9)
    assert first("canary", "a2", arms=behind) == "r2"  # r5 is leased to a1: the candidate's other answer
    ahead = Arms(frozenset({"v2"}), "v1", candidate_labels=9, baseline_labels=2)
    assert first("canary", "a3", arms=ahead) == "r4"
    assert first("uncertain", "a4", scores=uncertainty({"r0": 0.1, "r3": 3.0, "r1": 9.0})) == "r3"
    # Uniform: the store offers a random sample, so the remaining answers come in no fixed order.
    orders = set()
    for n in range(12):
        offered = queue.candidates(f"u{n}", T0, newest=False, limit=64)
        orders.add(tuple(ids(order("uniform", offered, rng=random.Random(n)))))
    assert len(orders) > 1 and all(sorted(o) == ["r0", "r1"] for o in orders)


# ---- strategies (pure) ---------------------------------------------------------------------------


def candidate(rid: str, version: str | None, at: float) -> Candidate:
    return Candidate(rid, version, at, 0)


CANDIDATES = [
    candidate("old-base", None, 1),
    candidate("v2", "v2", 2),
    candidate("v1", "v1", 3),
    candidate("x", "v0", 4),
]


def test_newest_and_uniform() -> None:
    assert ids(order("newest", CANDIDATES)) == ["x", "v1", "v2", "old-base"]
    seen = {tuple(ids(order("uniform", CANDIDATES, rng=random.Random(seed)))) for seed in range(20)}
    assert len(seen) > 5 and all(sorted(s) == sorted(ids(CANDIDATES)) for s in seen)


def test_canary_offers_the_arm_with_less_evidence_first_then_the_rest_newest() -> None:
    lineage = frozenset({"v1", "v2"})
    behind = Arms(lineage, None, candidate_labels=3, baseline_labels=10)
    assert ids(order("canary", CANDIDATES, arms=behind)) == ["v1", "v2", "old-base", "x"]
    ahead = Arms(lineage, None, candidate_labels=10, baseline_labels=3)
    assert ids(order("canary", CANDIDATES, arms=ahead)) == ["old-base", "v1", "v2", "x"]
    assert ids(order("canary", CANDIDATES, arms=None)) == ids(order("newest", CANDIDATES))


def test_uncertain_offers_the_answers_nearest_the_reference_point_first() -> None:
    # Mean log-ratio 1.0 is the reference point: two sit on it, "x" is far above, "v1" far below.
    scores = uncertainty({"x": 4.0, "v1": -2.0, "v2": 1.0, "old-base": 1.0})
    assert scores == {"x": 3.0, "v1": 3.0, "v2": 0.0, "old-base": 0.0}  # ties: newest first
    assert ids(order("uncertain", CANDIDATES, scores=scores)) == ["v2", "old-base", "x", "v1"]
    # Below zero the mean is no KL estimate: the point is floored at 0 (the paper's z0 >= 0).
    assert uncertainty({"a": -1.0, "b": -3.0}) == {"a": 1.0, "b": 3.0}
    unscored = order("uncertain", CANDIDATES, scores={"v2": 0.5})
    assert ids(unscored) == ["v2", "x", "v1", "old-base"]  # the rest newest


def test_overlap_takes_the_share_asked_and_every_replica_agrees() -> None:
    drawn = [wants_overlap(f"chatcmpl-{n}", 0.25) for n in range(4000)]
    assert 0.22 < sum(drawn) / len(drawn) < 0.28
    assert drawn == [wants_overlap(f"chatcmpl-{n}", 0.25) for n in range(4000)]
    assert not any(wants_overlap(f"r{n}", 0.0) for n in range(100))
    assert all(wants_overlap(f"r{n}", 1.0) for n in range(100))


# ---- agreement (pure) ----------------------------------------------------------------------------


def labels(table: dict[str, str]) -> list[Annotation]:
    """{"r1": "ann:+ bob:- …"} as annotations."""
    return [
        annotation(rid, who, "desirable" if sign == "+" else "undesirable")
        for rid, row in table.items()
        for who, sign in (cell.split(":") for cell in row.split())
    ]


def test_agreement_is_one_when_annotators_agree_and_falls_for_the_one_who_does_not() -> None:
    agreeing = labels({"r1": "ann:+ bob:+", "r2": "ann:- bob:-", "r3": "ann:+ bob:+", "r4": "ann:+"})
    overall, per = agreement(agreeing)
    assert (overall.alpha, overall.items, overall.observed) == (pytest.approx(1.0), 3, 1.0)
    assert set(per) == {"ann", "bob"}

    contrary = labels({"r1": "ann:+ cat:-", "r2": "ann:- cat:+", "r3": "bob:+ ann:+", "r4": "bob:- ann:-"})
    overall, per = agreement(contrary)
    assert overall.items == 4 and overall.observed == 0.5
    cat, ann, bob = per["cat"].alpha, per["ann"].alpha, per["bob"].alpha
    assert cat is not None and ann is not None and bob is not None
    assert cat < 0 < ann < bob == pytest.approx(1.0)


def test_agreement_is_undefined_without_overlap_or_without_any_disagreement_to_expect() -> None:
    overall, per = agreement(labels({"r1": "ann:+", "r2": "bob:-"}))
    assert (overall.alpha, overall.items, per) == (None, 0, {})
    overall, _ = agreement(labels({"r1": "ann:+ bob:+", "r2": "ann:+ bob:+"}))
    assert (overall.alpha, overall.observed) == (None, 1.0)
