"""The embedded registry: a directory of immutable adapter versions plus one SQLite file.

Layout of the store (several processes, e.g. the server and the learner, share it at once):

    <root>/registry.sqlite3        metadata, the active pointer, its history (WAL mode)
    <adapter_root>/ …              the version directories (registry.store.AdapterFiles),
                                   default <root>/versions

Publishes follow registry.publishing: a name is reserved as a 'pending' row, invisible to every
read, and flipped to 'ready' (or 'rejected') in one transaction once its directory is in place;
the rows of killed publishes become 'abandoned', so that their names are never handed out again.
Pointer changes, canary steps, rejections and erasures (registry.transitions) each run in one
IMMEDIATE transaction over the pointer row (active version and canary), the rollback stack, the
version states, the flags and the history (`SqliteTx`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from registry import publishing, schema, store
from registry.base import Registry
from registry.canary import Canary
from registry.errors import RegistryError
from registry.publishing import VISIBLE as _VISIBLE
from registry.sqlite_catalog import SqliteCatalog
from registry.versions import HistoryEntry, RuleSetVersion, VersionRecord

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class SqliteRegistry(Registry):
    """The embedded Registry backend; safe across processes and threads."""

    def __init__(self, db_path: Path, adapter_root: Path | None = None, *, busy_timeout_s: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.adapter_root = Path(adapter_root) if adapter_root else self.db_path.parent / "versions"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._files = store.AdapterFiles(self.adapter_root)
        self._catalog = SqliteCatalog(self)
        self._lock = threading.RLock()  # one connection, shared by this object's threads
        self._closed = threading.Event()
        self._conn: sqlite3.Connection | None = schema.connect(self.db_path, busy_timeout_s)
        try:
            publishing.sweep_if_idle(self._files, self._catalog)
        except BaseException:
            self.close()
            raise
        logger.info("registry opened at %s (adapters in %s)", self.db_path, self.adapter_root)

    # ---- connection plumbing -------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError("registry is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so that read-then-write steps cannot interleave."""
        with self._lock, schema.unavailable_on_error(self.db_path):
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, schema.unavailable_on_error(self.db_path):
            return self._db().execute(sql, params).fetchall()

    def _transaction(self, operation: Callable[[SqliteTx], _T]) -> _T:
        """One operation of registry.transitions: its reads, then its queued writes, in one
        IMMEDIATE transaction."""
        with self._write() as c:
            tx = SqliteTx(c)
            result = operation(tx)
            for write in tx.writes:
                write()
        return result

    # ---- versions ------------------------------------------------------------------------

    def _records(self, version: str | None) -> list[VersionRecord]:
        where, args = ("version = ? AND ", (version,)) if version is not None else ("", ())
        rows = self._read(
            "SELECT version, state, parent, created_at, base_model, sha256, files, metrics, lineage,"
            f" rejected_reason, pinned, pruned_at FROM versions WHERE {where}state IN (?, ?) ORDER BY seq",
            (*args, *_VISIBLE),
        )
        flags: dict[str, list[dict[str, Any]]] = {}
        for name, erasure, at, reason in self._read(
            f"SELECT version, erasure, at, reason FROM flags WHERE {where}1 ORDER BY at", args
        ):
            flags.setdefault(name, []).append({"erasure": erasure, "at": at, "reason": reason})
        return [_version_record(row, flags) for row in rows]

    # ---- the active pointer -----------------------------------------------------------------

    def pointer(self) -> tuple[int, str | None]:
        counter, active = self._read("SELECT counter, active FROM pointer WHERE id = 1")[0]
        return counter, active

    def wait_for_change(self, timeout_s: float) -> None:
        """SQLite has no notifications: sleep timeout_s (less if closed); callers then poll."""
        self._closed.wait(timeout_s)

    def history(self) -> list[HistoryEntry]:
        rows = self._read(
            "SELECT seq, at, action, version, previous, actor, reason, evidence FROM history ORDER BY seq"
        )
        return [_history_entry(row) for row in rows]

    # ---- the canary (registry.canary; its steps: registry.transitions) -------------------------

    def canary(self) -> Canary | None:
        return Canary.loads(self._read("SELECT canary FROM pointer WHERE id = 1")[0][0])

    # ---- rule sets ------------------------------------------------------------------------

    def _append_rule_set(self, rules_json: str, actor: str, reason: str, at: float) -> RuleSetVersion:
        with self._write() as c:
            version = c.execute(
                "INSERT INTO rule_sets (at, actor, reason, rules) VALUES (?, ?, ?, ?)", (at, actor, reason, rules_json)
            ).lastrowid
        assert version is not None
        return RuleSetVersion(version, at, actor, reason, json.loads(rules_json))

    def _rule_sets(self, latest: bool) -> list[RuleSetVersion]:
        newest = " WHERE version = (SELECT MAX(version) FROM rule_sets)" if latest else ""
        rows = self._read(f"SELECT version, at, actor, reason, rules FROM rule_sets{newest} ORDER BY version")
        return [RuleSetVersion(v, at, actor, reason, json.loads(rules)) for v, at, actor, reason, rules in rows]

    # ---- lifecycle -------------------------------------------------------------------------

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SqliteTx:
    """registry.transitions.Tx on one IMMEDIATE transaction; writes wait in `writes` until the
    operation returns."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn
        self.writes: list[Callable[[], object]] = []

    def pointer(self) -> tuple[int, str | None, Canary | None]:
        counter, active, canary = self.c.execute("SELECT counter, active, canary FROM pointer WHERE id = 1").fetchone()
        return counter, active, Canary.loads(canary)

    def stack(self) -> list[str | None]:
        return [v for (v,) in self.c.execute("SELECT version FROM rollback_stack ORDER BY pos")]

    def _column(self, column: str, version: str) -> Any:
        row = self.c.execute(f"SELECT {column} FROM versions WHERE version = ?", (version,)).fetchone()
        return row and row[0]

    def state(self, version: str) -> str | None:
        return self._column("state", version)

    def rejected_reason(self, version: str) -> str | None:
        return self._column("rejected_reason", version)

    def parent(self, version: str) -> str | None:
        return self._column("parent", version)

    def flags(self, version: str) -> list[dict[str, Any]]:
        rows = self.c.execute("SELECT erasure, at, reason FROM flags WHERE version = ? ORDER BY at", (version,))
        return [{"erasure": erasure, "at": at, "reason": reason} for erasure, at, reason in rows]

    def erasure(self, request_id: str) -> HistoryEntry | None:
        row = self.c.execute(
            "SELECT seq, at, action, version, previous, actor, reason, evidence FROM history"
            " WHERE action = 'erasure' AND json_extract(evidence, '$.request_id') = ?",
            (request_id,),
        ).fetchone()
        return _history_entry(row) if row else None

    def pinned(self, version: str) -> bool:
        return bool(self._column("pinned", version))

    def pruned_at(self, version: str) -> float | None:
        return self._column("pruned_at", version)

    def set_pinned(self, version: str, pinned: bool) -> None:
        sql = "UPDATE versions SET pinned = ? WHERE version = ?"
        self.writes.append(lambda: self.c.execute(sql, (pinned, version)))

    def set_pruned(self, version: str, at: float) -> None:
        self.writes.append(lambda: self.c.execute("UPDATE versions SET pruned_at = ? WHERE version = ?", (at, version)))

    def reject(self, version: str, reason: str) -> None:
        self.writes.append(
            lambda: self.c.execute(
                "UPDATE versions SET state = 'rejected', rejected_reason = ? WHERE version = ?", (reason, version)
            )
        )

    def set_flags(self, version: str, flags: list[dict[str, Any]]) -> None:
        self.writes.append(
            lambda: self.c.executemany(
                "INSERT OR IGNORE INTO flags (version, erasure, at, reason) VALUES (?, ?, ?, ?)",
                [(version, f["erasure"], f["at"], f["reason"]) for f in flags],
            )
        )

    def set_canary(self, canary: Canary | None) -> None:
        self.writes.append(
            lambda: self.c.execute("UPDATE pointer SET canary = ? WHERE id = 1", (canary and canary.dumps(),))
        )

    def append(
        self, entry: HistoryEntry, *, active: str | None, canary: Canary | None, stack: list[str | None] | None = None
    ) -> None:
        def write() -> None:
            evidence = None if entry.evidence is None else json.dumps(entry.evidence)
            self.c.execute(
                "INSERT INTO history (seq, at, action, version, previous, actor, reason, evidence)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.seq, entry.at, entry.action, entry.version, entry.previous, entry.actor, entry.reason, evidence),
            )
            self.c.execute(
                "UPDATE pointer SET counter = ?, active = ?, canary = ? WHERE id = 1",
                (entry.seq, active, canary and canary.dumps()),
            )
            if stack is not None:
                self.c.execute("DELETE FROM rollback_stack")
                self.c.executemany("INSERT INTO rollback_stack (pos, version) VALUES (?, ?)", list(enumerate(stack)))

        self.writes.append(write)


def _history_entry(row: tuple[Any, ...]) -> HistoryEntry:
    seq, at, action, version, previous, actor, reason, evidence = row
    return HistoryEntry(seq, at, action, version, previous, actor, reason, json.loads(evidence) if evidence else None)


def _version_record(row: tuple[Any, ...], flags: dict[str, list[dict[str, Any]]]) -> VersionRecord:
    name, state, parent, created_at, base_model, sha256, files, metrics, lineage, reason, pinned, pruned_at = row
    return VersionRecord(
        name,
        state,
        parent,
        created_at,
        base_model,
        sha256,
        json.loads(files),
        json.loads(metrics),
        json.loads(lineage),
        reason,
        flags.get(name, []),
        bool(pinned),
        pruned_at,
    )
