"""The embedded registry's side of registry.publishing: the `versions` rows of pending names."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from registry import publishing, store
from registry.errors import RegistryError

if TYPE_CHECKING:
    from registry.sqlite_registry import SqliteRegistry


class SqliteCatalog:
    """The SQLite side of registry.publishing: rows of `versions` move pending → ready | rejected,
    or pending → abandoned; AUTOINCREMENT never hands a number out twice."""

    def __init__(self, registry: SqliteRegistry) -> None:
        self._registry = registry

    def reserve(self) -> str:
        with self._registry._write() as c:
            seq = c.execute("INSERT INTO versions (state, created_at) VALUES ('pending', ?)", (time.time(),)).lastrowid
            version = f"v{seq:04d}"
            c.execute("UPDATE versions SET version = ? WHERE seq = ?", (version, seq))
        return version

    def commit(self, version: str, new: publishing.NewVersion, files: dict[str, str]) -> None:
        with self._registry._write() as c:
            updated = c.execute(
                "UPDATE versions SET state = ?, parent = ?, created_at = ?, base_model = ?,"
                " sha256 = ?, files = ?, metrics = ?, lineage = ?, rejected_reason = ?"
                " WHERE version = ? AND state = 'pending'",
                (
                    new.status,
                    new.parent,
                    time.time(),
                    new.base_model,
                    files[store.WEIGHTS_FILE],
                    json.dumps(files),
                    new.metrics_json,
                    new.lineage_json,
                    new.rejected_reason,
                    version,
                ),
            ).rowcount
            if updated != 1:
                raise RegistryError(f"{version} is no longer pending; its publish cannot finish")

    def abandon(self, version: str) -> bool:
        with self._registry._write() as c:
            return (
                c.execute(
                    "UPDATE versions SET state = 'abandoned' WHERE version = ? AND state = 'pending'", (version,)
                ).rowcount
                == 1
            )

    def pending(self) -> list[str]:
        rows = self._registry._read("SELECT version FROM versions WHERE state = 'pending'")
        return [version for (version,) in rows]
