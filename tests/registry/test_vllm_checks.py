"""registry.vllm_checks: each of vLLM's adapter checks passes a plain PEFT LoRA and names what it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.vllm_checks import vllm_reasons


@pytest.fixture
def adapter(make_adapter):
    """A fresh copy of a plain PEFT LoRA (r=4 on q_proj and v_proj) that a test may change."""
    return make_adapter()


def edit_config(path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def add_tensor(path, name: str) -> None:
    weights = load_file(path / "adapter_model.safetensors")
    save_file({**weights, name: torch.zeros(4, 4)}, path / "adapter_model.safetensors")


def test_a_plain_peft_lora_passes(adapter):
    assert vllm_reasons(adapter) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias is 'lora_only'"),
        ({"r": 32}, "rank 32 is above vLLM's --max-lora-rank 16"),
        ({"rank_pattern": {"q_proj": 64}}, "rank 64"),
    ],
)
def test_each_config_check_names_what_vllm_refuses(adapter, changes, reason):
    edit_config(adapter, **changes)
    [found] = vllm_reasons(adapter)
    assert reason in found


def test_a_missing_required_field_is_named(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_reasons(adapter) == ["adapter_config.json has no lora_alpha"]


def test_a_raised_max_rank_admits_a_larger_rank(adapter):
    edit_config(adapter, r=32)
    assert vllm_reasons(adapter, max_lora_rank=64) == []


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("base_model.model.model.layers.0.mlp.down_proj.weight", "not a LoRA factor"),
        ("base_model.model.lm_head.lora_A.weight", "extra vocabulary"),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", "not among target_modules"),
    ],
)
def test_each_tensor_check_names_the_tensor(adapter, name, reason):
    add_tensor(adapter, name)
    [found] = vllm_reasons(adapter)
    assert name in found and reason in found
