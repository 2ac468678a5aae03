"""Fixtures for the registry tests: tiny real PEFT adapters and fresh registries."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry import SqliteRegistry, open_registry

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
    model.save_pretrained(out, save_embedding_layers=False)


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per argument set) a PEFT adapter directory and return a fresh copy of it."""
    cache: dict[tuple, Path] = {}

    def make(
        *, r: int = 4, targets: tuple[str, ...] = TARGETS, hidden: int = 32, seed: int = 0
    ) -> Path:
        key = (r, targets, hidden, seed)
        if key not in cache:
            built = tmp_path_factory.mktemp("adapter-built")
            _build_adapter(built, r=r, targets=targets, hidden=hidden, seed=seed)
            cache[key] = built
        copy = tmp_path_factory.mktemp("adapter")
        shutil.copytree(cache[key], copy, dirs_exist_ok=True)
        return copy

    return make


@pytest.fixture
def base_model() -> str:
    """The base_model_name_or_path every test adapter records."""
    return BASE_MODEL


@pytest.fixture
def adapter_dir(make_adapter: Callable[..., Path]) -> Path:
    """A writable copy of the default adapter (r=4 on q_proj and v_proj)."""
    return make_adapter()


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'registry.sqlite3'}"


@pytest.fixture
def reg(registry_url: str) -> Iterator[SqliteRegistry]:
    registry = open_registry(registry_url)
    assert isinstance(registry, SqliteRegistry)
    yield registry
    registry.close()


@pytest.fixture
def publish(reg: SqliteRegistry, adapter_dir: Path) -> Callable[..., str]:
    """Publish the default adapter with small defaults; returns the new version's name."""

    def _publish(parent: str | None = None, **overrides) -> str:
        kwargs = {"base_model": BASE_MODEL, "parent": parent, "metrics": {}, "lineage": {}}
        kwargs.update(overrides)
        return reg.publish(adapter_dir, **kwargs).version

    return _publish
