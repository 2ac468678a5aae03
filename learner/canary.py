"""The canary: a new lineage serves a share of users, is compared with the active version on
live ratings, looking at every one, and is promoted or rolled back.

While a canary runs the learner trains from its candidate, and each new version that passes the
gate advances it (registry.canary), so the canary tests its lineage as it served. `compare`, a
pure function, decides from confidence sequences (Howard et al. 2021) for the baseline and every
suffix of the lineage: rollback when some suffix is worse, promotion when the whole lineage is
not worse by more than the margin. `CanaryController` applies it in the learner's loop. The
reasoning, the error rates and the assumptions: docs/canary.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from learner.buffer import ReplayBuffer
from learner.metrics import LearnerMetrics
from learner.settings import LearnerSettings
from registry import NoCanary, Registry, RegistryError, RegistryUnavailable

logger = logging.getLogger(__name__)

ACTOR = "canary-controller"
"""The actor of the controller's decisions in the history."""
LEARNER = "learner"
"""The actor of the canaries (advances and direct activations) the learner starts."""
CHECK_EVERY_S = 1.0
"""Counting the arms reads the buffer; at most this often (any schedule keeps the error rate)."""

Decision = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class Arm:
    """Ratings of one version's responses (or of several): how many, how many desirable."""

    n: int
    desirable: int

    @property
    def rate(self) -> float | None:
        return self.desirable / self.n if self.n else None

    def __add__(self, other: Arm) -> Arm:
        return Arm(self.n + other.n, self.desirable + other.desirable)


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


def suffix_error(alpha: float, j: int) -> float:
    """The error spent on suffix j (1 = the whole lineage) of the candidate arm."""
    return alpha / 2 * 6 / (math.pi**2 * j * j)


@dataclass(frozen=True)
class Verdict:
    """The test's answer at one moment, with what it rests on."""

    decision: Decision
    candidate: Arm
    """The whole lineage's ratings."""
    baseline: Arm
    lower: float
    """Lower bound of Δ = p_lineage − p_baseline."""
    upper: float
    alpha: float
    margin: float
    min_ratings: int
    rho: float
    lineage: tuple[Arm, ...] = ()
    """Each candidate's own ratings, oldest first."""
    worse_from: int | None = None
    """For a rollback: the first version (1-based) of the suffix shown worse."""
    suffix_upper: float | None = None
    """That suffix's upper bound of Δ."""

    def evidence(self) -> dict[str, Any]:
        """The counts, rates, statistic and thresholds, as recorded in the history."""
        c, b = self.candidate, self.baseline
        return {
            "decision": self.decision,
            "candidate": {"n": c.n, "desirable": c.desirable, "rate": c.rate},
            "baseline": {"n": b.n, "desirable": b.desirable, "rate": b.rate},
            "delta": None if c.rate is None or b.rate is None else c.rate - b.rate,
            "interval": [self.lower, self.upper],
            "lineage": [[arm.n, arm.desirable] for arm in self.lineage],
            "worse_from": self.worse_from,
            "suffix_upper": self.suffix_upper,
            "statistic": "differences of normal-mixture confidence sequences (Howard et al. 2021), "
            "sigma 1/2: alpha/2 for the baseline, alpha/2 * 6/(pi^2 j^2) for suffix j "
            "of the lineage",
            "alpha": self.alpha,
            "margin": self.margin,
            "min_ratings": self.min_ratings,
            "rho": self.rho,
            "thresholds": {
                "rollback": "upper < 0 for some suffix",
                "promote": f"lower > {-self.margin} and n >= {self.min_ratings} per arm",
            },
        }


def compare(
    lineage: Sequence[Arm] | Arm, baseline: Arm, *, alpha: float, margin: float, min_ratings: int, rho: float
) -> Verdict:
    """The anytime-valid test of the module docstring; `lineage` holds each candidate's ratings,
    oldest first (one Arm: a canary that never advanced)."""
    lineage = (lineage,) if isinstance(lineage, Arm) else tuple(lineage)
    lo_b, hi_b = _interval(baseline, alpha / 2, rho)
    suffix, worse_from, suffix_upper = Arm(0, 0), None, None
    whole = (0.0, 1.0)
    for j in range(len(lineage), 0, -1):  # the newest suffix first
        suffix = suffix + lineage[j - 1]
        lo_c, hi_c = _interval(suffix, suffix_error(alpha, j), rho)
        if hi_c - lo_b < 0:
            worse_from, suffix_upper = j, hi_c - lo_b  # keep going: the longest suffix shown worse
        whole = (lo_c, hi_c)
    lower, upper = whole[0] - hi_b, whole[1] - lo_b
    if worse_from is not None:
        decision: Decision = "rollback"
    elif lower > -margin and min(suffix.n, baseline.n) >= min_ratings:
        decision = "promote"
    else:
        decision = "continue"
    return Verdict(
        decision, suffix, baseline, lower, upper, alpha, margin, min_ratings, rho, lineage, worse_from, suffix_upper
    )


def _interval(arm: Arm, a: float, rho: float) -> tuple[float, float]:
    rate = arm.rate
    if rate is None:  # no ratings
        return 0.0, 1.0
    r = radius(arm.n, a, rho)
    return max(0.0, rate - r), min(1.0, rate + r)


