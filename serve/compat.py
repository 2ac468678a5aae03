"""Can this adapter be hot-swapped into the model being served? Checked before every load.

The checks follow PEFT's own hot-swap preconditions: same base model, a LoRA adapter, a rank
within what the server prepared for, only target modules the server allows, finite weights, and
(when the caller knows them) the exact tensor shapes of its model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from registry.store import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

_MAX_NAMES_SHOWN = 5


def check_adapter(
    path: Path,
    *,
    base_model: str,
    allowed_target_modules: set[str],
    max_rank: int,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[str]:
    """Human-readable reasons why the adapter directory at `path` cannot be served; [] if it can.

    `allowed_target_modules` holds module leaf names (e.g. "q_proj"). `expected_shapes` maps
    tensor names exactly as stored in adapter_model.safetensors (PEFT's state-dict names without
    the adapter name, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") to
    their shapes; a stored tensor missing from it is reported too, as it has nowhere to go.
    """
    path = Path(path)
    reasons = _check_config(path / CONFIG_FILE, base_model, allowed_target_modules, max_rank)
    reasons += _check_weights(path / WEIGHTS_FILE, allowed_target_modules, max_rank, expected_shapes)
    if reasons:
        logger.info("adapter %s is not compatible: %s", path, "; ".join(reasons))
    return reasons


def _check_config(config_path: Path, base_model: str, allowed: set[str], max_rank: int) -> list[str]:
    if not config_path.is_file():
        return [f"{CONFIG_FILE} is missing"]
    try:
        config: Any = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{CONFIG_FILE} cannot be parsed: {e}"]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} is not a JSON object"]

    reasons = []
    if config.get("peft_type") != "LORA":
        reasons.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' can be served")
    if config.get("base_model_name_or_path") != base_model:
        reasons.append(f"trained on base model {config.get('base_model_name_or_path')!r}, but {base_model!r} is served")
    reasons += _check_ranks(config, max_rank)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        # PEFT reads a string as a regular expression, which cannot be checked against a set.
        reasons.append(f"target_modules is the pattern {targets!r}; only a list can be checked")
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        foreign = sorted(set(targets) - allowed)
        if foreign:
            reasons.append(f"target modules {foreign} are not among the allowed {sorted(allowed)}")
    else:
        reasons.append(f"target_modules {targets!r} is neither a list of names nor a pattern")
    if config.get("modules_to_save"):
        reasons.append(
            f"modules_to_save {config['modules_to_save']!r} replaces whole modules; "
            "only LoRA weights can be hot-swapped"
        )
    return reasons


def _check_ranks(config: dict[str, Any], max_rank: int) -> list[str]:
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return [f"rank r={rank!r} is not a positive integer"]
    ranks = {"r": rank}
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, dict):
        ranks.update({f"rank_pattern[{k!r}]": v for k, v in pattern.items() if isinstance(v, int)})
    return [f"{name}={value} exceeds the maximum rank {max_rank}" for name, value in ranks.items() if value > max_rank]


def _check_weights(
    weights_path: Path, allowed: set[str], max_rank: int, expected_shapes: dict[str, tuple[int, ...]] | None
) -> list[str]:
    if not weights_path.is_file():
        return [f"{WEIGHTS_FILE} is missing"]
    import torch  # lazy: opening a registry must not pull in torch
    from safetensors import safe_open

    reasons: list[str] = []
    not_lora: list[str] = []
    over_rank: list[str] = []
    non_finite: list[str] = []
    foreign: set[str] = set()
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safetensors' handle is not a dict
                tensor = f.get_tensor(name)
                module = _lora_module(name)
                if module is None:
                    not_lora.append(name)
                elif module not in allowed:
                    foreign.add(module)
                if _lora_rank(name, tensor.shape) > max_rank:
                    over_rank.append(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    non_finite.append(name)
                if expected_shapes is not None:
                    reasons += _shape_reason(name, tuple(tensor.shape), expected_shapes)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        return [*reasons, f"{WEIGHTS_FILE} cannot be read: {e}"]
    if not_lora:
        reasons.append(f"tensors that are not LoRA weights: {_names(not_lora)}")
    if foreign:
        reasons.append(f"weights target modules {sorted(foreign)} outside the allowed set")
    if over_rank:
        reasons.append(f"tensors with a rank over the maximum {max_rank}: {_names(over_rank)}")
    if non_finite:
        reasons.append(f"non-finite (NaN or inf) values in {_names(non_finite)}")
    return reasons


def _names(names: list[str]) -> str:
    more = len(names) - _MAX_NAMES_SHOWN
    return ", ".join(names[:_MAX_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _lora_module(name: str) -> str | None:
    """Leaf module name of a LoRA tensor, e.g. 'q_proj' for '….q_proj.lora_A.weight'."""
    head, sep, _ = name.partition(".lora_")
    if not sep:
        return None
    return head.rsplit(".", 1)[-1]


def _lora_rank(name: str, shape: Any) -> int:
    """The rank a LoRA factor carries: lora_A is (r, in, …), lora_B (out, r, …); else 0."""
    if len(shape) < 2:
        return 0
    if ".lora_A." in name:
        return int(shape[0])
    if ".lora_B." in name:
        return int(shape[1])
    return 0


def _shape_reason(name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]]) -> list[str]:
    if name not in expected:
        return [f"tensor {name} does not exist in the served model"]
    if tuple(expected[name]) != shape:
        return [f"tensor {name} has shape {list(shape)}, expected {list(expected[name])}"]
    return []
