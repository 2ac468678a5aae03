"""bench.memory's parameter counts, which its estimates rest on, are exact for every family."""

from __future__ import annotations

import pytest
import torch

from bench.memory import count
from foundation.models import lora_target_names
from testkit.model_families import FAMILIES, build_family_model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_counts_match_the_model_and_its_adapter(name, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_family_model(FAMILIES[name], tmp_path), dtype=torch.float32)
    counts = count(model.config, rank=4)
    assert counts.linear + counts.other == sum(p.numel() for p in model.parameters())
    config = LoraConfig(r=4, target_modules=lora_target_names(model), task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    assert counts.lora == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize(("mode", "checkpointing"), [("bfloat16 base", True), ("float32 base (default)", False)])
def test_the_gpu_measurement_runs_the_learners_update(mode, checkpointing, monkeypatch, tmp_path):
    """bench/memory_gpu.py on CPU and a tiny config: its steps run (the peak needs CUDA)."""
    import bench.memory
    from bench.memory_gpu import measure

    tiny = dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=600, tie_word_embeddings=False,
    )  # fmt: skip
    monkeypatch.setitem(bench.memory.CONFIGS, bench.memory.MEASURED, tiny)
    monkeypatch.setattr(bench.memory, "TOKENS", 16)
    monkeypatch.setenv("KTO_BENCH_SCRATCH", str(tmp_path))
    result = measure(mode, checkpointing, device="cpu")
    assert result["step_s"] > 0 and result["estimate_gib"] > 0 and result["peak_gib"] is None
