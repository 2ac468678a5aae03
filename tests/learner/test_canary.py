"""The canary's test and controller (learner.canary): the anytime-valid statistic on hand-made
counts, its error rate and power measured by simulation (checked after every rating), and the
controller on a real registry and replay buffer."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pytest

import learner.canary as canary_module
from ingest.events import FeedbackEvent, ResponseEvent, SamplingParams
from learner.buffer import ReplayBuffer
from learner.canary import ACTOR, Arm, CanaryController, compare, radius, suffix_error, tuned_rho
from learner.metrics import LearnerMetrics
from learner.settings import LearnerSettings
from tests.tiny import TINY_MODEL_ID

ALPHA = 0.05
RHO = tuned_rho(200, ALPHA / 2)


# ---- the statistic on hand-made counts ------------------------------------------------------


def test_radius_shrinks_and_rho_is_tuned_where_asked():
    radii = [radius(n, 0.025, RHO) for n in (1, 10, 100, 1000, 10_000)]
    assert radii == sorted(radii, reverse=True) and radius(0, 0.025, RHO) == math.inf
    assert 0.10 < radius(200, 0.025, RHO) < 0.13 and 0.015 < radius(10_000, 0.025, RHO) < 0.02
    # tuned_rho minimises the radius at its n: any other rho is wider there
    for n in (50, 200, 1000):
        best = tuned_rho(n, 0.025)
        assert all(radius(n, 0.025, best) <= radius(n, 0.025, best * f) + 1e-12 for f in (0.3, 0.8, 1.25, 3))
    # the formula, by hand: u(v) = sqrt((v + rho) log((v + rho) / (rho a^2))), v = n/4, over n
    v = 100 / 4
    assert radius(100, 0.025, 2.0) == pytest.approx(math.sqrt((v + 2) * math.log((v + 2) / (2 * 0.025**2))) / 100)


def test_compare_decides_on_the_interval_of_the_difference():
    kw: dict[str, Any] = {"alpha": ALPHA, "margin": 0.05, "min_ratings": 100, "rho": RHO}
    worse = compare(Arm(200, 20), Arm(800, 400), **kw)  # 0.10 vs 0.50
    assert worse.decision == "rollback" and worse.upper < 0 and worse.lower < worse.upper
    better = compare(Arm(200, 180), Arm(800, 400), **kw)  # 0.90 vs 0.50
    assert better.decision == "promote" and better.lower > -0.05
    assert compare(Arm(50, 45), Arm(800, 400), **kw).decision == "continue"  # too few to promote
    assert compare(Arm(50, 0), Arm(800, 400), **kw).decision == "rollback"  # a rollback needs no minimum
    assert compare(Arm(200, 100), Arm(800, 400), **kw).decision == "continue"  # equal, not yet sure enough
    nothing = compare(Arm(0, 0), Arm(0, 0), **kw)
    assert (nothing.decision, nothing.lower, nothing.upper) == ("continue", -1.0, 1.0)
    evidence = worse.evidence()
    assert evidence["candidate"] == {"n": 200, "desirable": 20, "rate": 0.1}
    assert evidence["baseline"]["rate"] == 0.5 and evidence["delta"] == pytest.approx(-0.4)
    assert evidence["interval"] == [worse.lower, worse.upper] and evidence["alpha"] == ALPHA
    assert set(evidence) >= {"statistic", "thresholds", "margin", "min_ratings", "rho"}


# ---- error rate and power, by simulation -----------------------------------------------------


def simulate(
    p_candidate: float | list[float],
    p_baseline: float,
    share: float,
    *,
    streams: int,
    ratings: int,
    seed: int,
    per_version: int = 10**9,
    margin: float = 0.05,
    min_ratings: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Streams of ratings, each going to the candidate with probability `share`, the test
    checked after EVERY rating. With a list, the canary advances: candidate k (0-based) has mean
    p_candidate[k] and serves `per_version` candidate ratings (the last one, the rest). Returns,
    per stream, the rating count at the first rollback and at the first promotion (0: never
    within `ratings`). The same arithmetic as `compare`, vectorised (checked against it below)."""
    schedule = np.atleast_1d(np.asarray(p_candidate, dtype=float))
    rng = np.random.default_rng(seed)
    r_base = np.array([np.inf] + [radius(n, ALPHA / 2, RHO) for n in range(1, ratings + 1)])
    r_suffix = [
        np.array([np.inf] + [radius(n, suffix_error(ALPHA, j), RHO) for n in range(1, ratings + 1)])
        for j in range(1, len(schedule) + 1)
    ]
    first_rollback: list[int] = []
    first_promote: list[int] = []
    for _ in range(0, streams, 250):  # in chunks: 250 x ratings arrays stay small
        to_c = rng.random((250, ratings)) < share
        version = np.minimum((np.cumsum(to_c, 1) - to_c) // per_version, len(schedule) - 1)
        x = rng.random((250, ratings)) < np.where(to_c, schedule[version], p_baseline)
        n_b, d_b = np.cumsum(~to_c, 1), np.cumsum(x & ~to_c, 1)
        lo_b, hi_b = _bounds(n_b, d_b, r_base)
        rollback = np.zeros_like(to_c)
        for j in range(len(schedule), 0, -1):
            mine = to_c & (version >= j - 1)
            n_c, d_c = np.cumsum(mine, 1), np.cumsum(x & mine, 1)
            lo_c, hi_c = _bounds(n_c, d_c, r_suffix[j - 1])
            rollback |= hi_c - lo_b < 0
        promote = (lo_c - hi_b > -margin) & (np.minimum(n_c, n_b) >= min_ratings)  # j = 1: the whole lineage
        for decided, out in ((rollback, first_rollback), (promote, first_promote)):
            out.extend(np.where(decided.any(1), decided.argmax(1) + 1, 0))
        for s, t in ((0, ratings // 3), (1, ratings - 1), (2, 40)):  # spot checks against compare()
            lineage = [
                Arm(
                    int((to_c[s, : t + 1] & (version[s, : t + 1] == k)).sum()),
                    int((x[s, : t + 1] & to_c[s, : t + 1] & (version[s, : t + 1] == k)).sum()),
                )
                for k in range(len(schedule))
            ]
            verdict = compare(
                lineage,
                Arm(int(n_b[s, t]), int(d_b[s, t])),
                alpha=ALPHA,
                margin=margin,
                min_ratings=min_ratings,
                rho=RHO,
            )
            assert (verdict.decision == "rollback") == rollback[s, t]
            assert (verdict.decision == "promote") == (promote[s, t] and not rollback[s, t])
    return np.array(first_rollback[:streams]), np.array(first_promote[:streams])


def _bounds(n: np.ndarray, d: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rate = d / np.maximum(n, 1)
    return np.where(n > 0, np.maximum(0, rate - r[n]), 0.0), np.where(n > 0, np.minimum(1, rate + r[n]), 1.0)


@pytest.mark.parametrize("p, share", [(0.5, 0.2), (0.5, 0.5), (0.15, 0.2)])
def test_an_equal_candidate_is_rolled_back_at_most_alpha_of_the_time(p, share):
    rollbacks, _ = simulate(p, p, share, streams=2000, ratings=4000, seed=1)
    rate = (rollbacks > 0).mean()
    print(f"p={p} share={share}: false rollbacks {rate:.4f} over 2000 streams of 4000 ratings (alpha {ALPHA})")
    assert rate <= ALPHA


def test_an_advancing_lineage_never_worse_is_rolled_back_at_most_alpha_of_the_time():
    """Twelve candidates, each at least as good as the baseline (0.5, flat, then rising): every
    suffix test runs, and together they wrongly roll back at most alpha of the streams."""
    schedule = [0.5] * 6 + [0.52, 0.55, 0.6, 0.65, 0.7, 0.75]
    rollbacks, _ = simulate(schedule, 0.5, 0.5, streams=2000, ratings=3000, seed=5, per_version=40)
    rate = (rollbacks > 0).mean()
    print(f"advancing lineage: false rollbacks {rate:.4f} over 2000 streams (alpha {ALPHA})")
    assert rate <= ALPHA


def test_a_candidate_worse_by_the_margin_is_promoted_at_most_alpha_of_the_time():
    _, promotions = simulate(0.45, 0.5, 0.5, streams=2000, ratings=4000, seed=2)
    rate = (promotions > 0).mean()
    print(f"0.45 vs 0.50 at margin 0.05: false promotions {rate:.4f} (alpha {ALPHA})")
    assert rate <= ALPHA


def test_a_clearly_worse_candidate_is_rolled_back_within_1000_ratings():
    """0.20 against 0.50 with a 20% canary: rolled back in at least 95% of the runs within 1000
    ratings in all (about 200 of them on the candidate), and never promoted."""
    rollbacks, promotions = simulate(0.2, 0.5, 0.2, streams=1000, ratings=1000, seed=3)
    within = (rollbacks > 0).mean()
    decided = rollbacks[rollbacks > 0]
    print(
        f"0.20 vs 0.50, share 0.2: rolled back within 1000 ratings in {within:.3f} of runs; "
        f"median {np.median(decided):.0f}, 95th percentile {np.percentile(decided, 95):.0f}"
    )
    assert within >= 0.95 and not (promotions > 0).any()


def test_a_poisoned_candidate_after_a_good_lineage_is_rolled_back_on_its_own_ratings():
    """Eight good candidates (0.7 against 0.5, 40 candidate ratings each), then one at 0.1 that
    serves from then on: the suffix from it is rolled back within 300 of its own ratings in at
    least 95% of the runs (the whole lineage's average would take far longer), unless the good
    lineage was promoted first (min_ratings set out of reach here, so it is not)."""
    schedule = [0.7] * 8 + [0.1]
    ratings = 320 * 2 + 300 * 2  # share 0.5: about 320 good candidate ratings, then 300 poisoned
    rollbacks, _ = simulate(schedule, 0.5, 0.5, streams=500, ratings=ratings, seed=6, per_version=40, min_ratings=10**6)
    own = np.array([max(0, r / 2 - 320) for r in rollbacks if r > 0])  # about: share x ratings - the good ones
    print(
        f"poisoned after a good lineage: rolled back in {(rollbacks > 0).mean():.3f} of runs, "
        f"after about {np.median(own):.0f} (median) / {np.percentile(own, 90):.0f} (p90) of its own ratings"
    )
    assert (rollbacks > 0).mean() >= 0.95


def test_a_clearly_better_candidate_is_promoted():
    rollbacks, promotions = simulate(0.8, 0.5, 0.2, streams=500, ratings=2000, seed=4)
    assert (promotions > 0).mean() >= 0.95 and not (rollbacks > 0).any()


# ---- the controller on a real registry and buffer --------------------------------------------


@pytest.fixture
def settings(tmp_path) -> LearnerSettings:
    return LearnerSettings(
        data_dir=tmp_path, model_id=TINY_MODEL_ID, canary_share=0.5, canary_min_ratings=20, canary_margin=0.2
    )


@pytest.fixture(autouse=True)
def look_every_time(monkeypatch):
    monkeypatch.setattr(canary_module, "CHECK_EVERY_S", 0.0)


def served(version: str | None, user: str) -> ResponseEvent:
    """A response of `version`, served now."""
    return ResponseEvent(
        response_id=f"r-{uuid.uuid4().hex}",
        user=user,
        base_model=TINY_MODEL_ID,
        adapter_version=version,
        messages=[{"role": "user", "content": "hi"}],
        prompt_token_ids=[1, 2],
        completion="…",
        completion_token_ids=[3],
        finish_reason="stop",
        sampling=SamplingParams(max_tokens=4, temperature=1.0, top_p=1.0),
    )


def rate(buffer: ReplayBuffer, stream, version: str | None, n: int, desirable: int) -> None:
    """n responses of `version` served now, `desirable` of them rated up."""
    events = []
    for i in range(n):
        response = served(version, f"u{i}")
        label = "desirable" if i < desirable else "undesirable"
        events += [response, FeedbackEvent(response_id=response.response_id, user=f"u{i}", label=label)]
    buffer.apply(stream.polled(*events))


def test_release_starts_a_canary_advances_it_or_activates_directly(registry, buffer, settings, publish):
    v1 = publish()
    CanaryController(registry, buffer, settings.model_copy(update={"canary_share": 0.0})).release(v1, None, "gate")
    assert registry.active() == v1 and registry.canary() is None
    controller = CanaryController(registry, buffer, settings)
    assert controller.head() == v1  # no canary: the active version
    v2 = publish(parent=v1)
    controller.release(v2, v1, "gate passed")
    assert registry.canary().version == v2 and registry.canary().share == 0.5 and registry.active() == v1
    assert controller.head() == v2  # the learner's canary: its candidate
    v3 = publish(parent=v2)
    controller.release(v3, v2, "gate passed")
    canary = registry.canary()
    assert (canary.version, canary.versions, registry.history()[-1].action) == (v3, (v2, v3), "canary_advance")
    stale = publish(parent=v1)  # trained from what was the head before the canary advanced
    controller.release(stale, v1, "gate passed")
    assert registry.canary().version == v3 and registry.get(stale).status == "ready"  # published, not released


def test_an_operators_canary_is_neither_trained_from_nor_advanced(registry, buffer, settings, publish):
    v1, v2 = publish(), publish()
    registry.start_canary(v1, 0.3, actor="admin")
    controller = CanaryController(registry, buffer, settings)
    assert controller.head() is None  # the active version (the base), not the operator's candidate
    controller.release(v2, None, "gate passed")
    assert registry.canary().version == v1 and len(registry.history()) == 1


def test_a_worse_candidate_is_rolled_back_with_evidence(registry, buffer, stream, settings, publish):
    v1 = publish()
    v2 = publish(parent=v1)
    registry.activate(v1, actor="op")
    metrics = LearnerMetrics()
    controller = CanaryController(registry, buffer, settings, metrics)
    controller.release(v2, v1, "gate passed")
    rate(buffer, stream, v2, 10, 1)
    rate(buffer, stream, v1, 10, 5)
    verdict = controller.step()
    assert verdict is not None and verdict.decision == "continue"  # 10 each cannot tell yet
    assert registry.canary().evidence["candidate"] == {"n": 10, "desirable": 1, "rate": 0.1}
    rate(buffer, stream, v2, 40, 2)
    rate(buffer, stream, v1, 40, 30)
    verdict = controller.step()
    assert verdict is not None and verdict.decision == "rollback"
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous, last.actor) == ("canary_rollback", v2, v1, ACTOR)
    assert last.evidence["candidate"] == {"n": 50, "desirable": 3, "rate": 0.06}
    assert last.evidence["baseline"]["n"] == 50 and last.evidence["interval"][1] < 0
    assert (last.evidence["candidate_version"], last.evidence["baseline_version"]) == (v2, v1)
    assert registry.get(v2).status == "rejected" and registry.active() == v1
    assert metrics.canary_decisions.labels(decision="rollback")._value.get() == 1
    assert controller.head() == v1  # the next update trains from the active version again


def test_a_good_lineage_is_promoted_as_its_newest_candidate(registry, buffer, stream, settings, publish):
    v1 = publish()
    v2 = publish(parent=v1)
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, None, "gate passed")
    rate(buffer, stream, v1, 30, 24)
    controller.release(v2, v1, "gate passed")
    rate(buffer, stream, v2, 30, 26)
    rate(buffer, stream, None, 60, 20)  # the base model is the baseline
    verdict = controller.step()
    assert verdict is not None and verdict.decision == "promote" and verdict.lineage == (Arm(30, 24), Arm(30, 26))
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous, last.actor) == ("canary_promote", v2, None, ACTOR)
    assert last.evidence["interval"][0] > -settings.canary_margin and last.evidence["versions"] == [v1, v2]
    assert registry.canary() is None and registry.active() == v2 and controller.head() == v2


def test_a_sudden_drop_is_judged_on_its_own_ratings(registry, buffer, stream, settings, publish):
    """A long good lineage, then a version much worse: the suffix from it is rolled back while the
    whole lineage's average still looks fine."""
    v1 = publish()
    v2 = publish(parent=v1)
    controller = CanaryController(registry, buffer, settings.model_copy(update={"canary_min_ratings": 10_000}))
    controller.release(v1, None, "gate passed")
    rate(buffer, stream, v1, 400, 300)
    rate(buffer, stream, None, 400, 200)
    verdict = controller.step()
    assert verdict is not None and verdict.decision == "continue"  # better, but min_ratings keeps it running
    controller.release(v2, v1, "gate passed")
    rate(buffer, stream, v2, 60, 3)
    rate(buffer, stream, None, 60, 30)
    verdict = controller.step()
    assert verdict is not None and verdict.decision == "rollback" and verdict.worse_from == 2
    candidate_rate, baseline_rate = verdict.candidate.rate, verdict.baseline.rate
    assert candidate_rate is not None and baseline_rate is not None
    assert candidate_rate > baseline_rate  # the whole lineage alone would go on
    last = registry.history()[-1]
    assert (last.action, last.version) == ("canary_rollback", v2) and f"since {v2}" in last.reason
    assert registry.get(v2).status == "rejected" and registry.active() is None


def test_paused_decides_nothing_and_manual_only_reports(registry, buffer, stream, settings, publish):
    v1 = publish()
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, None, "gate passed")
    rate(buffer, stream, v1, 50, 0)
    rate(buffer, stream, None, 50, 40)
    registry.pause_canary(v1, True, actor="op")
    entries = len(registry.history())
    assert controller.step() is None and len(registry.history()) == entries
    registry.pause_canary(v1, False, actor="op")
    manual = CanaryController(registry, buffer, settings.model_copy(update={"activation": "manual"}))
    verdict = manual.step()
    assert verdict is not None and verdict.decision == "rollback"  # what the test says ...
    assert registry.canary().evidence["decision"] == "rollback"  # ... is reported, not done
    assert registry.history()[-1].action == "canary_resume" and registry.get(v1).status == "ready"


def test_responses_before_the_canary_and_changed_votes(registry, buffer, stream, settings, publish):
    v1 = publish()
    rate(buffer, stream, None, 30, 0)  # before the canary: not evidence
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, None, "gate passed")
    rate(buffer, stream, None, 4, 4)
    response = served(v1, "u")
    down = FeedbackEvent(response_id=response.response_id, user="u", label="undesirable")
    up = FeedbackEvent(response_id=response.response_id, user="u", label="desirable", created_at=down.created_at + 1)
    buffer.apply(stream.polled(response, down, up))  # the vote changed: counted once, with the later label
    verdict = controller.step()
    assert verdict is not None
    assert (verdict.candidate, verdict.baseline) == (Arm(1, 1), Arm(4, 4))
