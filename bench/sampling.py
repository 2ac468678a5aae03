"""Sampling one token per row for a batch of seeded requests (the serving benchmark seeds every
request): serve.sampling.sample_next against the named baseline, the per-row draw it replaced
(each seeded row alone: softmax, nucleus sort, multinomial with its generator, one device sync
per row). Temperature 1.0, top_p 1.0 (as the throughput benchmark asks); µs per step, best of
repeats; ratio baseline / sample_next in the same run. On CUDA when there is one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench import report
from serve.sampling import nucleus, sample_next

BATCHES = (1, 16, 64)
VOCABS = (512, 32_000)


def per_row_baseline(logits: torch.Tensor, params) -> list[int]:
    """The old seeded path: every row on its own, with a sync per row."""
    logits = logits.float()
    tokens = []
    for row, (temperature, top_p, generator) in enumerate(params):
        probs = nucleus(torch.softmax(logits[row : row + 1] / temperature, dim=-1), torch.tensor([top_p]))
        tokens.append(int(torch.multinomial(probs[0], 1, generator=generator)))
    return tokens


def time_per_call(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def run(options) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = 20 if options.quick else 100
    rows, results = [], []
    for vocab in VOCABS:
        for batch in BATCHES:
            logits = torch.randn(batch, vocab, device=device)
            generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
            params = [(1.0, 1.0, g) for g in generators]
            base = time_per_call(lambda logits=logits, params=params: per_row_baseline(logits, params), calls)
            ours = time_per_call(lambda logits=logits, params=params: sample_next(logits, params), calls)
            results.append(
                {
                    "vocab": vocab,
                    "rows": batch,
                    "per_row_us": base * 1e6,
                    "batched_us": ours * 1e6,
                    "speedup": report.ratio(base, ours),
                }
            )
            rows.append([vocab, batch, base * 1e6, ours * 1e6, report.ratio(base, ours)])
    print(
        report.table(
            f"Seeded sampling, µs per step on {device.type} (best of 3 × {calls} calls)",
            ["vocab", "rows", "per-row draws [baseline]", "sample_next (batched)", "speedup ×"],
            rows,
        )
    )
    return report.save_suite("sampling", options, "per-row seeded draws, one sync per row", results, device.type)
