"""Next-token choice per row: greedy at temperature 0, else temperature + nucleus (top-p)."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, params: list[tuple[float, float, torch.Generator | None]]) -> list[int]:
    """One token per row of `logits` [B, V]; params[i] = (temperature, top_p, generator)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (temperature, top_p, generator) in enumerate(params):
        if temperature <= 0:
            tokens.append(greedy[row])
            continue
        probs = torch.softmax(logits[row] / temperature, dim=-1)
        if top_p < 1.0:
            probs = _nucleus(probs, top_p)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail beyond the smallest prefix whose mass reaches top_p (always keep one)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
