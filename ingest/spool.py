"""The spool: a bounded, durable FIFO of records waiting for the bus, in one SQLite file.

The server writes its events here first when the bus is remote (see ``ingest.spooled_bus`` for
who sends them on, and when). Rules:

- Durable: ``append`` returns after the transaction holding its records is committed with
  ``synchronous=FULL`` (WAL fsync'd), so an appended record survives SIGKILL and power loss. An
  append that fails stores nothing: a batch is appended whole or not at all.
- Group commit: appends from several threads at once share one transaction, hence one fsync
  (the server publishes from a pool of request threads, and an fsync is most of an append's
  cost; see ``ingest._group_commit``). The first caller to find no commit in progress leads: it
  takes every append queued so far, in arrival order, writes them in one transaction and wakes
  their callers; appends that arrive meanwhile queue for the next group. Each caller still
  returns only once its own records are committed, and a group is judged as if its appends had
  run one after another: each is stored whole or refused whole (``SpoolFull``) by itself, in
  arrival order, so seq numbers keep every thread's own order. A failed commit (an I/O error, a
  closed spool) fails every append of that group, and only those: nothing of the group was stored.
- Bounded: an append that would take the spool past ``max_events`` records raises ``SpoolFull``
  and stores nothing. Nothing is ever dropped to make room.
- FIFO: each record gets ``seq``, an ever-increasing integer (AUTOINCREMENT, never reused, even
  after the spool was emptied); ``peek`` returns the oldest, and ``remove_through`` deletes the
  head up to a ``seq`` once the bus has acknowledged it. Nothing else deletes.
- Deletes: ``remove_through`` is committed without an fsync of its own (the next append's fsync
  covers it, the WAL being one sequential file). A deletion lost to a power cut only makes those
  records go to the bus again: at least once, as after a crash between the bus's acknowledgement
  and the deletion, and consumers dedupe by event_id.
- Shrinks: when a removal empties the spool and its file holds ``shrink_at_bytes`` or more of
  free pages (a backlog was sent on), the file is vacuumed and the WAL truncated, so an outage's
  backlog does not keep its disk space for good. Appends wait meanwhile (milliseconds: the spool
  is empty).
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

from foundation.sqlite import connect, ensure_schema, write_transaction
from ingest._group_commit import GroupCommit
from ingest.bus import BusUnavailable, check_records, check_topic_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 100_000
DEFAULT_SHRINK_AT_BYTES = 16 << 20
_LAYOUT_VERSION = 1
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS spool (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        key TEXT,
        value BLOB NOT NULL,
        spooled_at REAL NOT NULL)"""
]


