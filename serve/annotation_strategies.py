"""Which queued answer an annotator sees next: the operator's strategy (`KTO_ANNOTATION_STRATEGY`).

- ``uniform``: any waiting answer, at random: an unbiased sample of what users get.
- ``newest``: the latest first: labels on what the model does now.
- ``canary``: answers of the running canary's arms first, the arm with less evidence first (the
  controller's latest count), so annotators add evidence where the decision waits for it; without
  a canary, newest.
- ``uncertain``: where the serving policy is least sure, i.e. its implicit reward is nearest
  KTO's reference point (Ethayarajh et al. 2024, eq. 6: the value σ(r − z₀) is steepest there,
  so a label moves the loss most). r is log π(y|x) − log π_ref(y|x) of the answer as served,
  under the version that serves now (β scales every r alike, so it does not change the order);
  z₀ is the mean r of the answers scored, floored at 0 like the paper's KL estimate (answers are
  samples of the policy, so their mean log-ratio estimates KL(π ‖ π_ref)). Answers not scored
  come last; with the base model serving every r is 0 and the order is newest.

Pure functions: the route gathers the candidates, the canary and the scores.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from serve.annotation_queue import Candidate

Strategy = Literal["uniform", "newest", "canary", "uncertain"]
STRATEGIES: tuple[Strategy, ...] = ("uniform", "newest", "canary", "uncertain")


@dataclass(frozen=True)
class Arms:
    """The running canary as the ``canary`` strategy needs it."""

    candidate: frozenset[str]
    """Every version of the candidate's lineage."""
    baseline: str | None
    candidate_labels: int = 0
    """Labels each arm has so far (the controller's evidence)."""
    baseline_labels: int = 0


def wants_overlap(response_id: str, overlap: float) -> bool:
    """Whether an answer goes to two annotators: a share ``overlap`` of answers, decided by a hash
    of its id, so every replica decides alike."""
    digest = hashlib.sha256(response_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < overlap


def uncertainty(log_ratios: Mapping[str, float]) -> dict[str, float]:
    """|r − z₀| per answer (the module docstring): smaller is less certain."""
    if not log_ratios:
        return {}
    z0 = max(0.0, sum(log_ratios.values()) / len(log_ratios))
    return {rid: abs(r - z0) for rid, r in log_ratios.items()}


def order(
    strategy: Strategy,
    candidates: Sequence[Candidate],
    *,
    arms: Arms | None = None,
    scores: Mapping[str, float] | None = None,
    rng: random.Random | None = None,
) -> list[Candidate]:
    """``candidates`` in the order to offer them."""
    newest = sorted(candidates, key=lambda c: c.created_at, reverse=True)
    if strategy == "uniform":
        shuffled = list(candidates)
        (rng or random.Random()).shuffle(shuffled)
        return shuffled
    if strategy == "canary" and arms is not None:
        first = "baseline" if arms.baseline_labels < arms.candidate_labels else "candidate"

        def arm(c: Candidate) -> int:
            if c.version is not None and c.version in arms.candidate:
                return 0 if first == "candidate" else 1
            if c.version == arms.baseline:
                return 0 if first == "baseline" else 1
            return 2

        return sorted(newest, key=arm)  # stable: newest within each arm
    if strategy == "uncertain" and scores:
        return sorted(newest, key=lambda c: scores.get(c.response_id, float("inf")))
    return newest
