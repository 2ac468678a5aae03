"""Next-token choice per row: greedy at temperature 0, else temperature + nucleus (top-p).

Every sampled row draws by the Gumbel-max trick: argmax(log p + g), g = -log(-log u), u uniform,
which picks token i with probability p_i exactly. It turns sampling into arithmetic that runs on
the whole batch at once, so a step costs one device sync however many rows it has. A seeded row
takes its uniforms from its own generator (one launch, no sync), so its tokens depend only on its
seed and its own logits, never on which other requests share the batch; unseeded rows share one
draw from the global generator.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, params: list[tuple[float, float, torch.Generator | None]]) -> list[int]:
    """One token per row of `logits` [B, V]; params[i] = (temperature, top_p, generator)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, (t, _, _) in enumerate(params) if t > 0]
    if sampled:
        device, vocab = logits.device, logits.shape[1]
        rows = torch.tensor(sampled, device=device)
        temperature = torch.tensor([params[r][0] for r in sampled], device=device)
        logp = torch.log_softmax(logits[rows] / temperature[:, None], dim=-1)
        if any(params[r][1] < 1.0 for r in sampled):  # a sort of the vocabulary per row: only when asked
            logp = nucleus(logp.exp(), torch.tensor([params[r][1] for r in sampled], device=device)).log()
        uniform = torch.empty((len(sampled), vocab), device=device)
        shared = [i for i, r in enumerate(sampled) if params[r][2] is None]
        if shared:
            uniform[shared] = torch.rand((len(shared), vocab), device=device)
        for i, row in enumerate(sampled):
            if params[row][2] is not None:
                uniform[i] = torch.rand(vocab, device=device, generator=params[row][2])
        gumbel = -torch.log(-torch.log(uniform))  # u = 0 gives -inf: never chosen
        tokens[rows] = (logp + gumbel).argmax(dim=-1)
    return tokens.tolist()


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` [B, V], zero the tail beyond the smallest prefix whose mass reaches
    top_p[row] (the most likely token always stays). Rows with top_p >= 1 are left whole."""
    top_p = top_p.to(probs.device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
