"""Fixtures for the registry tests: tiny real PEFT adapters and fresh registries.

The contract tests run on every backend: `backend` is "sqlite" (the embedded registry in
tmp_path) or "redis" (the session's redis-server, under a key prefix of the test's own, with
adapter files in tmp_path), and `registry_url`, `adapter_root`, `open_reg` and `reg` follow it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import Registry, open_registry
from tests import lora_adapters

BASE_MODEL, TARGETS = lora_adapters.BASE_MODEL, lora_adapters.TARGETS


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per argument set) a PEFT adapter directory and return a fresh copy of it."""
    return lora_adapters.adapter_factory(tmp_path_factory)


@pytest.fixture
def base_model() -> str:
    """The base_model_name_or_path every test adapter records."""
    return BASE_MODEL


@pytest.fixture
def adapter_dir(make_adapter: Callable[..., Path]) -> Path:
    """A writable copy of the default adapter (r=4 on q_proj and v_proj)."""
    return make_adapter()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def registry_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'registry.sqlite3'}"
    services = request.getfixturevalue("services")
    return f"{services.registry_url}?prefix=test:{uuid.uuid4().hex}:"


@pytest.fixture
def adapter_root(backend: str, tmp_path: Path) -> Path | None:
    """None for SQLite (its default, beside the database); Redis needs one."""
    return None if backend == "sqlite" else tmp_path / "shared-adapters"


@pytest.fixture
def open_reg(registry_url: str, adapter_root: Path | None) -> Iterator[Callable[[], Registry]]:
    """Open another handle on the test's registry (as another process would); closed at the end."""
    opened: list[Registry] = []

    def _open() -> Registry:
        opened.append(open_registry(registry_url, adapter_root))
        return opened[-1]

    yield _open
    for registry in opened:
        registry.close()


@pytest.fixture
def reg(open_reg: Callable[[], Registry]) -> Registry:
    return open_reg()


@pytest.fixture
def publish(reg: Registry, adapter_dir: Path) -> Callable[..., str]:
    """Publish the default adapter with small defaults; returns the new version's name."""

    def _publish(parent: str | None = None, **overrides) -> str:
        kwargs: dict[str, Any] = {"base_model": BASE_MODEL, "parent": parent, "metrics": {}, "lineage": {}}
        kwargs.update(overrides)
        return reg.publish(adapter_dir, **kwargs).version

    return _publish
