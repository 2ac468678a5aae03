"""The KTO loss as pure functions on tensors: no model, no I/O.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306), eq. (7), in the form TRL's `KTOTrainer` implements (`loss_type="kto"`):

    r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x)                       (implied reward / β)
    z0        = max(0, mean_j [log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j)])   (no gradient)
    v(x, y)   = λ_D · σ(β (r_θ(x, y) − z0))   if y is desirable
                λ_U · σ(β (z0 − r_θ(x, y)))   if y is undesirable
    L         = mean over the batch of (λ_y − v(x, y))

TRL (and this module) drop the constant λ_y and write each term as λ_y · (1 − σ(·)), which has
the same gradient. z0 is estimated from mismatched pairs (prompt i with the completion of another
row) in the same micro-batch, as the paper and TRL do.

Log-probs here are sequence-level: the sum over completion tokens of each token's log-prob,
as produced by `sequence_logps`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Completion positions scored per chunk in `sequence_logps`: bounds the float32 copy of the
# logits to about this many elements (256 MiB), whatever the batch and vocabulary.
_CHUNK_ELEMENTS = 1 << 26


class KTOLoss(NamedTuple):
    """What `kto_loss` returns; unpacks as `loss, losses, kl = kto_loss(...)`."""

    loss: torch.Tensor
    """Scalar: mean of `losses` over the batch; differentiable w.r.t. `policy_logps`."""
    losses: torch.Tensor
    """[B]: each example's weighted loss, λ_D·(1−σ(β(r−z0))) or λ_U·(1−σ(β(z0−r)))."""
    kl: torch.Tensor
    """Scalar: the reference point z0, detached, ≥ 0."""


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    example_weights: torch.Tensor | None = None,
) -> KTOLoss:
    """KTO loss (paper eq. 7) on a mixed batch of desirable and undesirable examples.

    Args:
        policy_logps: [B] log π_θ(y_i|x_i), summed over completion tokens; carries the gradient.
        ref_logps: [B] log π_ref(y_i|x_i), same sums under the reference (adapter disabled).
        kl_policy_logps: [B] log π_θ(y'_i|x_i) for mismatched pairs (prompt i, another row's
            completion). Used only through z0, so its gradient is ignored.
        kl_ref_logps: [B] the same mismatched pairs under the reference.
        desirable: [B] bool, True for thumbs-up (any dtype is read as bool).
        beta: β, the KL-penalty strength of the implied reward.
        desirable_weight: λ_D, multiplies the loss of each desirable example.
        undesirable_weight: λ_U, multiplies the loss of each undesirable example.
        example_weights: [B] or None: each example's own multiplier on top of λ (the weight of
            its label's source); None weighs every example 1.

    Returns:
        `KTOLoss(loss, losses, kl)`.

    Averaging matches TRL 1.16's `KTOTrainer`, which concatenates λ_D·chosen and λ_U·rejected
    losses and takes their mean: the loss is divided by the batch size B, not by the sum of the
    weights, so raising a weight raises the loss scale as well as the class balance. Unlike
    TRL's `nanmean`, a plain mean is used so that a NaN log-prob surfaces in the loss (the
    promotion gate rejects NaNs) instead of silently dropping that example.

    A one-class batch needs no special case: every example takes its own branch and nothing is
    divided by a class count. B = 1 works too (z0 then comes from a single pair).
    """
    if policy_logps.dim() != 1 or policy_logps.numel() == 0:
        raise ValueError(f"policy_logps must have shape [B] with B ≥ 1, got {tuple(policy_logps.shape)}")
    shape = policy_logps.shape
    for name, t in (
        ("ref_logps", ref_logps),
        ("kl_policy_logps", kl_policy_logps),
        ("kl_ref_logps", kl_ref_logps),
        ("desirable", desirable),
        *([("example_weights", example_weights)] if example_weights is not None else []),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)

    # z0: the batch mean of the mismatched log-ratios, a constant for the gradient, floored at 0
    # (TRL: `(KL_logps - ref_KL_logps).mean().detach()`, gathered across ranks, `.clamp(min=0)`).
    kl = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)

    logratios = policy_logps - ref_logps
    # Both branches are finite for finite inputs, so `where` cannot leak a NaN gradient.
    chosen = desirable_weight * (1 - F.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - F.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen, rejected)
    if example_weights is not None:
        losses = losses * example_weights.to(device=losses.device, dtype=losses.dtype)
    return KTOLoss(losses.mean(), losses, kl)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """β·(log π_θ − log π_ref) per example, detached: TRL's `rewards/chosen|rejected` metric.

    The gate's held-out accuracy is the share of examples whose reward sign matches the label.
    """
    return beta * (policy_logps - ref_logps).detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens of log p(token), in float32; shape [B].

    Convention (the same as TRL's collator and fused LM head): `logits`, `labels` and `loss_mask`
    are aligned on the input sequence — `logits` is the model output for `input_ids` [B, T, V],
    `labels` is usually `input_ids` itself [B, T] and `loss_mask` [B, T] is 1 on the completion
    tokens of `labels` and 0 on the prompt and padding. The logits at position t predict the
    token at t+1, so the result is

        out[b] = Σ_{t=1}^{T-1} loss_mask[b, t] · log_softmax(logits[b, t-1])[labels[b, t]].

    Position 0 has no prediction, so `loss_mask[:, 0]` must be 0 (a completion needs a prompt).

    Only masked-in positions are scored, in chunks upcast to float32, so the float32 copy of the
    logits stays bounded even when the model runs in bf16 with a large vocabulary.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels, loss_mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    if mask[:, 0].any():
        raise ValueError("loss_mask[:, 0] is set: the first token has no logits predicting it")
    mask = mask[:, 1:]
    targets = labels[:, 1:][mask]
    if (targets < 0).any():
        raise ValueError("a masked-in label is negative (e.g. -100): loss_mask must mark real tokens only")
    picked = logits[:, :-1][mask]  # [N, V]: only completion positions, still in the model's dtype

    rows = max(1, _CHUNK_ELEMENTS // max(1, logits.size(-1)))
    token_logps = [_token_logps(picked[i : i + rows], targets[i : i + rows]) for i in range(0, picked.size(0), rows)]
    flat = torch.cat(token_logps) if token_logps else picked.new_zeros(0, dtype=torch.float32)
    # Scatter back to [B, T-1] (zeros elsewhere) and sum rows, as TRL does: rows with no
    # completion token get 0, and the result stays connected to `logits` for backward.
    per_token = flat.new_zeros(mask.shape).masked_scatter(mask, flat)
    return per_token.sum(-1)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] per row, in float32, without a full log_softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def paper_weights(n_desirable: int, n_undesirable: int, *, lo: float = 1.0, hi: float = 4 / 3) -> tuple[float, float]:
    """(λ_D, λ_U) with λ_D·n_D / (λ_U·n_U) in [lo, hi]: the KTO paper's rule (eq. 8, as TRL cites it).

    The defaults (1.0, 1.0) are kept whenever the live label ratio n_D/n_U already lies in the
    band. Otherwise the under-weighted class is raised just enough to reach the nearest edge of
    the band and the other weight stays 1.0:
      - too few desirables (n_D/n_U < lo): λ_D = lo·n_U/n_D, λ_U = 1 (ratio = lo);
      - too few undesirables (n_D/n_U > hi): λ_U = n_D/(hi·n_U), λ_D = 1 (ratio = hi).
    Up-weighting the minority with the majority at 1.0 is what TRL's imbalance warning suggests
    (it names a range for one weight with the other kept, "but NOT BOTH").
    Lowering the majority weight instead would also satisfy the band, but it shrinks the loss
    (the mean is over B, not over the weights), acting like a smaller learning rate.

    If either count is zero the ratio is undefined and only one class is present, so the weight
    of the missing class has no effect: (1.0, 1.0) is returned.
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"label counts must be ≥ 0, got {n_desirable}, {n_undesirable}")
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"need 0 < lo ≤ hi < inf, got lo={lo}, hi={hi}")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < lo:
        return lo / ratio, 1.0
    if ratio > hi:
        return 1.0, ratio / hi
    return 1.0, 1.0
