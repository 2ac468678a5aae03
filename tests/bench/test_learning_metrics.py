"""What the learning benchmark computes from a run (bench.learning_metrics), on hand-made turns
and versions: windows in ratings over every answer, lifts and their p-values, the gain holding,
the counts of what the canary did, and feedback -> first served by a version trained on it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bench import learning_metrics as lm
from kto_loop.simulate import Turn


def turns_from(liked: list[bool], rated: list[bool] | None = None, version: str = "base") -> list[Turn]:
    rated = rated or [True] * len(liked)
    return [
        Turn(
            i,
            float(i),
            "u",
            version,
            "x",
            like,
            like if r else None,
            f"r{i}",
            f"f{i}" if r else None,
            float(i) if r else None,
        )
        for i, (like, r) in enumerate(zip(liked, rated))
    ]


def test_windows_are_counted_in_ratings_over_every_answer():
    # 10 answers, every third unrated: ratings sit at answers 0, 1, 3, 4, 6, 7, 9
    liked = [True, False, True, True, False, False, True, True, False, True]
    turns = turns_from(liked, [i % 3 != 2 for i in range(10)])
    assert lm.rated_positions(turns) == [0, 1, 3, 4, 6, 7, 9]
    assert lm.window(turns, stop=3, width=2) == (2, 3)  # ratings 2-3: answers 1, 2, 3 (the unrated one too)
    assert lm.window(turns, stop=5, width=2) == (1, 3)  # answers 4, 5 (unrated) and 6
    assert lm.window(turns, stop=7, width=7) == (6, 10)
    assert lm.curve(turns, step=3) == [3 / 4, 2 / 4]  # blocks of 3 ratings: answers 0-3, 4-7


def test_lift_has_its_p_value_and_needs_the_ratings():
    turns = turns_from([i % 2 == 0 for i in range(200)] + [True] * 200)
    strong = lm.lift_at(turns, (30, 300), at=400, width=200)
    assert strong["rate"] == 1.0 and strong["lift"] == pytest.approx(0.9) and strong["p"] < 1e-10
    same = lm.lift_at(turns, (150, 300), at=200, width=200)
    assert same["lift"] == pytest.approx(0.0) and 0.3 < same["p"] < 0.7
    assert math.isnan(lm.lift_at(turns, (30, 300), at=600)["rate"])  # the run never got there


def test_ratings_until_and_holds():
    liked = [False] * 200 + [True] * 100 + [i % 2 == 0 for i in range(200)]
    turns = turns_from(liked)
    assert lm.ratings_until(turns, base_rate=0.1, lift=0.2, step=50, width=200) == 300  # 0.25 at 250, 0.5 at 300
    assert lm.ratings_until(turns, base_rate=0.9, lift=0.2) is None
    held = lm.holds(turns, step=50, width=200)
    assert held["peak"] == 0.75 and held["last"] == 0.5 and held["drop"] == 0.25  # best at 400: answers 200-399


def version(name: str, parent: str | None, events: list[str], reason: str | None = None, codes=()) -> SimpleNamespace:
    return SimpleNamespace(
        version=name,
        parent=parent,
        lineage={"feedback_event_ids": events},
        rejected_reason=reason,
        metrics={"gate": {"codes": list(codes), "candidate": {"kl_per_token": 0.5}}},
    )


def entry(action: str, actor: str = "canary-controller") -> SimpleNamespace:
    return SimpleNamespace(action=action, actor=actor)


def test_version_counts_and_gate_log():
    versions = [
        version("v1", None, []),
        version("v2", "v1", [], "gate: KL", ["kl"]),
        version("v3", "v1", [], "canary rolled back by canary-controller"),
    ]
    history = [
        entry("canary_start", "learner"),
        entry("canary_advance", "learner"),
        entry("canary_rollback"),
        entry("canary_start", "learner"),
        entry("canary_promote"),
        entry("activate", "admin"),
    ]
    assert lm.version_counts(versions, history) == {
        "published": 3,
        "gate_refused": 1,
        "canaries": 2,
        "advanced": 1,
        "promoted": 1,
        "rolled_back": 1,
        "activated": 0,
    }
    assert lm.gate_log(versions) == {"refused_by_reason": {"kl": 1}, "kl_per_token": [0.5, 0.5, 0.5]}


def test_feedback_to_served_follows_descendants_and_counts_never_as_late():
    versions = [version("v1", None, ["f0"]), version("v2", "v1", ["f1"]), version("v3", None, ["f2"])]
    ratings = [Turn(i, float(i), "u", "base", "x", True, True, f"r{i}", f"f{i}", float(i)) for i in range(4)]
    served = [Turn(10, 5.0, "u", "v2", "x", True, None), Turn(11, 7.0, "u", "v1", "x", True, None)]
    result = lm.feedback_to_served(ratings + served, versions, held_out=lambda rid: rid == "r3", until=100.0)
    # f0: trained in v1, served first by its descendant v2 at 5.0; f1: v2 at 5.0; f2: v3 never served
    assert (result["measured"], result["held_out"], result["never"]) == (3, 1, 1)
    assert result["served"]["n"] == 2 and result["served"]["max"] == pytest.approx(5.0)
    assert result["p50_s"] == pytest.approx(5.0) and result["p99_s"] == math.inf  # of 4, 5 and never
    assert lm.feedback_to_served(ratings, versions, held_out=lambda rid: False, until=0.5)["measured"] == 1


def test_descendants_and_late_percentiles():
    versions = [version("v1", None, []), version("v2", "v1", []), version("v3", "v2", []), version("v4", None, [])]
    assert lm.descendants(versions, {"v2"}) == {"v2", "v3"}
    assert lm.late_percentile([1.0, 2.0, 3.0], 50) == 2.0 and lm.late_percentile([1.0, math.inf], 50) == math.inf
    assert math.isnan(lm.late_percentile([], 50))