class SpoolFull(BusUnavailable):
    """The spool holds ``max_events`` records already; nothing was stored."""

    def __init__(self, depth: int, max_events: int) -> None:
        super().__init__(f"the event spool is full: {depth} events are waiting for the bus (the limit is {max_events})")
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
        shrink_at_bytes: int = DEFAULT_SHRINK_AT_BYTES,
    ) -> None:
        """``max_events``: most records held (records). ``busy_timeout_s``: seconds to wait for the
        file's write lock. ``clock``: unix seconds, stamped on each record. ``shrink_at_bytes``: free
        space (bytes) that an emptied spool gives back to the disk (see "Shrinks")."""
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self._clock = clock
        self._shrink_at = shrink_at_bytes
        self._lock = threading.Lock()  # writes (both connections) and the depth
        self._read_lock = threading.Lock()  # the forwarder's connection
        self._appends: GroupCommit[tuple[float, list[tuple[str, str | None, bytes]]], list[int]] = GroupCommit(
            self._write
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_exclusively(self.path.with_name(self.path.name + ".lock"))
        try:
            self._conn: sqlite3.Connection | None = connect(
                self.path, synchronous="FULL", busy_timeout_s=busy_timeout_s
            )
            ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "spool")
            # The forwarder's side (peek, remove_through) has its own connection, so that reading the
            # head never holds up appends (WAL readers do not block the writer). Its deletes need
            # no fsync: see "Deletes" in the module docstring.
            self._reader: sqlite3.Connection | None = connect(
                self.path, synchronous="NORMAL", busy_timeout_s=busy_timeout_s
            )
            # The one writer is this object, so the depth is counted once and then kept here.
            self._depth: int = self._conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        except BaseException:
            self.close()
            raise
        if self._depth:
            logger.warning("spool %s holds %d events from before; they will be sent first", self.path, self._depth)

    def _reading(self) -> sqlite3.Connection:
        if self._reader is None:
            raise BusUnavailable(f"the spool at {self.path} is closed")
        return self._reader

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
        """Append (topic, key, value) records, durably, all or none, in this order; their ``seq`` numbers.

        Concurrent calls are committed together (see "Group commit" in the module docstring)."""
        for topic in {topic for topic, _, _ in records}:
            check_topic_name(topic)
        check_records([(key, value) for _, key, value in records])
        if not records:
            return []
        return self._appends.run((self._clock(), [(topic, key, bytes(value)) for topic, key, value in records]))

    def _write(
        self, appends: list[tuple[float, list[tuple[str, str | None, bytes]]]]
    ) -> list[list[int] | BaseException]:
        """One group commit: each append stored whole or refused whole, as if one after another."""
        with self._lock:
            if self._conn is None:
                return [BusUnavailable(f"the spool at {self.path} is closed") for _ in appends]
            depth = self._depth
            rows: list[tuple[str, str | None, bytes, float]] = []
            placed: list[range | SpoolFull] = []  # each append's rows, or why it was refused
            for now, records in appends:
                if depth + len(records) > self.max_events:
                    placed.append(SpoolFull(depth, self.max_events))
                    continue
                placed.append(range(len(rows), len(rows) + len(records)))
                rows += [(topic, key, value, now) for topic, key, value in records]
                depth += len(records)
            if not rows:  # every append was refused
                return [p if isinstance(p, SpoolFull) else [] for p in placed]
            try:
                if len(rows) <= _ROWS_PER_INSERT:
                    # One statement is its own transaction (autocommit): one call into SQLite, and
                    # the GIL, which the other threads are busy with, is given up and taken back once.
                    # No upgrade from a deferred read can fail: this object is the file's one writer.
                    last = _insert(self._conn, rows)
                else:
                    with write_transaction(self._conn):
                        last = _insert(self._conn, rows)
            except sqlite3.Error as exc:
                return [p if isinstance(p, SpoolFull) else _unwritable(self.path, exc) for p in placed]
            self._depth = depth
        # AUTOINCREMENT inside one write transaction: the rows got consecutive seqs, ending at `last`.
        first = last - len(rows) + 1
        return [p if isinstance(p, SpoolFull) else [first + i for i in p] for p in placed]

    def peek(self, limit: int) -> list[Spooled]:
        """The oldest ``limit`` records, oldest first."""
        with self._read_lock:
            rows = (
                self._reading()
                .execute("SELECT seq, topic, key, value, spooled_at FROM spool ORDER BY seq LIMIT ?", (limit,))
                .fetchall()
            )
        return [Spooled(seq, topic, key, bytes(value), at) for seq, topic, key, value, at in rows]

    def remove_through(self, seq: int) -> int:
        """Delete every record up to and including ``seq`` (the bus has them); how many went."""
        with self._lock, self._read_lock:
            # One statement, its own transaction (this object is the file's one writer), not fsync'd.
            removed = self._reading().execute("DELETE FROM spool WHERE seq <= ?", (seq,)).rowcount
            self._depth -= removed
            if removed and self._depth == 0:
                self._shrink(self._reading())
        return removed

    def _shrink(self, conn: sqlite3.Connection) -> None:
        (page_size,), (free,) = (
            conn.execute("PRAGMA page_size").fetchone(),
            conn.execute("PRAGMA freelist_count").fetchone(),
        )
        if free * page_size < self._shrink_at:
            return
        try:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # only disk space is at stake: never fail the forwarder for it
            logger.warning("could not shrink the spool %s: %s", self.path, exc)
        else:
            logger.info("spool %s emptied: gave %.1f MiB back to the disk", self.path, free * page_size / 2**20)

    def oldest_at(self) -> float | None:
        """When the oldest waiting record was appended (unix seconds), or None if the spool is empty."""
        with self._read_lock:
            row = self._reading().execute("SELECT spooled_at FROM spool ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the file and release the lock; idempotent."""
        with self._lock, self._read_lock:
            for name in ("_reader", "_conn"):
                if getattr(self, name, None) is not None:
                    getattr(self, name).close()
                    setattr(self, name, None)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ROWS_PER_INSERT = 200  # 4 parameters a row: well under SQLite's limit on parameters per statement


def _insert(conn: sqlite3.Connection, rows: list[tuple[str, str | None, bytes, float]]) -> int:
    """Insert rows in order with multi-row statements (one step each, not one per row); the last seq."""
    last = 0
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        cursor = conn.execute(
            "INSERT INTO spool (topic, key, value, spooled_at) VALUES " + ",".join(["(?, ?, ?, ?)"] * len(chunk)),
            [field for row in chunk for field in row],
        )
        assert cursor.lastrowid is not None  # an INSERT sets it
        last = cursor.lastrowid
    return last


def _unwritable(path: Path, exc: Exception) -> BusUnavailable:
    error = BusUnavailable(f"cannot write to the spool at {path}: {exc}")
    error.__cause__ = exc
    return error


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
