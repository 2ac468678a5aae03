"""The canary's decision: promote a new version or roll it back, from live ratings, looking at
every one.

The test (`compare`, a pure function). Let p_c and p_a be the desirable rates of the candidate
and of the active version (the baseline) among responses served since the canary started, each
rated response counted once with its current label (the latest vote wins, as in the buffer).
Each arm gets a confidence sequence: intervals that hold at EVERY number of ratings at once,
so the decision may be checked after each rating, or whenever, and stop on any rule, with its
error rate intact. We use the two-sided normal-mixture boundary of

    S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon (2021), "Time-uniform, nonparametric,
    nonasymptotic confidence sequences", Annals of Statistics 49(2), §3 (normal mixture,
    Proposition 5 of arXiv:1810.08240; after Robbins 1970):

    with probability ≥ 1 − a, for all n ≥ 1 at once:  |Σ(x_i − p)| < u(n/4),
        u(v) = sqrt((v + ρ) · log((v + ρ) / (ρ · a²)))

since a rating x_i ∈ {0, 1} is 1/2-sub-Gaussian (Hoeffding's lemma), so the variance process
is n·σ² = n/4 whatever p is. Each arm's interval is p̂ ± u(n/4)/n, clipped to [0, 1]; each gets
a = α/2 (a union bound over the two arms), so with probability ≥ 1 − α both intervals hold at
every moment of the canary, and then Δ = p_c − p_a lies in

    [lo_c − hi_a, hi_c − lo_a]    at every moment.

ρ > 0 only shapes the boundary (tightest near n = `tuned_for` ratings per arm), never its error
rate. Decisions, checked whenever the controller looks:

    rollback   upper bound of Δ < 0: the candidate is worse.
    promote    lower bound of Δ > −margin and each arm has ≥ min_ratings: it is not worse by
               more than the margin.
    continue   otherwise.

Error rates, by the coverage above: P(roll back a candidate at least as good) ≤ α, and
P(promote a candidate worse by more than the margin) ≤ α, however often one looks. Measured
in tests/learner/test_canary.py by simulation. The price of looking at will is width: at
n = 100 ratings per arm each radius is about 0.17, at 1000 about 0.054; a candidate equal to the
active version is promoted at margin 0.05 after roughly 5000 ratings per arm (1200 at 0.1), a
much better one far sooner, and one at 0.2 against 0.5 is rolled back after about 300 ratings
in all with a 20% canary (measured: tests/learner/test_canary.py).

Assumption: ratings are independent draws given the version. Users are split by a hash, so
heavy raters and user-level tastes add noise the bound does not model; with many users that
averages out, with a handful it may not.

The controller (`CanaryController`) runs in the learner's loop, which already consumes every
response and rating: after each poll it reads the canary from the registry, counts the arms in
the replay buffer, and records a decision (with its evidence) through the registry, or reports
the running evidence for operators. It also starts the canaries: a version that passed the gate
under automatic activation starts one instead of being activated (`canary_share` of 0 or 1:
activated directly). While a canary runs, newer versions wait: only the newest is kept, and it
starts its own canary when the running one ends if it was trained from what is active then
(after a rollback: yes; after a promotion it descends from the old active version and is
skipped, and the next update trains from the promoted one).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from learner.buffer import ReplayBuffer
from learner.metrics import LearnerMetrics
from learner.settings import LearnerSettings
from registry import CanaryRunning, NoCanary, Registry, RegistryError, RegistryUnavailable, UnknownVersion

logger = logging.getLogger(__name__)

ACTOR = "canary-controller"
"""The actor of the controller's decisions in the history."""
LEARNER = "learner"
"""The actor of the canaries (and direct activations) the learner starts."""
CHECK_EVERY_S = 1.0
"""Counting the arms reads the buffer; at most this often (any schedule keeps the error rate)."""

Decision = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class Arm:
    """Ratings of one version's responses: how many, how many desirable."""

    n: int
    desirable: int

    @property
    def rate(self) -> float | None:
        return self.desirable / self.n if self.n else None


def radius(n: int, a: float, rho: float) -> float:
    """Half-width of the normal-mixture confidence sequence for a mean of n ratings in [0, 1]
    at error a (see the module docstring); infinite for n = 0."""
    if n <= 0:
        return math.inf
    v = n / 4
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * a * a))) / n


def tuned_rho(n: int, a: float) -> float:
    """The ρ that makes `radius` smallest at n ratings (golden-section search on log ρ; the
    radius is unimodal in it). Any ρ > 0 keeps the error rate."""
    lo, hi = math.log(1e-6 * n), math.log(1e3 * n)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if radius(n, a, math.exp(x1)) < radius(n, a, math.exp(x2)):
            hi = x2
        else:
            lo = x1
    return math.exp((lo + hi) / 2)


@dataclass(frozen=True)
class Verdict:
    """The test's answer at one moment, with what it rests on."""

    decision: Decision
    candidate: Arm
    baseline: Arm
    lower: float
    """Lower bound of Δ = p_candidate − p_baseline."""
    upper: float
    alpha: float
    margin: float
    min_ratings: int
    rho: float

    def evidence(self) -> dict[str, Any]:
        """The counts, rates, statistic and thresholds, as recorded in the history."""
        c, b = self.candidate, self.baseline
        return {
            "decision": self.decision,
            "candidate": {"n": c.n, "desirable": c.desirable, "rate": c.rate},
            "baseline": {"n": b.n, "desirable": b.desirable, "rate": b.rate},
            "delta": None if c.rate is None or b.rate is None else c.rate - b.rate,
            "interval": [self.lower, self.upper],
            "statistic": "difference of two normal-mixture confidence sequences "
                         "(Howard et al. 2021), sigma 1/2, alpha/2 per arm",
            "alpha": self.alpha, "margin": self.margin, "min_ratings": self.min_ratings, "rho": self.rho,
            "thresholds": {"rollback": "upper < 0",
                           "promote": f"lower > {-self.margin} and n >= {self.min_ratings} per arm"},
        }


