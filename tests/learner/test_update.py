"""Planning an update: every fresh label is trained at least once, whatever the backlog."""

from __future__ import annotations

import random

from learner.buffer import Example
from learner.update import plan_batches


def example(i: int) -> Example:
    return Example(f"r{i}", "u", [1, 2], [3], i % 2 == 0, f"e{i}", 0.0, None, i, 0.0, None, 0.0, 0)


def test_a_backlog_larger_than_the_planned_steps_is_all_trained():
    fresh = [example(i) for i in range(200)]
    replay = [example(1000 + i) for i in range(50)]
    batches = plan_batches(fresh, replay, steps=8, size=16, replay_fraction=0.5, rng=random.Random(0))
    trained = {e.response_id for b in batches for e in b}
    assert {e.response_id for e in fresh} <= trained
    assert all(2 <= len(b) <= 16 for b in batches)
    assert all(len({e.response_id for e in b}) == len(b) for b in batches)  # no example twice in a batch


def test_few_fresh_labels_still_run_the_planned_steps_with_replay():
    fresh = [example(i) for i in range(5)]
    replay = [example(100 + i) for i in range(40)]
    batches = plan_batches(fresh, replay, steps=8, size=16, replay_fraction=0.5, rng=random.Random(0))
    assert len(batches) == 8
    replay_ids = {e.response_id for e in replay}
    for b in batches:
        assert {e.response_id for e in fresh} <= {e.response_id for e in b}  # 5 fresh fit every batch
        assert any(e.response_id in replay_ids for e in b)
        assert len({e.response_id for e in b}) == len(b)
