"""The annotation queue: served answers waiting for non-expert annotators' 👍 / 👎.

The chat route offers each answer a user received (anonymous ones are nobody's, and the learner
refuses labels on them) to the queue, which keeps it with its conversation for the ledger's TTL.
An annotator asks for the next item and holds it for a lease (`KTO_ANNOTATION_LEASE_S`); while
held, nobody else takes that slot. An item wants one annotator, or two when it was drawn for
overlap (`KTO_ANNOTATION_OVERLAP`), which is what the agreement figure is computed from.

The delivery rules, enforced here (atomically on both backends):
- an annotator gets an item only while it has a free slot: annotations plus others' live leases
  fewer than it wants, and never one they annotated or skipped before;
- an annotation needs the annotator's lease, or their own earlier annotation of that item (a
  repeat: the same label changes nothing, another one replaces it); anything else is
  ``NotAssigned`` (a 403). A lease that ran out still counts while nobody else took its slot
  (an annotator who paused too long loses nothing that was not given away);
- a skip gives the slot back and the item never comes back to that annotator.

Erasing a user removes their items with everything recorded about them here. Which item comes
next is the strategy's choice (serve.annotation_strategies); this module only offers candidates.

Backends, chosen by URL in ``open_annotation_queue`` like the ledger: ``sqlite:///path``
(embedded) and ``redis://…`` (serve.redis_annotation_queue, shared by replicas).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from foundation.sqlite import connect, ensure_schema, path_from_url, write_transaction
from foundation.urls import backend_of

logger = logging.getLogger(__name__)

Label = Literal["desirable", "undesirable"]
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


@dataclass(frozen=True)
class QueueItem:
    """One served answer, as the queue keeps it."""

    response_id: str
    user: str
    """Whose answer it is: written into the annotator's feedback event, never shown to annotators."""
    version: str | None
    """The adapter version that answered (None: the base model)."""
    created_at: float
    messages: list[dict[str, str]]
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    required: int = 1
    """Annotators it wants: 2 for an overlap item."""

    def body(self) -> str:
        return json.dumps(
            {
                "messages": self.messages,
                "completion": self.completion,
                "prompt_token_ids": self.prompt_token_ids,
                "completion_token_ids": self.completion_token_ids,
            },
            separators=(",", ":"),
        )

    @classmethod
    def of(cls, response_id: str, user: str, version: str | None, created_at: float, required: int, body: str):
        return cls(response_id, user, version or None, created_at, required=required, **json.loads(body))


@dataclass(frozen=True)
class Candidate:
    """An item an annotator may take now, as a strategy sees it."""

    response_id: str
    version: str | None
    created_at: float
    annotations: int


@dataclass(frozen=True)
class Annotation:
    response_id: str
    annotator: str
    label: Label
    event_id: str
    annotated_at: float


class NotAssigned(PermissionError):
    """The annotator holds no live lease on the item and never annotated it."""


class ItemGone(LookupError):
    """No such item: never queued, expired, or its user was erased."""


class QueueUnavailable(Exception):
    """The queue's store cannot be reached; nothing was changed, the caller may retry."""


class AnnotationQueue(Protocol):
    """Where served answers wait for annotators (the module docstring has the rules)."""

    def add(self, item: QueueItem) -> None:
        """Queue an answer; idempotent."""
        ...

    def item(self, response_id: str) -> QueueItem | None: ...

    def purge(self, now: float) -> int:
        """Drop items older than the TTL, then the oldest nobody annotated past ``max_items``
        (``add`` calls it at most once a minute); returns how many left."""
        ...

    def held(self, annotator: str, now: float) -> tuple[str, float] | None:
        """The item the annotator holds a live lease on, and when the lease ends; None if none."""
        ...

    def candidates(self, annotator: str, now: float, *, newest: bool, limit: int) -> list[Candidate]:
        """Up to ``limit`` items the annotator may take now: the newest, or a random sample."""
        ...

    def assign(self, response_id: str, annotator: str, now: float, lease_s: float) -> bool:
        """Lease the item to the annotator if it still has a free slot for them."""
        ...

    def annotation(self, response_id: str, annotator: str, now: float) -> Annotation | None:
        """The annotator's annotation of the item; ``NotAssigned`` if they have none and no live
        lease, ``ItemGone`` if there is no such item."""
        ...

    def annotate(self, annotation: Annotation) -> Annotation | None:
        """Record it (the lease ends); returns the annotator's previous one. Same errors as ``annotation``."""
        ...

    def skip(self, response_id: str, annotator: str, now: float) -> None:
        """Give the slot back for good; ``NotAssigned`` without a lease."""
        ...

    def annotations(self) -> list[Annotation]:
        """Every annotation of the items in the queue (for agreement)."""
        ...

    def open_items(self) -> int:
        """Items that want more annotations."""
        ...

    def forget_user(self, user: str) -> int:
        """Remove the user's items and all about them; returns how many."""
        ...

    def config(self) -> dict[str, Any]:
        """What an operator set at run time (serve.routes.annotation)."""
        ...

    def set_config(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


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


def open_annotation_queue(url: str, *, ttl_s: float, max_items: int) -> AnnotationQueue:
    """The queue for ``url``: ``sqlite:///PATH`` or ``redis[s]://host:port/db``."""
    if backend_of(url, allowed=("sqlite", "redis"), what="annotation queue") == "sqlite":
        return SqliteAnnotationQueue(path_from_url(url), ttl_s=ttl_s, max_items=max_items)
    from serve.redis_annotation_queue import RedisAnnotationQueue  # redis-py only when chosen

    return RedisAnnotationQueue(url, ttl_s=ttl_s, max_items=max_items)
