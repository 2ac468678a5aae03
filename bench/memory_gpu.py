"""One measured learner update step on an NVIDIA GPU, for bench.memory (in a fresh process each).

    python -m bench.memory_gpu MODE CHECKPOINTING      # MODE: a key of bench.memory.MODES; prints one JSON line

A 7B-class Llama with random weights, initialised on the GPU and saved once to a scratch
directory (`KTO_BENCH_SCRATCH`, default the temp dir; about 13 GiB), so that bitsandbytes
quantizes it on load as it would a model a user brings; then the learner's own load_base,
Policy and run_update on micro-batches of the learner's default size, and the CUDA allocator's
peak next to bench.memory's estimate. Written for a GPU session; not yet run (see docs/models.md).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def scratch_model(device: str = "cuda") -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from bench.memory import MEASURED, config_of
    from foundation.models import build_tokenizer

    path = Path(os.environ.get("KTO_BENCH_SCRATCH", tempfile.gettempdir())) / "kto-bench-llama-7b"
    if not (path / "config.json").exists():
        build_tokenizer(path)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            model = LlamaForCausalLM(config_of(MEASURED))
        model.save_pretrained(path)
        del model
        torch.set_default_dtype(torch.float32)
    return path


def measure(mode: str, checkpointing: bool, device: str = "cuda") -> dict:
    """One update step's peak memory (CUDA's allocator; None on another device, where this only
    checks that the script runs)."""
    import torch

    from bench.memory import MEASURED, MODES, TOKENS, GiB, config_of, count, estimate
    from learner.base_weights import load_base
    from learner.example import Example
    from learner.policy import Policy
    from learner.settings import LearnerSettings
    from learner.update import run_update

    path = scratch_model(device)
    cuda = device == "cuda"
    dtype, quantize = MODES[mode]
    settings = LearnerSettings(
        data_dir=path / "data",
        model=str(path),
        base_dtype=dtype,
        quantize=quantize,
        gradient_checkpointing=checkpointing,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    policy = Policy(load_base(path, settings, torch.device(device)), settings)
    rng = random.Random(0)
    vocab = len(policy.loaded.tokenizer)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    batch = []
    for i in range(settings.micro_batch):
        e = Example(
            f"r{i}", "u", ids(TOKENS // 2), ids(TOKENS // 2), i % 2 == 0, f"e{i}", 0.0, None, i, -50.0, None, -50.0, 0
        )
        e.kl_partner, e.kl_partner_completion_ids = f"r{i - 1}", ids(TOKENS // 2)
        batch.append(e)
    optimizer = torch.optim.AdamW(policy.trainable().values(), lr=1e-4)
    steps = []
    for _ in range(3):  # the first step allocates AdamW's moments; the peak is the same after it
        started = time.perf_counter()
        run_update(
            policy, optimizer, [batch], beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, max_grad_norm=1.0
        )
        if cuda:
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - started)
    guess = estimate(count(config_of(MEASURED)), base_dtype=dtype, quantize=quantize, checkpointing=checkpointing)
    return {
        "model": MEASURED,
        "mode": mode,
        "checkpointing": checkpointing,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "estimate_gib": guess["total"] / GiB,
        "step_s": min(steps[1:]),
        "micro_batch": settings.micro_batch,
        "tokens": TOKENS,
        "device": torch.cuda.get_device_name(0) if cuda else device,
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2] == "1")))
