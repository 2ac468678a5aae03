"""Adapter versions: an immutable store, metadata and lineage, the active pointer and its history.

Open one with `open_registry(url)`; every backend implements the `Registry` protocol.
"""

from __future__ import annotations

from pathlib import Path

from kto_loop.urls import SQLITE_PREFIX, sqlite_path

from registry.base import Registry
from registry.compat import check_adapter
from registry.errors import (
    InvalidAdapter,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    UnknownVersion,
    VerificationError,
    VersionRejected,
)
from registry.sqlite_registry import SqliteRegistry
from registry.versions import BASE, HistoryEntry, VersionInfo

__all__ = [
    "BASE",
    "HistoryEntry",
    "InvalidAdapter",
    "NothingToRollBack",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "SqliteRegistry",
    "UnknownVersion",
    "VerificationError",
    "VersionInfo",
    "VersionRejected",
    "check_adapter",
    "open_registry",
]

def open_registry(url: str, adapter_root: Path | None = None) -> Registry:
    """Open the registry named by `url`.

    - `sqlite:///<path>`: the embedded registry in that SQLite file (SQLAlchemy's convention:
      `sqlite:///rel/registry.sqlite3` is relative to the working directory,
      `sqlite:////abs/registry.sqlite3` absolute); adapter directories go under `versions/`
      beside the file unless `adapter_root` is given. Created if missing.
    - `redis://…`: not available yet.
    """
    if url.startswith(SQLITE_PREFIX):
        return SqliteRegistry(sqlite_path(url), adapter_root)
    if url.startswith(("redis://", "rediss://")):
        raise ValueError(
            f"registry URL {url!r}: the Redis registry backend is not available yet; "
            "use sqlite:///<path> for the embedded registry"
        )
    raise ValueError(
        f"unsupported registry URL {url!r}: expected sqlite:///<path to registry.sqlite3> "
        "(redis:// arrives later)"
    )
