"""Adapter versions: an immutable store, metadata and lineage, the active pointer and its history.

Open one with `open_registry(url, adapter_root)`; every backend implements the `Registry`
protocol. The Redis backend (and redis-py) is imported only when a redis:// URL asks for it.
"""

from __future__ import annotations

from pathlib import Path

from foundation.urls import backend_of, sqlite_path
from registry.base import Registry
from registry.canary import Canary, in_canary
from registry.errors import (
    CanaryRunning,
    InvalidAdapter,
    InvalidCanary,
    NoCanary,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    UnknownVersion,
    VerificationError,
    VersionPruned,
    VersionRejected,
)
from registry.sqlite_registry import SqliteRegistry
from registry.versions import BASE, HistoryEntry, RuleSetVersion, VersionInfo

__all__ = [
    "BASE",
    "Canary",
    "CanaryRunning",
    "HistoryEntry",
    "InvalidAdapter",
    "InvalidCanary",
    "NoCanary",
    "NothingToRollBack",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "RuleSetVersion",
    "SqliteRegistry",
    "UnknownVersion",
    "VerificationError",
    "VersionInfo",
    "VersionPruned",
    "VersionRejected",
    "in_canary",
    "open_registry",
]


def open_registry(url: str, adapter_root: Path | None = None) -> Registry:
    """Open the registry named by `url`.

    - `sqlite:///<path>`: the embedded registry in that SQLite file (SQLAlchemy's convention:
      `sqlite:///rel/registry.sqlite3` is relative to the working directory,
      `sqlite:////abs/registry.sqlite3` absolute); adapter directories go under `versions/`
      beside the file unless `adapter_root` is given. Created if missing.
    - `redis://[user:password@]host:port/db[?prefix=kto:registry:]` (`rediss://` for TLS):
      metadata, the pointer and change notifications in Redis under the key prefix (default
      `kto:registry:`, see registry.redis_keys); adapter files under `adapter_root`, which
      is then required: a directory every replica and the learner share.
    """
    if backend_of(url, allowed=("sqlite", "redis"), what="registry") == "sqlite":
        return SqliteRegistry(sqlite_path(url), adapter_root)
    if adapter_root is None:
        raise ValueError(
            "the Redis registry needs adapter_root (KTO_ADAPTER_DIR): the directory of "
            "adapter files that every replica and the learner share"
        )
    from registry.redis_registry import RedisRegistry

    return RedisRegistry(url, adapter_root)
