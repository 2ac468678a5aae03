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
