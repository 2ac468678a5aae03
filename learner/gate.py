"""The gate: nothing reaches users unless it is finite, close to the base, and not worse.

- finite: every LoRA weight is finite;
- KL: the mean per-token KL(policy ‖ base) over held-out completions is below `max_kl` (before
  any label is held out, over the update's fresh ones: a first version is never unchecked);
- accuracy: on held-out labels, the implicit reward β·(log π − log π_ref) has the label's sign
  at least as often as under the parent, less `accuracy_tolerance`. With too few held-out
  labels to tell, the check is skipped and the result says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from learner.buffer import Example
from learner.policy import Policy

MIN_HELD_OUT = 20  # fewer labels than this cannot tell a 5-point accuracy change from noise


@dataclass
class Evaluation:
    accuracy: float | None  # None: no held-out labels
    kl_per_token: float | None
    n: int


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    """One short code per reason (nonfinite, kl, accuracy): metric labels must not carry numbers."""
    notes: list[str] = field(default_factory=list)
    candidate: Evaluation | None = None
    parent: Evaluation | None = None

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    policy: Policy, held_out: list[Example], *, kl_contexts: Sequence[Example] = (), chunk: int = 16
) -> Evaluation:
    """Implicit-reward accuracy on `held_out` (r > 0 predicts desirable; r == 0 counts half) and
    the mean token KL to the base on `kl_contexts` (none given: not measured)."""
    correct = 0.0
    for start in range(0, len(held_out), chunk):
        part = held_out[start : start + chunk]
        margin = policy.logps([(e.prompt_ids, e.completion_ids) for e in part]).float() - torch.tensor(
            [e.ref_logp for e in part], device=policy.device
        )
        for e, r in zip(part, margin.tolist()):
            correct += 0.5 if abs(r) < 1e-6 else float((r > 0) == e.desirable)
    kl_sum, kl_tokens = 0.0, 0
    for start in range(0, len(kl_contexts), chunk):
        kl, n = policy.token_kl([(e.prompt_ids, e.completion_ids) for e in kl_contexts[start : start + chunk]])
        kl_sum, kl_tokens = kl_sum + kl, kl_tokens + n
    return Evaluation(
        correct / len(held_out) if held_out else None, kl_sum / kl_tokens if kl_tokens else None, len(held_out)
    )


def decide(candidate: Evaluation, parent: Evaluation, *, finite: bool, max_kl: float, tolerance: float) -> GateResult:
    result = GateResult(passed=True, candidate=candidate, parent=parent)
    if not finite:
        result.reasons.append("non-finite adapter weights")
        result.codes.append("nonfinite")
    if candidate.kl_per_token is not None and candidate.kl_per_token > max_kl:
        result.reasons.append(f"KL to the base {candidate.kl_per_token:.3f} nats/token > bound {max_kl}")
        result.codes.append("kl")
    if candidate.n < MIN_HELD_OUT:
        result.notes.append(f"accuracy check skipped: {candidate.n} held-out labels < {MIN_HELD_OUT}")
    elif (
        candidate.accuracy is not None
        and parent.accuracy is not None
        and candidate.accuracy < parent.accuracy - tolerance
    ):
        result.reasons.append(
            f"held-out accuracy {candidate.accuracy:.3f} < parent {parent.accuracy:.3f} - {tolerance}"
        )
        result.codes.append("accuracy")
    result.passed = not result.reasons
    return result
