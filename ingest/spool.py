"""The spool: a bounded, durable FIFO of records waiting for the bus, in one SQLite file.

The server writes its events here first when the bus is remote (see ``ingest.spooled_bus`` for
who sends them on, and when). Rules:

- Durable: ``append`` returns after its transaction is committed with ``synchronous=FULL`` (WAL
  fsync'd), so an appended record survives SIGKILL and power loss. An append that fails stores
  nothing: a batch is appended whole or not at all.
- Bounded: an append that would take the spool past ``max_events`` records raises ``SpoolFull``
  and stores nothing. Nothing is ever dropped to make room.
- FIFO: each record gets ``seq``, an ever-increasing integer (AUTOINCREMENT, never reused, even
  after the spool was emptied); ``peek`` returns the oldest, and ``remove_through`` deletes the
  head up to a ``seq`` once the bus has acknowledged it. Nothing else deletes.
- One process at a time: the spool holds an exclusive lock (``flock`` on ``<file>.lock``, released
  by the kernel when the process dies), so two servers can never send the same records.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest._sqlite import connect, ensure_schema, write_transaction
from ingest.bus import BusUnavailable, check_records, check_topic_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 100_000
_LAYOUT_VERSION = 1
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS spool (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        key TEXT,
        value BLOB NOT NULL,
        spooled_at REAL NOT NULL)""",
]


class SpoolFull(BusUnavailable):
    """The spool holds ``max_events`` records already; nothing was stored."""

    def __init__(self, depth: int, max_events: int) -> None:
        super().__init__(
            f"the event spool is full: {depth} events are waiting for the bus (the limit is {max_events})"
        )
        self.depth, self.max_events = depth, max_events


class SpoolLocked(RuntimeError):
    """Another process has this spool open."""


@dataclass(frozen=True)
class Spooled:
    """One record waiting in the spool."""

    seq: int
    topic: str
    key: str | None
    value: bytes
    spooled_at: float
    """Unix seconds at which it was appended."""


class Spool:
    """A bounded durable FIFO in one SQLite file; see the module docstring. Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``max_events``: most records held (records). ``busy_timeout_s``: seconds to wait for the
        file's write lock. ``clock``: unix seconds, stamped on each record."""
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_exclusively(self.path.with_name(self.path.name + ".lock"))
        try:
            self._conn: sqlite3.Connection | None = connect(
                self.path, synchronous="FULL", busy_timeout_s=busy_timeout_s
            )
            ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "spool")
            # The one writer is this object, so the depth is counted once and then kept here.
            self._depth: int = self._conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        except BaseException:
            self.close()
            raise
        if self._depth:
            logger.warning("spool %s holds %d events from before; they will be sent first", self.path, self._depth)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BusUnavailable(f"the spool at {self.path} is closed")
        return self._conn

    @property
    def depth(self) -> int:
        """Records waiting (records)."""
        return self._depth

    def check_room(self, n: int = 1) -> None:
        """Raise ``SpoolFull`` unless ``n`` more records fit now."""
        depth = self._depth
        if depth + n > self.max_events:
            raise SpoolFull(depth, self.max_events)

    def append(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[int]:
        """Append (key, value) records for ``topic``, durably, all or none; their ``seq`` numbers."""
        return self.append_records([(topic, key, value) for key, value in items])

    def append_records(self, records: list[tuple[str, str | None, bytes]]) -> list[int]:
        """Append (topic, key, value) records, durably, all or none, in this order; their ``seq`` numbers."""
        for topic in {topic for topic, _, _ in records}:
            check_topic_name(topic)
        check_records([(key, value) for _, key, value in records])
        if not records:
            return []
        now = self._clock()
        with self._lock:
            conn = self._connection()
            self.check_room(len(records))
            try:
                with write_transaction(conn):
                    seqs = [
                        conn.execute(
                            "INSERT INTO spool (topic, key, value, spooled_at) VALUES (?, ?, ?, ?)",
                            (topic, key, bytes(value), now),
                        ).lastrowid
                        for topic, key, value in records
                    ]
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot write to the spool at {self.path}: {exc}") from exc
            self._depth += len(records)
        return seqs  # type: ignore[return-value]

    def peek(self, limit: int) -> list[Spooled]:
        """The oldest ``limit`` records, oldest first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT seq, topic, key, value, spooled_at FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Spooled(seq, topic, key, bytes(value), at) for seq, topic, key, value, at in rows]

    def remove_through(self, seq: int) -> int:
        """Delete every record up to and including ``seq`` (the bus has them); how many went."""
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                removed = conn.execute("DELETE FROM spool WHERE seq <= ?", (seq,)).rowcount
            self._depth -= removed
        return removed

    def oldest_at(self) -> float | None:
        """When the oldest waiting record was appended (unix seconds), or None if the spool is empty."""
        with self._lock:
            row = self._connection().execute("SELECT spooled_at FROM spool ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the file and release the lock; idempotent."""
        with self._lock:
            if getattr(self, "_conn", None) is not None:
                self._conn.close()  # type: ignore[union-attr]
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_exclusively(lock_path: Path) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(
            f"the spool {lock_path.with_suffix('')} is in use by another process; give each server its own"
            " spool file (KTO_SPOOL_PATH)"
        ) from None
    return fd
