"""The learner's memory per mode for 1B, 8B and 70B bases: estimated from each model's config,
and measured on an NVIDIA GPU for a randomly initialised 7B-class model (no weights download).

    .venv/bin/python -m bench --only memory      # the estimates (seconds, on CPU); on a GPU also measured

One optimizer step of `micro_batch` sequences of `tokens` holds, with the compute in bfloat16 as
the learner's CUDA path runs it:

- weights: every parameter at the mode's width: float32 4 bytes, bfloat16 2; quantized, the
  linear layers at 1 byte (8-bit, LLM.int8) or 0.516 (4-bit NF4 with double quantization: 4
  bits plus 0.127 of constants, Dettmers et al. 2023), everything else in bfloat16;
- the adapter: LoRA's parameters (r x (in + out) per adapted layer) at 16 bytes: the float32
  weight, its gradient, and AdamW's two moments;
- activations kept for the backward, per token and layer about 10 h + 3 i values (h the hidden
  size, i the MLP's: the norms' inputs, q, k, v, the attention's output, the MLP's gate, up and
  their product); with gradient checkpointing only each layer's input (h) plus one layer's set;
- the logits and their gradient: 2 x tokens x vocabulary values per sequence.

Not counted: the CUDA context and allocator slack (about 0.5-1 GiB) and attention scores (the
SDPA kernels do not store them). The parameter counts are exact (the model built on the meta
device); the activation figure is an estimate, which the measured rows check.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report

logger = logging.getLogger(__name__)

GiB = 2**30
RANK, MICRO_BATCH, TOKENS = 8, 16, 512  # the learner's defaults; 512 tokens of prompt and answer


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, **extra: Any) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        **extra,
    )


LLAMA3 = dict(rope_theta=500000.0, max_position_embeddings=131072)
CONFIGS: dict[str, dict[str, Any]] = {  # the published configs' sizes
    "Llama 3.2 1B": _llama(2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_word_embeddings=True, **LLAMA3),
    "Llama 3.1 8B": _llama(4096, 14336, 32, 32, 8, 128256, head_dim=128, tie_word_embeddings=False, **LLAMA3),
    "Llama 3.1 70B": _llama(8192, 28672, 80, 64, 8, 128256, head_dim=128, tie_word_embeddings=False, **LLAMA3),
}
MEASURED = "Llama 2 7B"  # measured on a GPU: random weights, a 7B-class config
CONFIGS[MEASURED] = _llama(4096, 11008, 32, 32, 32, 32000, tie_word_embeddings=False)
MODES = {  # name -> (KTO_BASE_DTYPE, KTO_QUANTIZE)
    "float32 base (default)": ("float32", "none"),
    "bfloat16 base": ("bfloat16", "none"),
    "8-bit base": ("bfloat16", "8bit"),
    "4-bit base (QLoRA)": ("bfloat16", "4bit"),
}
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": (4 + 0.127) / 8}


@dataclass(frozen=True)
class Counts:
    """A model's parameters as the learner's memory sees them."""

    linear: int  # in the linear layers bitsandbytes quantizes (all but the output head)
    other: int  # embeddings, norms, the output head
    lora: int  # the adapter's, LoRA on every linear layer but the head
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def count(config, rank: int = RANK) -> Counts:
    """Exact counts, from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and not name.endswith("lm_head"):
            linear += module.weight.numel()
            lora += rank * sum(module.weight.shape)
    total = sum(p.numel() for p in model.parameters())
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return Counts(linear, total - linear, lora, hidden, intermediate, config.num_hidden_layers, config.vocab_size)


def estimate(
    counts: Counts,
    *,
    base_dtype: str,
    quantize: str,
    checkpointing: bool,
    batch: int = MICRO_BATCH,
    tokens: int = TOKENS,
) -> dict[str, float]:
    """Bytes of one update's step, by part (the module's docstring says how)."""
    if quantize != "none":
        weights = counts.linear * QUANTIZED_BYTES[quantize] + counts.other * 2
    else:
        weights = (counts.linear + counts.other) * (4 if base_dtype == "float32" else 2)
    per_layer = batch * tokens * (10 * counts.hidden + 3 * counts.intermediate) * 2
    if checkpointing:
        activations = counts.layers * batch * tokens * counts.hidden * 2 + per_layer
    else:
        activations = counts.layers * per_layer
    parts = {
        "weights": weights,
        "adapter": counts.lora * 16,
        "activations": activations,
        "logits": 2 * batch * tokens * counts.vocab * 2,
    }
    return {**parts, "total": sum(parts.values())}


def config_of(name: str):
    from transformers import AutoConfig

    fields = dict(CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def run(options) -> Path:
    import torch

    rows, results = [], []
    for name in CONFIGS:
        counts = count(config_of(name))
        for mode, (dtype, quantize) in MODES.items():
            plain = estimate(counts, base_dtype=dtype, quantize=quantize, checkpointing=False)
            checkpointed = estimate(counts, base_dtype=dtype, quantize=quantize, checkpointing=True)
            results.append(
                {"model": name, "mode": mode, "counts": vars(counts), "plain": plain, "checkpointed": checkpointed}
            )
            rows.append(
                [
                    name,
                    mode,
                    plain["weights"] / GiB,
                    plain["adapter"] / GiB,
                    plain["total"] / GiB,
                    checkpointed["total"] / GiB,
                ]
            )
    print(
        report.table(
            f"Learner memory per update step, estimated (GiB; LoRA r{RANK} on every linear layer, micro-batch "
            f"{MICRO_BATCH} x {TOKENS} tokens, bf16 compute)",
            ["model", "mode", "weights", "adapter+AdamW", "total", "total, checkpointing"],
            rows,
        )
    )
    measured = _measure_all() if torch.cuda.is_available() else []
    if not measured:
        print("\nmeasured: no NVIDIA GPU here; run this suite on one to measure the 7B-class rows")
    payload = {"suite": "memory", "rank": RANK, "micro_batch": MICRO_BATCH, "tokens": TOKENS}
    payload |= {"estimates": results, "measured": measured}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload["machine"] = report.machine_info(device, "bfloat16 compute")
    return report.write_json(f"memory-{device}", payload, options.results_dir)


def _measure_all() -> list[dict[str, Any]]:
    """Each measured mode in a fresh process, so one's CUDA memory does not count in the next's peak."""
    import json

    out = []
    for mode in ("bfloat16 base", "4-bit base (QLoRA)"):
        for checkpointing in (False, True):
            command = [sys.executable, "-m", "bench.memory_gpu", mode, str(int(checkpointing))]
            done = subprocess.run(command, cwd=report.REPO_ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                out.append({"mode": mode, "checkpointing": checkpointing, "error": done.stderr[-2000:]})
                continue
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [
        [m["mode"], m["checkpointing"], m.get("peak_gib", "failed"), m.get("estimate_gib", ""), m.get("step_s", "")]
        for m in out
    ]
    print(
        report.table(
            f"{MEASURED} (random weights), one update step, measured",
            ["mode", "checkpointing", "peak GiB", "estimate GiB", "s/step"],
            rows,
        )
    )
    return out
