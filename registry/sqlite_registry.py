"""The embedded registry: a directory of immutable adapter versions plus one SQLite file.

Layout of the store (several processes, e.g. the server and the learner, share it at once):

    <root>/registry.sqlite3        metadata, the active pointer, its history (WAL mode)
    <adapter_root>/ …              the version directories (registry.store.AdapterFiles),
                                   default <root>/versions

Publishes follow registry.publishing: a name is reserved as a 'pending' row, invisible to every
read, and flipped to 'ready' (or 'rejected') in one transaction once its directory is in place;
the rows of killed publishes become 'abandoned', so that their names are never handed out again.
Pointer changes (activate, rollback, reject of the active version) and canary steps
(registry.canary) read and write the pointer row (active version and canary), the rollback stack
and the history in one IMMEDIATE transaction.
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

from registry import canary as canary_rules
from registry import publishing, schema, store
from registry import rollback as stack_rules
from registry.canary import Canary
from registry.erasure import SqliteErasures
from registry.errors import RegistryError, UnknownVersion, VersionRejected
from registry.publishing import VISIBLE as _VISIBLE
from registry.sqlite_catalog import SqliteCatalog
from registry.versions import BASE, HistoryAction, HistoryEntry, VersionInfo

logger = logging.getLogger(__name__)

_VERSION_COLUMNS = (
    "version, state, parent, created_at, base_model, sha256, metrics, lineage, rejected_reason"
)


class SqliteRegistry(SqliteErasures, publishing.Publishing):
    """The embedded Registry backend; safe across processes and threads."""

    def __init__(
        self, db_path: Path, adapter_root: Path | None = None, *, busy_timeout_s: float = 30.0
    ) -> None:
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

    # ---- versions ------------------------------------------------------------------------

    def get(self, version: str) -> VersionInfo:
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version = ? AND state IN (?, ?)",
            (version, *_VISIBLE),
        )
        if not rows:
            raise UnknownVersion(version)
        return self._with_flags([self._info(rows[0])])[0]

    def list_versions(self) -> list[VersionInfo]:
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE state IN (?, ?) ORDER BY seq",
            _VISIBLE,
        )
        return self._with_flags([self._info(row) for row in rows])

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
            why = f"{version} rejected: {reason}"
            if active == version:
                target, stack = stack_rules.pop_for_rollback(
                    self._stack_in(c), active, lambda v: self._unservable_in(c, v)
                )
                self._move_in(c, "rollback", target, stack, actor, why)
            elif (running := self._canary_in(c)) is not None and running.version == version:
                self._note_in(c, "canary_rollback", version, None, actor, why)
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
            target, stack = stack_rules.plan_rollback(
                self._stack_in(c), previous, to,
                is_rejected=lambda v: self._unservable_in(c, v),
                check_servable=lambda v: self._check_servable_in(c, v))
            entry = self._move_in(c, "rollback", target, stack, actor, reason)
        logger.info("%s rolled back from %s to %s", actor, previous or "base", target or "base")
        return entry

    def wait_for_change(self, timeout_s: float) -> None:
        """SQLite has no notifications: sleep timeout_s (less if closed); callers then poll."""
        self._closed.wait(timeout_s)

    def history(self) -> list[HistoryEntry]:
        rows = self._read(
            "SELECT seq, at, action, version, previous, actor, reason, evidence FROM history"
            " ORDER BY seq"
        )
        return [HistoryEntry(*row[:7], json.loads(row[7]) if row[7] else None) for row in rows]

    # ---- the canary (registry.canary) -------------------------------------------------------

    def canary(self) -> Canary | None:
        return Canary.loads(self._read("SELECT canary FROM pointer WHERE id = 1")[0][0])

    def start_canary(
        self, version: str, share: float, *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        with self._write() as c:
            self._check_servable_in(c, version)
            _, active = self._pointer_in(c)
            running = canary_rules.start(
                self._canary_in(c), active, version, share, actor=actor, now=time.time()
            )
            entry = self._note_in(c, "canary_start", version, running, actor, reason, evidence)
        logger.info("%s started a canary of %s for %.0f%% of users", actor, version, 100 * share)
        return entry

    def advance_canary(
        self, version: str, to: str, *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        with self._write() as c:
            self._check_servable_in(c, to)
            (parent,) = c.execute("SELECT parent FROM versions WHERE version = ?", (to,)).fetchone()
            running = canary_rules.advance(self._canary_in(c), version, to, parent)
            entry = self._note_in(c, "canary_advance", to, running, actor, reason, evidence)
        logger.info("%s advanced the canary from %s to %s", actor, version, to)
        return entry

    def promote_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        with self._write() as c:
            # A candidate is never rejected while its canary runs (rejecting it ends the canary).
            canary_rules.require(self._canary_in(c), version)
            _, previous = self._pointer_in(c)
            stack = stack_rules.push_on_activate(self._stack_in(c), previous, version)
            entry = self._move_in(c, "canary_promote", version, stack, actor, reason, evidence)
        logger.info("%s promoted canary %s (was %s)", actor, version, previous or "base")
        return entry

    def rollback_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        with self._write() as c:
            canary_rules.require(self._canary_in(c), version)
            c.execute(
                "UPDATE versions SET state = 'rejected', rejected_reason = ?"
                " WHERE version = ? AND state = 'ready'",
                (canary_rules.rejection(actor, reason), version),
            )
            entry = self._note_in(c, "canary_rollback", version, None, actor, reason, evidence)
        logger.warning("%s rolled back canary %s: %s", actor, version, reason)
        return entry

    def pause_canary(
        self, version: str, paused: bool, *, actor: str, reason: str = ""
    ) -> HistoryEntry:
        with self._write() as c:
            running = canary_rules.paused(canary_rules.require(self._canary_in(c), version), paused)
            action = "canary_pause" if paused else "canary_resume"
            entry = self._note_in(c, action, version, running, actor, reason)
        logger.info("%s %s canary %s", actor, "paused" if paused else "resumed", version)
        return entry

    def report_canary(self, version: str, evidence: dict[str, Any]) -> bool:
        with self._write() as c:
            running = self._canary_in(c)
            if running is None or running.version != version:
                return False
            running = canary_rules.reported(running, evidence, now=time.time())
            c.execute("UPDATE pointer SET canary = ? WHERE id = 1", (running.dumps(),))
        return True

    # Helpers run inside a _write() transaction, on its connection.

    def _pointer_in(self, c: sqlite3.Connection) -> tuple[int, str | None]:
        return c.execute("SELECT counter, active FROM pointer WHERE id = 1").fetchone()

    def _stack_in(self, c: sqlite3.Connection) -> list[str | None]:
        return [v for (v,) in c.execute("SELECT version FROM rollback_stack ORDER BY pos")]

    def _canary_in(self, c: sqlite3.Connection) -> Canary | None:
        return Canary.loads(c.execute("SELECT canary FROM pointer WHERE id = 1").fetchone()[0])

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
        action: HistoryAction,
        version: str | None,
        stack: list[str | None],
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """Swap the pointer (the canary follows: registry.canary.after_move), replace the stack,
        append history: all in the caller's transaction."""
        _, previous = self._pointer_in(c)
        at = time.time()
        running = canary_rules.after_move(self._canary_in(c), version, now=at)
        entry = self._append_in(c, at, action, version, previous, actor, reason, evidence)
        c.execute(
            "UPDATE pointer SET counter = counter + 1, active = ?, canary = ? WHERE id = 1",
            (version, running and running.dumps()),
        )
        c.execute("DELETE FROM rollback_stack")
        c.executemany(
            "INSERT INTO rollback_stack (pos, version) VALUES (?, ?)", list(enumerate(stack))
        )
        return entry

    def _note_in(
        self,
        c: sqlite3.Connection,
        action: HistoryAction,
        candidate: str,
        running: Canary | None,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """A canary step that leaves the pointer where it is: set the canary, append history."""
        _, active = self._pointer_in(c)
        entry = self._append_in(c, time.time(), action, candidate, active, actor, reason, evidence)
        c.execute(
            "UPDATE pointer SET counter = counter + 1, canary = ? WHERE id = 1",
            (running and running.dumps(),),
        )
        return entry

    def _append_in(
        self, c: sqlite3.Connection, at: float, action: HistoryAction, version: str | None,
        previous: str | None, actor: str, reason: str, evidence: dict[str, Any] | None,
    ) -> HistoryEntry:
        text = canary_rules.evidence_json(evidence)
        seq = c.execute(
            "INSERT INTO history (at, action, version, previous, actor, reason, evidence)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (at, action, version, previous, actor, reason, text),
        ).lastrowid
        return HistoryEntry(
            seq, at, action, version, previous, actor, reason, text and json.loads(text)
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
