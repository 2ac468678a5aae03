"""The embedded registry: a directory of immutable adapter versions plus one SQLite file.

Layout of the store (several processes, e.g. the server and the learner, share it at once):

    <root>/registry.sqlite3        metadata, the active pointer, its history (WAL mode)
    <adapter_root>/ …              the version directories (registry.store.AdapterFiles),
                                   default <root>/versions

Publishes follow registry.publishing: a name is reserved as a 'pending' row, invisible to every
read, and flipped to 'ready' (or 'rejected') in one transaction once its directory is in place;
the rows of killed publishes become 'abandoned', so that their names are never handed out again.
Pointer changes (activate, rollback, reject of the active version) read and write the pointer,
the rollback stack and the history in one IMMEDIATE transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry import publishing, schema, store
from registry import rollback as stack_rules
from registry.errors import RegistryError, UnknownVersion, VersionRejected
from registry.publishing import VISIBLE as _VISIBLE
from registry.versions import BASE, HistoryEntry, VersionInfo

logger = logging.getLogger(__name__)

_VERSION_COLUMNS = (
    "version, state, parent, created_at, base_model, sha256, metrics, lineage, rejected_reason"
)


class SqliteRegistry:
    """The embedded Registry backend; safe across processes and threads."""

    def __init__(
        self, db_path: Path, adapter_root: Path | None = None, *, busy_timeout_s: float = 30.0
    ) -> None:
        self.db_path = Path(db_path)
        self.adapter_root = Path(adapter_root) if adapter_root else self.db_path.parent / "versions"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._files = store.AdapterFiles(self.adapter_root)
        self._catalog = _Catalog(self)
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

    # ---- publish ---------------------------------------------------------------------------

    def publish(
        self,
        src_dir: Path,
        *,
        base_model: str,
        parent: str | None,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "ready",
        rejected_reason: str | None = None,
    ) -> VersionInfo:
        return publishing.publish(
            self._files, self._catalog, self.get, src_dir, base_model=base_model, parent=parent,
            metrics=metrics, lineage=lineage, status=status, rejected_reason=rejected_reason,
        )

    # ---- versions ------------------------------------------------------------------------

    def get(self, version: str) -> VersionInfo:
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version = ? AND state IN (?, ?)",
            (version, *_VISIBLE),
        )
        if not rows:
            raise UnknownVersion(version)
        return self._info(rows[0])

    def list_versions(self) -> list[VersionInfo]:
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE state IN (?, ?) ORDER BY seq",
            _VISIBLE,
        )
        return [self._info(row) for row in rows]

    def adapter_path(self, version: str) -> Path:
        return self.get(version).path

    def _info(self, row: tuple[Any, ...]) -> VersionInfo:
        version, state, parent, created_at, base_model, sha256, metrics, lineage, reason = row
        return VersionInfo(
            version=version,
            status=state,
            parent=parent,
            created_at=created_at,
            base_model=base_model,
            sha256=sha256,
            path=self._files.path(version),
            metrics=json.loads(metrics),
            lineage=json.loads(lineage),
            rejected_reason=reason,
        )

    def reject(self, version: str, reason: str, *, actor: str = "registry") -> None:
        """Idempotent (the first reason stays). Rejecting the active version rolls back from it
        in the same transaction, so that every replica that finds it broken agrees on one step."""
        with self._write() as c:
            row = c.execute(
                "SELECT state FROM versions WHERE version = ? AND state IN (?, ?)",
                (version, *_VISIBLE),
            ).fetchone()
            if row is None:
                raise UnknownVersion(version)
            if row[0] == "rejected":
                return
            c.execute(
                "UPDATE versions SET state = 'rejected', rejected_reason = ? WHERE version = ?",
                (reason, version),
            )
            _, active = self._pointer_in(c)
            if active == version:
                target, stack = stack_rules.pop_for_rollback(
                    self._stack_in(c), active, lambda v: self._unservable_in(c, v)
                )
                self._move_in(c, "rollback", target, stack, actor, f"{version} rejected: {reason}")
        logger.warning("rejected %s: %s", version, reason)

    def verify_files(self, version: str) -> None:
        rows = self._read(
            "SELECT files FROM versions WHERE version = ? AND state IN (?, ?)", (version, *_VISIBLE)
        )
        if not rows:
            raise UnknownVersion(version)
        self._files.verify(version, json.loads(rows[0][0]))

    # ---- the active pointer -----------------------------------------------------------------

    def active(self) -> str | None:
        return self.pointer()[1]

    def pointer(self) -> tuple[int, str | None]:
        counter, active = self._read("SELECT counter, active FROM pointer WHERE id = 1")[0]
        return counter, active

    def activate(self, version: str | None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Activating the version already active still records an entry (an audit of the
        request) and bumps the counter, but pushes nothing on the rollback stack."""
        version = None if version == BASE else version
        with self._write() as c:
            self._check_servable_in(c, version)
            _, previous = self._pointer_in(c)
            stack = stack_rules.push_on_activate(self._stack_in(c), previous, version)
            entry = self._move_in(c, "activate", version, stack, actor, reason)
        logger.info("%s activated %s (was %s)", actor, version or "base", previous or "base")
        return entry

    def rollback(self, to: str | None = None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Without `to`, the stack rule (registry.rollback); `to=BASE` rolls back to the base."""
        with self._write() as c:
            _, previous = self._pointer_in(c)
            if to is None:
                target, stack = stack_rules.pop_for_rollback(
                    self._stack_in(c), previous, lambda v: self._unservable_in(c, v)
                )
            else:
                target = None if to == BASE else to
                self._check_servable_in(c, target)
                stack = stack_rules.truncate_for_rollback_to(self._stack_in(c), target)
            entry = self._move_in(c, "rollback", target, stack, actor, reason)
        logger.info("%s rolled back from %s to %s", actor, previous or "base", target or "base")
        return entry

    def wait_for_change(self, timeout_s: float) -> None:
        """SQLite has no notifications: sleep timeout_s (less if closed); callers then poll."""
        self._closed.wait(timeout_s)

    def history(self) -> list[HistoryEntry]:
        rows = self._read(
            "SELECT seq, at, action, version, previous, actor, reason FROM history ORDER BY seq"
        )
        return [HistoryEntry(*row) for row in rows]

    # Helpers run inside a _write() transaction, on its connection.

    def _pointer_in(self, c: sqlite3.Connection) -> tuple[int, str | None]:
        return c.execute("SELECT counter, active FROM pointer WHERE id = 1").fetchone()

    def _stack_in(self, c: sqlite3.Connection) -> list[str | None]:
        return [v for (v,) in c.execute("SELECT version FROM rollback_stack ORDER BY pos")]

    def _unservable_in(self, c: sqlite3.Connection, version: str) -> bool:
        # Rejected, or (never expected: rows are not deleted) gone.
        row = c.execute("SELECT state FROM versions WHERE version = ?", (version,)).fetchone()
        return row is None or row[0] != "ready"

    def _check_servable_in(self, c: sqlite3.Connection, version: str | None) -> None:
        if version is None:
            return
        row = c.execute(
            "SELECT state, rejected_reason FROM versions WHERE version = ? AND state IN (?, ?)",
            (version, *_VISIBLE),
        ).fetchone()
        if row is None:
            raise UnknownVersion(version)
        if row[0] == "rejected":
            raise VersionRejected(version, row[1])

    def _move_in(
        self,
        c: sqlite3.Connection,
        action: str,
        version: str | None,
        stack: list[str | None],
        actor: str,
        reason: str,
    ) -> HistoryEntry:
        """Swap the pointer, replace the stack, append history: all in the caller's transaction."""
        counter, previous = self._pointer_in(c)
        at = time.time()
        seq = c.execute(
            "INSERT INTO history (at, action, version, previous, actor, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (at, action, version, previous, actor, reason),
        ).lastrowid
        c.execute("UPDATE pointer SET counter = ?, active = ? WHERE id = 1", (counter + 1, version))
        c.execute("DELETE FROM rollback_stack")
        c.executemany(
            "INSERT INTO rollback_stack (pos, version) VALUES (?, ?)", list(enumerate(stack))
        )
        return HistoryEntry(
            seq, at, action, version, previous, actor, reason  # type: ignore[arg-type]
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Catalog:
    """The SQLite side of registry.publishing: rows of `versions` move pending → ready | rejected,
    or pending → abandoned; AUTOINCREMENT never hands a number out twice."""

    def __init__(self, registry: SqliteRegistry) -> None:
        self._registry = registry

    def reserve(self) -> str:
        with self._registry._write() as c:
            seq = c.execute(
                "INSERT INTO versions (state, created_at) VALUES ('pending', ?)", (time.time(),)
            ).lastrowid
            version = f"v{seq:04d}"
            c.execute("UPDATE versions SET version = ? WHERE seq = ?", (version, seq))
        return version

    def commit(self, version: str, new: publishing.NewVersion, files: dict[str, str]) -> None:
        with self._registry._write() as c:
            updated = c.execute(
                "UPDATE versions SET state = ?, parent = ?, created_at = ?, base_model = ?,"
                " sha256 = ?, files = ?, metrics = ?, lineage = ?, rejected_reason = ?"
                " WHERE version = ? AND state = 'pending'",
                (new.status, new.parent, time.time(), new.base_model, files[store.WEIGHTS_FILE],
                 json.dumps(files), new.metrics_json, new.lineage_json, new.rejected_reason,
                 version),
            ).rowcount
            if updated != 1:
                raise RegistryError(f"{version} is no longer pending; its publish cannot finish")

    def abandon(self, version: str) -> bool:
        with self._registry._write() as c:
            return c.execute(
                "UPDATE versions SET state = 'abandoned' WHERE version = ? AND state = 'pending'",
                (version,),
            ).rowcount == 1

    def pending(self) -> list[str]:
        rows = self._registry._read("SELECT version FROM versions WHERE state = 'pending'")
        return [version for (version,) in rows]
