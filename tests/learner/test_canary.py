"""The canary's test and controller (learner.canary): the anytime-valid statistic on hand-made
counts, its error rate and power measured by simulation (checked after every rating), and the
controller on a real registry and replay buffer."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

import learner.canary as canary_module
from ingest.events import FeedbackEvent, ResponseEvent, SamplingParams
from learner.buffer import ReplayBuffer
from learner.canary import ACTOR, Arm, CanaryController, compare, radius, tuned_rho
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
    kw = {"alpha": ALPHA, "margin": 0.05, "min_ratings": 100, "rho": RHO}
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

def simulate(p_candidate: float, p_baseline: float, share: float, *, streams: int, ratings: int,
             seed: int, margin: float = 0.05, min_ratings: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Streams of ratings, each going to the candidate with probability `share`, the test
    checked after EVERY rating. Returns, per stream, the rating count at the first rollback and
    at the first promotion (0: never within `ratings`). The same arithmetic as `compare`,
    vectorised (checked against it below)."""
    rng = np.random.default_rng(seed)
    r = np.array([np.inf] + [radius(n, ALPHA / 2, RHO) for n in range(1, ratings + 1)])
    first_rollback, first_promote = [], []
    for _ in range(0, streams, 250):  # in chunks: 250 x ratings arrays stay small
        to_c = rng.random((250, ratings)) < share
        x = rng.random((250, ratings)) < np.where(to_c, p_candidate, p_baseline)
        n_c, d_c = np.cumsum(to_c, 1), np.cumsum(x & to_c, 1)
        n_b, d_b = np.cumsum(~to_c, 1), np.cumsum(x & ~to_c, 1)
        lo_c, hi_c = _bounds(n_c, d_c, r)
        lo_b, hi_b = _bounds(n_b, d_b, r)
        rollback = hi_c - lo_b < 0
        promote = (lo_c - hi_b > -margin) & (np.minimum(n_c, n_b) >= min_ratings)
        for decided, out in ((rollback, first_rollback), (promote, first_promote)):
            out.extend(np.where(decided.any(1), decided.argmax(1) + 1, 0))
        for s, t in ((0, ratings // 3), (1, ratings - 1), (2, 40)):  # spot checks against compare()
            verdict = compare(Arm(int(n_c[s, t]), int(d_c[s, t])), Arm(int(n_b[s, t]), int(d_b[s, t])),
                              alpha=ALPHA, margin=margin, min_ratings=min_ratings, rho=RHO)
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
    print(f"0.20 vs 0.50, share 0.2: rolled back within 1000 ratings in {within:.3f} of runs; "
          f"median {np.median(decided):.0f}, 95th percentile {np.percentile(decided, 95):.0f}")
    assert within >= 0.95 and not (promotions > 0).any()


def test_a_clearly_better_candidate_is_promoted():
    rollbacks, promotions = simulate(0.8, 0.5, 0.2, streams=500, ratings=2000, seed=4)
    assert (promotions > 0).mean() >= 0.95 and not (rollbacks > 0).any()


# ---- the controller on a real registry and buffer --------------------------------------------

@pytest.fixture
def settings(tmp_path) -> LearnerSettings:
    return LearnerSettings(data_dir=tmp_path, model_id=TINY_MODEL_ID, canary_share=0.5,
                           canary_min_ratings=20, canary_margin=0.2)


@pytest.fixture(autouse=True)
def look_every_time(monkeypatch):
    monkeypatch.setattr(canary_module, "CHECK_EVERY_S", 0.0)


def served(version: str | None, user: str) -> ResponseEvent:
    """A response of `version`, served now."""
    return ResponseEvent(response_id=f"r-{uuid.uuid4().hex}", user=user, base_model=TINY_MODEL_ID,
                         adapter_version=version, messages=[{"role": "user", "content": "hi"}],
                         prompt_token_ids=[1, 2], completion="…", completion_token_ids=[3], finish_reason="stop",
                         sampling=SamplingParams(max_tokens=4, temperature=1.0, top_p=1.0))


def rate(buffer: ReplayBuffer, stream, version: str | None, n: int, desirable: int) -> None:
    """n responses of `version` served now, `desirable` of them rated up."""
    events = []
    for i in range(n):
        response = served(version, f"u{i}")
        label = "desirable" if i < desirable else "undesirable"
        events += [response, FeedbackEvent(response_id=response.response_id, user=f"u{i}", label=label)]
    buffer.apply(stream.polled(*events))


def test_release_starts_a_canary_or_activates_directly(registry, buffer, settings, publish):
    v1, v2, v3 = publish(), publish(), publish()
    CanaryController(registry, buffer, settings.model_copy(update={"canary_share": 0.0})).release(v1, "gate passed")
    assert registry.active() == v1 and registry.canary() is None
    controller = CanaryController(registry, buffer, settings)
    controller.release(v2, "gate passed")
    assert registry.canary().version == v2 and registry.canary().share == 0.5 and registry.active() == v1
    controller.release(v3, "gate passed")  # one canary at a time: v3 waits
    assert controller.waiting == v3 and registry.canary().version == v2


def test_a_worse_candidate_is_rolled_back_with_evidence_then_the_waiting_one_starts(
        registry, buffer, stream, settings, publish):
    v1 = publish()
    v2, v3 = publish(parent=v1), publish(parent=v1)
    registry.activate(v1, actor="op")
    metrics = LearnerMetrics()
    controller = CanaryController(registry, buffer, settings, metrics)
    controller.release(v2, "gate passed")
    controller.release(v3, "gate passed")
    rate(buffer, stream, v2, 10, 1)
    rate(buffer, stream, v1, 10, 5)
    assert controller.step().decision == "continue"  # 10 each cannot tell yet
    assert registry.canary().evidence["candidate"] == {"n": 10, "desirable": 1, "rate": 0.1}
    rate(buffer, stream, v2, 40, 2)
    rate(buffer, stream, v1, 40, 30)
    assert controller.step().decision == "rollback"
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous, last.actor) == ("canary_rollback", v2, v1, ACTOR)
    assert last.evidence["candidate"] == {"n": 50, "desirable": 3, "rate": 0.06}
    assert last.evidence["baseline"]["n"] == 50 and last.evidence["interval"][1] < 0
    assert (last.evidence["candidate_version"], last.evidence["baseline_version"]) == (v2, v1)
    assert registry.get(v2).status == "rejected" and registry.active() == v1
    assert metrics.canary_decisions.labels(decision="rollback")._value.get() == 1
    controller.step()  # no canary runs: the waiting v3 (trained from v1, still active) starts
    assert registry.canary().version == v3 and registry.history()[-1].actor == "learner"


def test_a_good_candidate_is_promoted_and_a_sibling_is_skipped(registry, buffer, stream, settings, publish):
    v1, v2 = publish(), publish()  # both trained from the base
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, "gate passed")
    controller.release(v2, "gate passed")
    rate(buffer, stream, v1, 60, 50)
    rate(buffer, stream, None, 60, 20)  # the base model is the baseline
    assert controller.step().decision == "promote"
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous, last.actor) == ("canary_promote", v1, None, ACTOR)
    assert last.evidence["interval"][0] > -settings.canary_margin
    controller.step()  # v2 descends from the base, not from v1: skipped
    assert registry.canary() is None and registry.active() == v1 and controller.waiting is None


