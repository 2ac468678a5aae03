"""The learner's memory modes: a bfloat16 base, gradient checkpointing, and quantization refused
clearly where it cannot run (no NVIDIA GPU here; the GPU measurement is bench/qlora_memory.py)."""

from __future__ import annotations

import pytest
import torch

from foundation.models import ModelRefused
from learner.base_weights import load_base
from learner.policy import Policy
from tests.learner.conftest import quick_learner

CPU = torch.device("cpu")
PAIRS = [([1, 5, 9, 12], [20, 21, 22]), ([1, 7], [30, 31, 32, 33, 2])]


def gradients(policy: Policy) -> dict[str, torch.Tensor]:
    policy.model.zero_grad()
    policy.logps(PAIRS).sum().backward()
    return {name: p.grad.clone() for name, p in policy.trainable().items() if p.grad is not None}


def test_a_bfloat16_base_trains_a_float32_adapter(tmp_path, tiny_model_dir):
    settings = quick_learner(tmp_path, tiny_model_dir, base_dtype="bfloat16")
    policy = Policy(load_base(tiny_model_dir, settings, CPU), settings)
    frozen = [p for p in policy.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    grads = gradients(policy)
    assert grads and all(p.dtype == torch.float32 for p in policy.trainable().values())
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(tmp_path, tiny_model_dir):
    def run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        settings = quick_learner(tmp_path, tiny_model_dir, gradient_checkpointing=checkpointing)
        policy = Policy(load_base(tiny_model_dir, settings, CPU), settings)
        attention = next(m for name, m in policy.model.named_modules() if name.endswith("layers.0.self_attn"))
        calls = []
        hook = attention.register_forward_hook(lambda *_: calls.append(1))
        grads = gradients(policy)
        hook.remove()
        assert not attention.training  # dropout stays off: only the layer itself is in training mode
        return grads, len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the backward ran the attention again
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantizing_without_an_nvidia_gpu_is_refused_with_what_to_do(bits, tmp_path, tiny_model_dir):
    settings = quick_learner(tmp_path, tiny_model_dir, quantize=bits)
    with pytest.raises(ModelRefused, match=f"KTO_QUANTIZE={bits} needs an NVIDIA GPU.*KTO_BASE_DTYPE=bfloat16"):
        load_base(tiny_model_dir, settings, CPU)