class CanaryController:
    """Starts and advances the learner's canaries and decides every canary; see the module
    docstring.

    It decides only under automatic activation (with `activation=manual` it reports evidence and
    leaves decisions to operators), and never while the canary is paused.
    """

    def __init__(
        self, registry: Registry, buffer: ReplayBuffer, settings: LearnerSettings, metrics: LearnerMetrics | None = None
    ) -> None:
        self.registry, self.buffer, self.settings, self.metrics = registry, buffer, settings, metrics
        self.rho = tuned_rho(settings.canary_tuned_for, settings.canary_alpha / 2)
        self._next_check = 0.0
        self._reported: tuple | None = None

    def head(self) -> str | None:
        """What the next update trains from: the candidate of the learner's canary while one runs
        (its lineage goes on learning), else the active version (None: the base model)."""
        canary = self.registry.canary()
        if canary is not None and canary.actor == LEARNER:
            return canary.version
        return self.registry.active()

    def release(self, version: str, parent: str | None, reason: str) -> None:
        """`version`, trained from `parent`, passed the gate under automatic activation: start a
        canary with it, advance the learner's canary to it, or (canary share 0 or 1) activate it.
        A version whose parent is no longer the head (the canary was decided meanwhile, or an
        operator's canary runs) is published but not released: the next update trains from the
        head."""
        share = self.settings.canary_share
        if not 0 < share < 1:
            self.registry.activate(version, actor=LEARNER, reason=reason)
            return
        canary, active = self.registry.canary(), self.registry.active()
        try:
            if canary is None and parent == active:
                self.registry.start_canary(version, share, actor=LEARNER, reason=reason)
            elif canary is not None and canary.actor == LEARNER and canary.version == parent:
                self.registry.advance_canary(parent, version, actor=LEARNER, reason=reason)
            else:
                logger.info(
                    "%s not released: trained from %s, but %s",
                    version,
                    parent or "base",
                    f"the canary of {canary.version} by {canary.actor} runs"
                    if canary
                    else f"{active or 'base'} is active",
                )
        except RegistryError as exc:  # decided or started by someone else meanwhile
            logger.info("%s not released: %s", version, exc)

    def step(self) -> Verdict | None:
        """Look once: decide (or report) the running canary. Returns the verdict when the arms
        were counted, else None. The registry being away for a moment is logged, not raised: the
        next poll looks again."""
        try:
            return self._step()
        except RegistryUnavailable as exc:
            logger.warning("canary: the registry is unavailable (%s); looking again at the next poll", exc)
            return None

    def _step(self) -> Verdict | None:
        canary = self.registry.canary()
        if canary is None or canary.paused or time.monotonic() < self._next_check:
            return None
        self._next_check = time.monotonic() + CHECK_EVERY_S
        counts = self.buffer.rated_since([*canary.versions, canary.baseline], since=canary.since)
        settings = self.settings
        # (an operator may have made an earlier candidate the baseline: its ratings are the baseline's)
        lineage = [Arm(*counts[v]) if v != canary.baseline else Arm(0, 0) for v in canary.versions]
        verdict = compare(
            lineage,
            Arm(*counts[canary.baseline]),
            alpha=settings.canary_alpha,
            margin=settings.canary_margin,
            min_ratings=settings.canary_min_ratings,
            rho=self.rho,
        )
        evidence = {
            **verdict.evidence(),
            "candidate_version": canary.version,
            "baseline_version": canary.baseline,
            "since": canary.since,
            "versions": list(canary.versions),
        }
        if verdict.decision == "continue" or settings.activation != "auto":
            key = (canary.version, canary.since, verdict.candidate, verdict.baseline)
            if key != self._reported:
                self.registry.report_canary(canary.version, evidence)
                self._reported = key
            return verdict
        self._decide(canary.version, canary.versions, canary.baseline, verdict, evidence)
        return verdict

    def _decide(
        self, version: str, versions: tuple[str, ...], baseline: str | None, verdict: Verdict, evidence: dict
    ) -> None:
        c, b = verdict.candidate, verdict.baseline
        counts = f"{c.desirable}/{c.n} vs {b.desirable}/{b.n} desirable"
        try:
            if verdict.decision == "rollback":
                assert verdict.worse_from is not None  # a rollback says since when the candidate is worse
                since = versions[verdict.worse_from - 1]
                reason = (
                    f"worse than {baseline or 'base'} since {since}: difference at most "
                    f"{verdict.suffix_upper:+.3f} ({counts} over the whole canary; alpha {verdict.alpha})"
                )
                self.registry.rollback_canary(version, actor=ACTOR, reason=reason, evidence=evidence)
            else:
                reason = (
                    f"not worse than {baseline or 'base'} by more than {verdict.margin}: difference at "
                    f"least {verdict.lower:+.3f} ({counts}; alpha {verdict.alpha})"
                )
                self.registry.promote_canary(version, actor=ACTOR, reason=reason, evidence=evidence)
        except NoCanary:
            logger.info("the canary of %s ended before the controller's %s", version, verdict.decision)
            return
        logger.warning("canary %s: %s, %s", version, verdict.decision, reason)
        if self.metrics is not None:
            self.metrics.canary_decisions.labels(decision=verdict.decision).inc()
