"""check_adapter: every reason an adapter cannot be hot-swapped into the served model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.compat import check_adapter
from tests import lora_adapters

ALLOWED = {"q_proj", "k_proj", "v_proj", "o_proj"}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def make_adapter(tmp_path_factory: pytest.TempPathFactory):
    return lora_adapters.adapter_factory(tmp_path_factory)


@pytest.fixture
def base_model() -> str:
    return lora_adapters.BASE_MODEL


@pytest.fixture
def adapter_dir(make_adapter) -> Path:
    return make_adapter()


def _check(path: Path, base_model: str, **overrides) -> list[str]:
    kwargs: dict[str, Any] = {"base_model": base_model, "allowed_target_modules": ALLOWED, "max_rank": 8}
    kwargs.update(overrides)
    return check_adapter(path, **kwargs)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(path / WEIGHTS).items()}


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def test_compatible_adapter_passes(adapter_dir, base_model):
    assert _check(adapter_dir, base_model) == []
    assert _check(adapter_dir, base_model, expected_shapes=_shapes(adapter_dir)) == []


def test_wrong_base_model(adapter_dir, base_model):
    reasons = _check(adapter_dir, "someone/else")
    assert len(reasons) == 1 and "base model" in reasons[0] and base_model in reasons[0]


def test_rank_too_high(make_adapter, base_model):
    reasons = _check(make_adapter(r=16), base_model)
    assert any("r=16" in r for r in reasons)
    assert any("rank over the maximum 8" in r for r in reasons)  # the tensors agree


def test_rank_pattern_too_high(adapter_dir, base_model):
    _edit_config(adapter_dir, rank_pattern={"v_proj": 32})
    assert any("rank_pattern" in r for r in _check(adapter_dir, base_model))


def test_foreign_target_module(make_adapter, base_model):
    reasons = _check(make_adapter(targets=("q_proj", "gate_proj")), base_model)
    assert any("gate_proj" in r and "allowed" in r for r in reasons)


def test_pattern_target_modules_cannot_be_checked(adapter_dir, base_model):
    _edit_config(adapter_dir, target_modules=".*proj")
    assert any("pattern" in r for r in _check(adapter_dir, base_model))


def test_not_lora(adapter_dir, base_model):
    _edit_config(adapter_dir, peft_type="IA3")
    assert any("peft_type" in r for r in _check(adapter_dir, base_model))


def test_modules_to_save(adapter_dir, base_model):
    _edit_config(adapter_dir, modules_to_save=["lm_head"])
    assert any("modules_to_save" in r for r in _check(adapter_dir, base_model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(adapter_dir, base_model, bad):
    def poison(tensors):
        name = sorted(tensors)[0]
        tensors[name][0, 0] = bad

    _edit_weights(adapter_dir, poison)
    reasons = _check(adapter_dir, base_model)
    assert len(reasons) == 1 and "non-finite" in reasons[0]


def test_non_finite_bf16_weights(adapter_dir, base_model):
    def poison(tensors):
        for name in tensors:
            tensors[name] = tensors[name].to(torch.bfloat16)
        tensors[sorted(tensors)[-1]][0, 0] = float("nan")

    _edit_weights(adapter_dir, poison)
    assert any("non-finite" in r for r in _check(adapter_dir, base_model))


def test_wrong_shape(make_adapter, base_model):
    expected = _shapes(make_adapter(hidden=48))  # the model being served is wider
    reasons = _check(make_adapter(hidden=32), base_model, expected_shapes=expected)
    assert reasons and all("shape" in r for r in reasons)


def test_tensor_unknown_to_model(adapter_dir, base_model):
    expected = _shapes(adapter_dir)
    dropped = sorted(expected)[0]
    del expected[dropped]
    reasons = _check(adapter_dir, base_model, expected_shapes=expected)
    assert reasons == [f"tensor {dropped} does not exist in the served model"]


def test_non_lora_tensor(adapter_dir, base_model):
    extra = {"base_model.model.lm_head.weight": torch.zeros(2, 2)}
    _edit_weights(adapter_dir, lambda t: t.update(extra))
    assert any("not LoRA weights" in r for r in _check(adapter_dir, base_model))


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
def test_missing_file(adapter_dir, base_model, missing):
    (adapter_dir / missing).unlink()
    reasons = _check(adapter_dir, base_model)
    assert any(missing in r and "missing" in r for r in reasons)


def test_unparseable_config(adapter_dir, base_model):
    (adapter_dir / CONFIG).write_text("{oops")
    assert any("cannot be parsed" in r for r in _check(adapter_dir, base_model))


def test_unreadable_weights(adapter_dir, base_model):
    (adapter_dir / WEIGHTS).write_bytes(b"\x00" * 64)
    reasons = _check(adapter_dir, base_model)
    assert len(reasons) == 1 and "cannot be read" in reasons[0]
