"""Next-token choice per row: greedy at temperature 0, else temperature + nucleus (top-p).

Unseeded rows are sampled together in one batched draw (one device sync per step, however
many rows). A seeded row draws from its own generator, alone, so that its tokens depend only
on its seed and its own logits, never on which other requests share the batch.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, params: list[tuple[float, float, torch.Generator | None]]) -> list[int]:
    """One token per row of `logits` [B, V]; params[i] = (temperature, top_p, generator)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    batched = [row for row, (t, _, g) in enumerate(params) if t > 0 and g is None]
    if batched:
        rows = torch.tensor(batched, device=logits.device)
        temperature = torch.tensor([params[r][0] for r in batched], device=logits.device)
        probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)
        if any(params[r][1] < 1.0 for r in batched):  # a sort of the vocabulary per row: only when asked
            probs = nucleus(probs, torch.tensor([params[r][1] for r in batched], device=logits.device))
        for row, token in zip(batched, torch.multinomial(probs, 1).squeeze(1).tolist()):
            tokens[row] = token
    for row, (temperature, top_p, generator) in enumerate(params):
        if temperature > 0 and generator is not None:
            probs = nucleus(torch.softmax(logits[row : row + 1] / temperature, dim=-1), torch.tensor([top_p]))
            tokens[row] = int(torch.multinomial(probs[0], 1, generator=generator))
    return tokens


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` [B, V], zero the tail beyond the smallest prefix whose mass reaches
    top_p[row] (the most likely token always stays). Rows with top_p >= 1 are left whole."""
    top_p = top_p.to(probs.device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
