"""Tiny real PEFT adapters for the registry's and the hot-swap checks' tests: a two-layer Llama
made here, a LoRA on it with random A and B, saved as PEFT saves it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

BASE_MODEL = "kto-loop/tiny-llama-test"
TARGETS = ("q_proj", "v_proj")


def _build_adapter(out: Path, *, r: int, targets: tuple[str, ...], hidden: int, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        # init_lora_weights=False: random B as well, so two adapters never share bytes.
        LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False),
    )
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL
    # save_embedding_layers=False: otherwise PEFT looks the base model up on the Hub.
    model.save_pretrained(str(out), save_embedding_layers=False)


def adapter_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per argument set) a PEFT adapter directory and return a fresh copy of it."""
    cache: dict[tuple, Path] = {}

    def make(*, r: int = 4, targets: tuple[str, ...] = TARGETS, hidden: int = 32, seed: int = 0) -> Path:
        key = (r, targets, hidden, seed)
        if key not in cache:
            built = tmp_path_factory.mktemp("adapter-built")
            _build_adapter(built, r=r, targets=targets, hidden=hidden, seed=seed)
            cache[key] = built
        copy = tmp_path_factory.mktemp("adapter")
        shutil.copytree(cache[key], copy, dirs_exist_ok=True)
        return copy

    return make
