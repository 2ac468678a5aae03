"""Planning an update: every fresh label is trained at least once, whatever the backlog."""

from __future__ import annotations

import random
from collections import Counter

from learner.buffer import Example
from learner.example import ExampleRef
from learner.update import plan_batches, user_limit


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


# ---- per-user caps (LearnerSettings.max_user_share) ----


def rated(i: int, user: str, desirable: bool = False) -> Example:
    return Example(f"{user}-r{i}", user, [1, 2], [3], desirable, f"{user}-e{i}", 0.0, None, i, 0.0, None, 0.0, 0)


def per_user(batches: list[list[Example | ExampleRef]]) -> tuple[Counter, int]:
    distinct = {e.response_id: e for b in batches for e in b}
    return Counter(e.user for e in distinct.values()), len(distinct)


def test_a_flood_from_one_user_is_capped_to_its_share_of_each_update():
    flood = [rated(i, "flooder") for i in range(1000)]
    others = [rated(1000 + i, f"u{i % 20}", desirable=i % 2 == 0) for i in range(100)]
    old = [rated(5000 + i, "flooder") for i in range(200)] + [rated(6000 + i, f"u{i % 20}") for i in range(40)]
    fresh, pool, trained_flood = flood + others, old, set()
    for update in range(5):
        batches = plan_batches(
            fresh, pool, steps=8, size=16, replay_fraction=0.5, rng=random.Random(update), max_user_share=0.1
        )
        users, distinct = per_user(batches)
        assert 0 < users["flooder"] <= 0.1 * max(distinct, 8 * 16)
        assert max(n for u, n in users.items() if u != "flooder") <= users["flooder"]
        if update == 0:  # everyone else's fresh labels all go in; only the flood waits
            assert {e.response_id for e in others} <= {e.response_id for b in batches for e in b}
        trained = {e.response_id for b in batches for e in b}
        trained_flood |= {e.response_id for e in flood if e.response_id in trained}
        fresh = [e for e in fresh if e.response_id not in trained]  # the deferred ones come back
    assert len(trained_flood) >= 5 * 10  # oldest first: the flood drains, a bounded slice per update
    assert [e.response_id for e in flood[: len(trained_flood)]] == sorted(
        trained_flood, key=lambda r: int(r.split("r")[-1])
    )


def test_a_flood_alone_still_trains_a_bounded_slice_per_update():
    flood = [rated(i, "flooder") for i in range(1000)]
    batches = plan_batches(flood, [], steps=8, size=16, replay_fraction=0.5, rng=random.Random(0), max_user_share=0.1)
    users, _ = per_user(batches)
    assert len(batches) == 8 and all(len(b) >= 2 for b in batches)
    assert users["flooder"] == int(0.1 * 8 * 16)  # 12 of 1000: progress, bounded


def test_the_cap_off_plans_exactly_as_before():
    flood = [rated(i, "flooder") for i in range(1000)]
    others = [rated(1000 + i, f"u{i % 20}") for i in range(100)]
    pool = [rated(5000 + i, "flooder") for i in range(50)]
    plain = plan_batches(flood + others, pool, steps=8, size=16, replay_fraction=0.5, rng=random.Random(3))
    off = plan_batches(
        flood + others, pool, steps=8, size=16, replay_fraction=0.5, rng=random.Random(3), max_user_share=1.0
    )
    assert [[e.response_id for e in b] for b in off] == [[e.response_id for e in b] for b in plain]
    assert per_user(off)[0]["flooder"] >= 1000  # the whole flood in one update, as before


def test_user_limit_grows_with_other_users_and_never_falls_below_one():
    assert user_limit([1000], share=0.1, nominal=128) == 12
    assert user_limit([1000] + [5] * 20, share=0.1, nominal=128) == 12  # 12 <= 0.1 * 128
    assert user_limit([1000] + [5] * 200, share=0.1, nominal=128) == 111  # 111 <= 0.1 * (1000 + 111)
    assert user_limit([3], share=0.01, nominal=16) == 1
