"""Fixtures shared by every package's tests: tiny models built locally, never downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tests.tiny import TINY_MODEL_ID  # noqa: E402 - after the environment it reads is set

STOCHASTIC_KEYWORDS = ("failure_rate", "why")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stochastic(failure_rate, why): random by nature, fails now and then though nothing is wrong; "
        'both keywords required: failure_rate="about 1 in N" (or "not measured"), why="…"',
    )


class MarkedItem(Protocol):
    """What the hook below reads of a collected item (test_markers.py passes stand-ins)."""

    @property
    def nodeid(self) -> str: ...

    def iter_markers(self, name: str) -> Iterable[pytest.Mark]: ...


def pytest_collection_modifyitems(config: pytest.Config | None, items: Sequence[MarkedItem]) -> None:
    """A `stochastic` mark must say how often the test fails by chance and why: collection fails otherwise."""
    wrong = []
    for item in items:
        for mark in item.iter_markers("stochastic"):
            given = {k: v for k, v in mark.kwargs.items() if isinstance(v, str) and v.strip()}
            if mark.args or set(mark.kwargs) != set(STOCHASTIC_KEYWORDS) or len(given) != len(STOCHASTIC_KEYWORDS):
                wrong.append(f"{item.nodeid}: {mark}")
    if wrong:
        raise pytest.UsageError(
            "@pytest.mark.stochastic needs exactly the keywords failure_rate and why, "
            "each a non-empty string:\n" + "\n".join(wrong)
        )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from foundation.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_heads=2)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh copy in memory per test: serving wraps it with PEFT, so tests must not share it."""
    from foundation.models import load_model

    return load_model(tiny_model_dir, model_id=TINY_MODEL_ID)


def set_base_model(adapter_dir: Path, base_model: str) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config))


@pytest.fixture(scope="session")
def make_adapter(tiny_model_dir, tmp_path_factory):
    """make_adapter(seed, r=4, target_modules=..., base_model=TINY_MODEL_ID) -> a PEFT adapter dir."""
    from peft import LoraConfig, get_peft_model

    from foundation.models import load_model

    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(seed: int, r: int = 4, target_modules=("q_proj", "v_proj"), base_model: str = TINY_MODEL_ID) -> Path:
        key = (seed, r, tuple(target_modules), base_model)
        if key not in made:
            torch.manual_seed(seed)
            base = load_model(tiny_model_dir).model
            # init_lora_weights=False: random A and B, so each adapter visibly changes the output
            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False)
            model = get_peft_model(base, config)
            path = root / f"adapter-{len(made)}"
            model.save_pretrained(path)
            set_base_model(path, base_model)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Kafka and redis-server for this session, by the project's script (see tests/services.py)."""
    from tests.services import session_services

    yield from session_services(tmp_path_factory.mktemp("services"))
