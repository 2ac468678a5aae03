"""The annotation queue on one SQLite file (the embedded default); the rules are
serve.annotation_queue's."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.sqlite import connect, ensure_schema, write_transaction
from serve.annotation_queue import Annotation, Candidate, ItemGone, NotAssigned, QueueItem

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = 1
_PURGE_EVERY_S = 60.0
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS items (
        response_id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        version TEXT,
        created_at REAL NOT NULL,
        required INTEGER NOT NULL,
        annotated INTEGER NOT NULL DEFAULT 0,
        body TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS items_open ON items (created_at) WHERE annotated < required",
    "CREATE INDEX IF NOT EXISTS items_user ON items (user)",
    """CREATE TABLE IF NOT EXISTS annotations (
        response_id TEXT NOT NULL,
        annotator TEXT NOT NULL,
        label TEXT NOT NULL,
        event_id TEXT NOT NULL,
        annotated_at REAL NOT NULL,
        PRIMARY KEY (response_id, annotator))""",
    """CREATE TABLE IF NOT EXISTS leases (
        response_id TEXT NOT NULL,
        annotator TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (response_id, annotator))""",
    "CREATE INDEX IF NOT EXISTS leases_annotator ON leases (annotator, expires_at)",
    """CREATE TABLE IF NOT EXISTS skips (
        response_id TEXT NOT NULL,
        annotator TEXT NOT NULL,
        PRIMARY KEY (response_id, annotator))""",
    "CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


class SqliteAnnotationQueue:
    """The embedded queue: one SQLite file in WAL mode, safe across threads and processes."""

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_s: float,
        max_items: int,
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ttl_s``: items older than this leave the queue. ``max_items``: past this many, the
        oldest items nobody annotated leave first."""
        self.path, self.ttl_s, self.max_items, self._clock = Path(path), ttl_s, max_items, clock
        self._lock = threading.Lock()
        self._last_purge = float("-inf")
        self._conn: sqlite3.Connection | None = connect(self.path, synchronous="NORMAL", busy_timeout_s=busy_timeout_s)
        ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "annotation queue")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the annotation queue at {self.path} is closed")
        return self._conn

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    def add(self, item: QueueItem) -> None:
        now = self._clock()
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO items (response_id, user, version, created_at, required, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (item.response_id, item.user, item.version, item.created_at, item.required, item.body()),
                )
        if now - self._last_purge >= _PURGE_EVERY_S:  # lazily, as the ledger does
            self._last_purge = now
            self.purge(now)

    def purge(self, now: float) -> int:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                return self._purge(conn, now)

    def _purge(self, conn: sqlite3.Connection, now: float) -> int:
        old = [r[0] for r in conn.execute("SELECT response_id FROM items WHERE created_at <= ?", (now - self.ttl_s,))]
        excess = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] - len(old) - self.max_items
        if excess > 0:
            old += [
                r[0]
                for r in conn.execute(
                    "SELECT response_id FROM items WHERE annotated = 0 AND created_at > ? ORDER BY created_at LIMIT ?",
                    (now - self.ttl_s, excess),
                )
            ]
        _delete(conn, old)
        if old:
            logger.info(
                "annotation queue: %d items left (older than %.0f s, or over %d)", len(old), self.ttl_s, self.max_items
            )
        return len(old)

    def item(self, response_id: str) -> QueueItem | None:
        rows = self._read(
            "SELECT response_id, user, version, created_at, required, body FROM items WHERE response_id = ?",
            (response_id,),
        )
        return QueueItem.of(*rows[0]) if rows else None

    def held(self, annotator: str, now: float) -> tuple[str, float] | None:
        rows = self._read(
            "SELECT l.response_id, l.expires_at FROM leases l JOIN items i ON i.response_id = l.response_id"
            " WHERE l.annotator = ? AND l.expires_at > ? ORDER BY l.expires_at DESC LIMIT 1",
            (annotator, now),
        )
        return rows[0] if rows else None

    def candidates(self, annotator: str, now: float, *, newest: bool, limit: int) -> list[Candidate]:
        rows = self._read(
            "SELECT i.response_id, i.version, i.created_at, i.annotated FROM items i"
            " WHERE i.annotated < i.required"
            " AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.response_id = i.response_id AND a.annotator = ?)"
            " AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.response_id = i.response_id AND s.annotator = ?)"
            " AND i.annotated + (SELECT COUNT(*) FROM leases l WHERE l.response_id = i.response_id"
            "   AND l.annotator != ? AND l.expires_at > ?) < i.required"
            f" ORDER BY {'i.created_at DESC' if newest else 'RANDOM()'} LIMIT ?",
            (annotator, annotator, annotator, now, limit),
        )
        return [Candidate(rid, version or None, at, n) for rid, version, at, n in rows]

    def assign(self, response_id: str, annotator: str, now: float, lease_s: float) -> bool:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                free = conn.execute(
                    "SELECT 1 FROM items i WHERE i.response_id = ?"
                    " AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.response_id = i.response_id"
                    "   AND a.annotator = ?)"
                    " AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.response_id = i.response_id AND s.annotator = ?)"
                    " AND i.annotated + (SELECT COUNT(*) FROM leases l WHERE l.response_id = i.response_id"
                    "   AND l.annotator != ? AND l.expires_at > ?) < i.required",
                    (response_id, annotator, annotator, annotator, now),
                ).fetchone()
                if free is None:
                    return False
                conn.execute(
                    "INSERT INTO leases (response_id, annotator, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (response_id, annotator) DO UPDATE SET expires_at = excluded.expires_at",
                    (response_id, annotator, now + lease_s),
                )
                return True

    def annotation(self, response_id: str, annotator: str, now: float) -> Annotation | None:
        with self._lock:
            return _check(self._connection(), response_id, annotator, now)

    def annotate(self, annotation: Annotation) -> Annotation | None:
        a = annotation
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                previous = _check(conn, a.response_id, a.annotator, a.annotated_at)
                conn.execute(
                    "INSERT INTO annotations (response_id, annotator, label, event_id, annotated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (response_id, annotator) DO UPDATE"
                    " SET label = excluded.label, event_id = excluded.event_id, annotated_at = excluded.annotated_at",
                    (a.response_id, a.annotator, a.label, a.event_id, a.annotated_at),
                )
                conn.execute("DELETE FROM leases WHERE response_id = ? AND annotator = ?", (a.response_id, a.annotator))
                if previous is None:
                    conn.execute("UPDATE items SET annotated = annotated + 1 WHERE response_id = ?", (a.response_id,))
        return previous

    def skip(self, response_id: str, annotator: str, now: float) -> None:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                released = conn.execute(
                    "DELETE FROM leases WHERE response_id = ? AND annotator = ?", (response_id, annotator)
                ).rowcount
                if not released:
                    raise NotAssigned(f"{response_id} is not assigned to {annotator!r}")
                conn.execute(
                    "INSERT OR IGNORE INTO skips (response_id, annotator) VALUES (?, ?)", (response_id, annotator)
                )

    def annotations(self) -> list[Annotation]:
        rows = self._read("SELECT response_id, annotator, label, event_id, annotated_at FROM annotations")
        return [Annotation(*row) for row in rows]

    def open_items(self) -> int:
        return self._read("SELECT COUNT(*) FROM items WHERE annotated < required")[0][0]

    def forget_user(self, user: str) -> int:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                ids = [r[0] for r in conn.execute("SELECT response_id FROM items WHERE user = ?", (user,))]
                _delete(conn, ids)
        return len(ids)

    def config(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._read("SELECT key, value FROM config")}

    def set_config(self, values: dict[str, Any]) -> None:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                conn.executemany(
                    "INSERT INTO config (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [(key, json.dumps(value)) for key, value in values.items()],
                )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _check(conn: sqlite3.Connection, response_id: str, annotator: str, now: float) -> Annotation | None:
    if conn.execute("SELECT 1 FROM items WHERE response_id = ?", (response_id,)).fetchone() is None:
        raise ItemGone(response_id)
    row = conn.execute(
        "SELECT response_id, annotator, label, event_id, annotated_at FROM annotations"
        " WHERE response_id = ? AND annotator = ?",
        (response_id, annotator),
    ).fetchone()
    if row is not None:
        return Annotation(*row)
    holds = conn.execute(
        "SELECT l.expires_at > ? OR i.annotated + (SELECT COUNT(*) FROM leases o WHERE o.response_id = l.response_id"
        "   AND o.annotator != l.annotator AND o.expires_at > ?) < i.required"
        " FROM leases l JOIN items i ON i.response_id = l.response_id WHERE l.response_id = ? AND l.annotator = ?",
        (now, now, response_id, annotator),
    ).fetchone()
    if not (holds and holds[0]):
        raise NotAssigned(f"{response_id} is not assigned to {annotator!r}")
    return None


def _delete(conn: sqlite3.Connection, ids: list[str]) -> None:
    for table in ("items", "annotations", "leases", "skips"):
        conn.executemany(f"DELETE FROM {table} WHERE response_id = ?", [(i,) for i in ids])