def compare(candidate: Arm, baseline: Arm, *, alpha: float, margin: float, min_ratings: int,
            rho: float) -> Verdict:
    """The anytime-valid test of the module docstring."""
    (lo_c, hi_c), (lo_b, hi_b) = (_interval(arm, alpha / 2, rho) for arm in (candidate, baseline))
    lower, upper = lo_c - hi_b, hi_c - lo_b
    if upper < 0:
        decision: Decision = "rollback"
    elif lower > -margin and min(candidate.n, baseline.n) >= min_ratings:
        decision = "promote"
    else:
        decision = "continue"
    return Verdict(decision, candidate, baseline, lower, upper, alpha, margin, min_ratings, rho)


def _interval(arm: Arm, a: float, rho: float) -> tuple[float, float]:
    if arm.n == 0:
        return 0.0, 1.0
    r = radius(arm.n, a, rho)
    return max(0.0, arm.rate - r), min(1.0, arm.rate + r)


class CanaryController:
    """Starts canaries for the learner's new versions and decides them; see the module docstring.

    It decides only under automatic activation (with `activation=manual` it reports evidence and
    leaves decisions to operators), and never while the canary is paused. A canary an operator
    started is decided like the learner's own.
    """

    def __init__(self, registry: Registry, buffer: ReplayBuffer, settings: LearnerSettings,
                 metrics: LearnerMetrics | None = None) -> None:
        self.registry, self.buffer, self.settings, self.metrics = registry, buffer, settings, metrics
        self.rho = tuned_rho(settings.canary_tuned_for, settings.canary_alpha / 2)
        self.waiting: str | None = None
        """The newest version that passed the gate while a canary ran."""
        self._next_check = 0.0
        self._reported: tuple | None = None

    def release(self, version: str, reason: str) -> None:
        """A version passed the gate under automatic activation: canary it, or activate it."""
        share = self.settings.canary_share
        if not 0 < share < 1:
            self.registry.activate(version, actor=LEARNER, reason=reason)
            return
        try:
            self.registry.start_canary(version, share, actor=LEARNER, reason=reason)
        except CanaryRunning as running:
            logger.info("%s waits: the canary of %s is still running", version, running.version)
            self.waiting = version

    def step(self) -> Verdict | None:
        """Look once: start a waiting version, or decide (or report) the running canary.
        Returns the verdict when the arms were counted, else None. The registry being away for a
        moment is logged, not raised: the next poll looks again."""
        try:
            return self._step()
        except RegistryUnavailable as exc:
            logger.warning("canary: the registry is unavailable (%s); looking again at the next poll", exc)
            return None

    def _step(self) -> Verdict | None:
        canary = self.registry.canary()
        if canary is None:
            self._start_waiting()
            return None
        if canary.paused or time.monotonic() < self._next_check:
            return None
        self._next_check = time.monotonic() + CHECK_EVERY_S
        counts = self.buffer.rated_since([canary.version, canary.baseline], since=canary.since)
        settings = self.settings
        verdict = compare(Arm(*counts[canary.version]), Arm(*counts[canary.baseline]),
                          alpha=settings.canary_alpha, margin=settings.canary_margin,
                          min_ratings=settings.canary_min_ratings, rho=self.rho)
        evidence = {**verdict.evidence(), "candidate_version": canary.version,
                    "baseline_version": canary.baseline, "since": canary.since}
        if verdict.decision == "continue" or settings.activation != "auto":
            key = (canary.version, canary.since, verdict.candidate, verdict.baseline)
            if key != self._reported:
                self.registry.report_canary(canary.version, evidence)
                self._reported = key
            return verdict
        self._decide(canary.version, canary.baseline, verdict, evidence)
        return verdict

    def _decide(self, version: str, baseline: str | None, verdict: Verdict, evidence: dict) -> None:
        c, b = verdict.candidate, verdict.baseline
        counts = f"{c.desirable}/{c.n} vs {b.desirable}/{b.n} desirable"
        try:
            if verdict.decision == "rollback":
                reason = (f"worse than {baseline or 'base'}: difference at most {verdict.upper:+.3f} "
                          f"({counts}; alpha {verdict.alpha})")
                self.registry.rollback_canary(version, actor=ACTOR, reason=reason, evidence=evidence)
            else:
                reason = (f"not worse than {baseline or 'base'} by more than {verdict.margin}: difference at "
                          f"least {verdict.lower:+.3f} ({counts}; alpha {verdict.alpha})")
                self.registry.promote_canary(version, actor=ACTOR, reason=reason, evidence=evidence)
        except NoCanary:
            logger.info("the canary of %s ended before the controller's %s", version, verdict.decision)
            return
        logger.warning("canary %s: %s, %s", version, verdict.decision, reason)
        if self.metrics is not None:
            self.metrics.canary_decisions.labels(decision=verdict.decision).inc()

    def _start_waiting(self) -> None:
        version = self.waiting
        if version is None:
            return
        try:
            info, active = self.registry.get(version), self.registry.active()
        except UnknownVersion:
            info = None
        self.waiting = None  # (RegistryUnavailable above keeps it waiting)
        if info is None:
            return
        if info.status != "ready" or info.parent != active:
            logger.info("%s skipped: trained from %s, but %s is active now", version, info.parent or "base",
                        active or "base")
            return
        try:
            self.release(version, "waited for the previous canary")
        except RegistryError as exc:  # e.g. an operator started a canary meanwhile
            logger.info("%s skipped: %s", version, exc)