def test_paused_decides_nothing_and_manual_only_reports(registry, buffer, stream, settings, publish):
    v1 = publish()
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, "gate passed")
    rate(buffer, stream, v1, 50, 0)
    rate(buffer, stream, None, 50, 40)
    registry.pause_canary(v1, True, actor="op")
    entries = len(registry.history())
    assert controller.step() is None and len(registry.history()) == entries
    registry.pause_canary(v1, False, actor="op")
    manual = CanaryController(registry, buffer, settings.model_copy(update={"activation": "manual"}))
    assert manual.step().decision == "rollback"  # what the test says ...
    assert registry.canary().evidence["decision"] == "rollback"  # ... is reported, not done
    assert registry.history()[-1].action == "canary_resume" and registry.get(v1).status == "ready"


def test_responses_before_the_canary_and_changed_votes(registry, buffer, stream, settings, publish):
    v1 = publish()
    rate(buffer, stream, None, 30, 0)  # before the canary: not evidence
    controller = CanaryController(registry, buffer, settings)
    controller.release(v1, "gate passed")
    rate(buffer, stream, None, 4, 4)
    response = served(v1, "u")
    down = FeedbackEvent(response_id=response.response_id, user="u", label="undesirable")
    up = FeedbackEvent(response_id=response.response_id, user="u", label="desirable", created_at=down.created_at + 1)
    buffer.apply(stream.polled(response, down, up))  # the vote changed: counted once, with the later label
    verdict = controller.step()
    assert (verdict.candidate, verdict.baseline) == (Arm(1, 1), Arm(4, 4))
