"""The embedded bus: an append-only, durable log in one SQLite file, shared by processes.

Storage: one SQLite file in WAL mode with ``synchronous=FULL``. Records, topics, the groups'
committed offsets and the partition leases all live in it, so one file is the whole bus.
Several processes and threads may open it at once; SQLite's write lock serialises appends.

Publishing rules:

- ``publish`` returns only after the transaction holding its records is committed and the WAL
  fsync'd. An acknowledged record survives SIGKILL of any process (and power loss); an
  unacknowledged one is either wholly stored or absent, never torn.
- Group commit: publishes from several threads of one process at once share one transaction,
  hence one fsync (``ingest._group_commit``; the server publishes from a pool of request threads).
  Each call's records are still stored all or none, contiguously and in its order, and the call
  returns only once they are committed; calls of a group get offsets in the order they arrived.
  A failed commit fails every call of its group, and only those: nothing of the group is stored.
- Offsets of a (topic, partition) are dense, 0, 1, 2, …, assigned under the write lock, so a
  reader never sees offset n+1 before n, whichever process wrote them.
- Topics may have several partitions: a keyed record goes to ``crc32(key) % partitions`` (so a
  response and its feedback share one), a keyless one round-robin. Publishing to a topic that
  does not exist creates it with one partition, like Kafka's default broker setting.
- Retention (``enforce_retention``, rules in ``ingest.sqlite_retention``): records older than an
  age, or beyond a size per partition, are deleted oldest first, but never one that a consumer
  group knowing the topic has not committed past; offsets are never reused, and a consumer
  positioned below the earliest record reads from the earliest. Nothing is deleted unless some
  process runs it: ``kto-loop learn`` does, every ``KTO_RETENTION_EVERY_S``.

Reading (consumer groups, leases, at-least-once delivery) is in ``ingest.sqlite_consumer``.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from foundation.sqlite import connect, ensure_schema, write_transaction
from ingest._group_commit import GroupCommit
from ingest.bus import BusUnavailable, Record, TopicPartition, check_records, check_subscription, check_topic_name
from ingest.sqlite_consumer import SqliteConsumer, partition_counts
from ingest.sqlite_retention import RetentionReport, enforce_retention

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = 2  # 2: log_starts (retention); older code would reuse the offsets of deleted records
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS topics (
        name TEXT PRIMARY KEY,
        partitions INTEGER NOT NULL CHECK (partitions >= 1),
        created_at REAL NOT NULL)""",
    # A rowid table (not WITHOUT ROWID) because values can be several kilobytes; the UNIQUE
    # constraint is both the offset index and a guard against duplicate offsets.
    """CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        record_offset INTEGER NOT NULL,
        key TEXT,
        value BLOB NOT NULL,
        timestamp REAL NOT NULL,
        UNIQUE (topic, part, record_offset))""",
    """CREATE TABLE IF NOT EXISTS group_offsets (
        group_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        next_offset INTEGER NOT NULL,
        committed_at REAL NOT NULL,
        PRIMARY KEY (group_id, topic, part))""",
    # The earliest offset retention kept per partition: all below it are deleted. It keeps offsets
    # from being reused once retention has emptied a partition.
    """CREATE TABLE IF NOT EXISTS log_starts (
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        start_offset INTEGER NOT NULL,
        PRIMARY KEY (topic, part)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS leases (
        group_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (group_id, topic, part))""",
]


# After the last record, or where retention left off when it deleted them all.
_NEXT_OFFSET = """SELECT MAX(
    (SELECT COALESCE(MAX(record_offset) + 1, 0) FROM records WHERE topic = ?1 AND part = ?2),
    (SELECT COALESCE(MAX(start_offset), 0) FROM log_starts WHERE topic = ?1 AND part = ?2))"""

_ROWS_PER_INSERT = 150  # 6 parameters a row: well under SQLite's limit on parameters per statement


def _unpublished(call: list[tuple[str, str | None, bytes]], exc: sqlite3.Error) -> BusUnavailable:
    error = BusUnavailable(f"cannot publish to {', '.join(dict.fromkeys(topic for topic, _, _ in call))}: {exc}")
    error.__cause__ = exc
    return error


class SqliteBus:
    """The embedded bus on the SQLite file at ``path``; see the module docstring for its rules.

    Thread-safe: one connection, used under a lock (SQLite allows one writer at a time anyway).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        lease_s: float = 10.0,
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``lease_s``: seconds a consumer keeps its partitions without polling.
        ``busy_timeout_s``: seconds a write waits for another writer before BusUnavailable.
        ``clock``: unix seconds, for record timestamps and leases (tests pass a fake one).
        """
        self.path = Path(path)
        self._lease_s = lease_s
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._round_robin = itertools.count()
        self._publishes: GroupCommit[list[tuple[str, str | None, bytes]], list[Record]] = GroupCommit(self._write)
        try:
            self._conn: sqlite3.Connection | None = connect(
                self.path, synchronous="FULL", busy_timeout_s=busy_timeout_s, incremental_vacuum=True
            )
            ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "bus")
        except sqlite3.Error as exc:
            raise BusUnavailable(f"cannot open the bus at {self.path}: {exc}") from exc
        logger.info("embedded bus open at %s", self.path)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BusUnavailable(f"the bus at {self.path} is closed")
        return self._conn

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        """Create missing topics with ``partitions`` partitions; existing ones are kept as they are."""
        for topic in topics:
            check_topic_name(topic)
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        with self._lock:
            conn = self._connection()
            try:
                with write_transaction(conn):
                    existing = partition_counts(conn, list(topics)) if topics else {}
                    for topic in topics:
                        if topic in existing:
                            if existing[topic] != partitions:
                                logger.warning(
                                    "topic %s exists with %d partitions, not %d; keeping it",
                                    topic,
                                    existing[topic],
                                    partitions,
                                )
                            continue
                        conn.execute(
                            "INSERT INTO topics (name, partitions, created_at) VALUES (?, ?, ?)",
                            (topic, partitions, self._clock()),
                        )
                        logger.info("created topic %s with %d partition(s)", topic, partitions)
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot create topics: {exc}") from exc

    def publish(self, topic: str, key: str | None, value: bytes) -> Record:
        """Append one record; durable (committed and fsync'd) when this returns."""
        return self.publish_many(topic, [(key, value)])[0]

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        """Append (key, value) records in one transaction: all stored durably, or none."""
        check_topic_name(topic)
        check_records(items)
        if not items:
            return []
        return self._publishes.run([(topic, key, bytes(value)) for key, value in items])

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        """Append (topic, key, value) records in one transaction: all stored durably, or none."""
        for topic, _, _ in items:
            check_topic_name(topic)
        check_records([(key, value) for _, key, value in items])
        if not items:
            return []
        return self._publishes.run([(topic, key, bytes(value)) for topic, key, value in items])

    def _write(self, calls: list[list[tuple[str, str | None, bytes]]]) -> list[list[Record] | BaseException]:
        """One group commit: every call's records, call after call, in one transaction."""
        items = [item for call in calls for item in call]
        by_topic: dict[str, list[int]] = {}
        for i, (topic, _, _) in enumerate(items):
            by_topic.setdefault(topic, []).append(i)
        records: list[Record] = [None] * len(items)  # type: ignore[list-item]
        with self._lock:
            try:
                conn = self._connection()
                with write_transaction(conn):
                    for topic, positions in by_topic.items():
                        appended = self._append(conn, topic, [items[i][1:] for i in positions])
                        for i, record in zip(positions, appended):
                            records[i] = record
            except sqlite3.Error as exc:
                return [_unpublished(call, exc) for call in calls]
            except BusUnavailable as exc:  # closed
                return [BusUnavailable(str(exc)) for _ in calls]
        outcomes: list[list[Record] | BaseException] = []
        start = 0
        for call in calls:
            outcomes.append(records[start : start + len(call)])
            start += len(call)
        return outcomes

    def _append(self, conn: sqlite3.Connection, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        """Assign offsets and insert; runs inside the write transaction, so MAX+1 is race-free."""
        if conn.execute(
            "INSERT OR IGNORE INTO topics (name, partitions, created_at) VALUES (?, 1, ?)", (topic, self._clock())
        ).rowcount:
            logger.info("created topic %s on first publish (1 partition)", topic)
        partitions = partition_counts(conn, [topic])[topic]
        now = self._clock()
        next_offset: dict[int, int] = {}
        records = []
        for key, value in items:
            if key is not None:
                partition = zlib.crc32(key.encode("utf-8")) % partitions
            else:
                partition = next(self._round_robin) % partitions
            if partition not in next_offset:
                next_offset[partition] = conn.execute(_NEXT_OFFSET, (topic, partition)).fetchone()[0]
            records.append(Record(topic, partition, next_offset[partition], key, bytes(value), now))
            next_offset[partition] += 1
        rows = [(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in records]
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            # Multi-row statements: one call into SQLite per chunk rather than one per record.
            chunk = rows[start : start + _ROWS_PER_INSERT]
            conn.execute(
                "INSERT INTO records (topic, part, record_offset, key, value, timestamp) VALUES "
                + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [field for row in chunk for field in row],
            )
        return records

    def consumer(self, group_id: str, topics: list[str]) -> SqliteConsumer:
        """A new member of ``group_id`` reading ``topics``, with its own connection."""
        check_subscription(group_id, topics)
        self._connection()  # a closed bus makes no consumers
        return SqliteConsumer(
            self.path,
            group_id,
            list(topics),
            lease_s=self._lease_s,
            busy_timeout_s=self._busy_timeout_s,
            clock=self._clock,
        )

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        """Next offset per partition of each existing topic; unknown topics are left out."""
        if not topics:
            return {}
        with self._lock:
            conn = self._connection()
            try:
                counts = partition_counts(conn, list(topics))
                if not counts:
                    return {}
                ends = {(t, p): 0 for t, n in counts.items() for p in range(n)}
                marks = ",".join("?" * len(counts))
                starts = conn.execute(
                    f"SELECT topic, part, start_offset FROM log_starts WHERE topic IN ({marks})", list(counts)
                ).fetchall()
                rows = conn.execute(
                    "SELECT topic, part, MAX(record_offset) + 1 FROM records"
                    f" WHERE topic IN ({marks}) GROUP BY topic, part",
                    list(counts),
                ).fetchall()
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot read end offsets: {exc}") from exc
        ends.update({(t, p): start for t, p, start in starts if (t, p) in ends})  # emptied by retention
        ends.update({(t, p): end for t, p, end in rows})
        return ends

    def enforce_retention(self, *, max_age_s: float | None, max_bytes: int | None) -> RetentionReport:
        """Delete what is older than ``max_age_s`` (seconds) or beyond ``max_bytes`` (bytes of keys
        and values per partition), never what a group has not committed past, then shrink the file;
        None leaves that limit off. Runs on a connection of its own (``ingest.sqlite_retention``)."""
        self._connection()  # a closed bus deletes nothing
        try:
            return enforce_retention(
                self.path,
                max_age_s=max_age_s,
                max_bytes=max_bytes,
                now=self._clock(),
                busy_timeout_s=self._busy_timeout_s,
            )
        except sqlite3.Error as exc:
            raise BusUnavailable(f"cannot enforce retention on {self.path}: {exc}") from exc

    def delete_group(self, group_id: str) -> bool:
        """Forget a consumer group: its committed offsets and leases (as ``kafka-consumer-groups
        --delete``), so that it no longer holds retention back. True if it existed.

        Refused (``ValueError``) while a member holds a live lease, as Kafka refuses a non-empty group."""
        with self._lock:
            conn = self._connection()
            try:
                with write_transaction(conn):
                    live = conn.execute(
                        "SELECT owner FROM leases WHERE group_id = ? AND expires_at > ? LIMIT 1",
                        (group_id, self._clock()),
                    ).fetchone()
                    if live is not None:
                        raise ValueError(f"group {group_id} has a live member ({live[0]}); stop it first")
                    found = conn.execute("DELETE FROM group_offsets WHERE group_id = ?", (group_id,)).rowcount
                    found += conn.execute("DELETE FROM leases WHERE group_id = ?", (group_id,)).rowcount
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot delete group {group_id}: {exc}") from exc
        if found:
            logger.info("deleted consumer group %s", group_id)
        return bool(found)

    def ping(self) -> None:
        """Raise BusUnavailable unless the file is there and readable."""
        with self._lock:
            conn = self._connection()
            # An unlinked file still answers queries through the open handle, so look for it.
            if not self.path.exists():
                raise BusUnavailable(f"the bus file {self.path} is gone")
            try:
                conn.execute("SELECT COUNT(*) FROM topics").fetchone()
            except sqlite3.Error as exc:
                raise BusUnavailable(f"the bus at {self.path} is unusable: {exc}") from exc

    def close(self) -> None:
        """Close the connection; idempotent. Consumers made by this bus stay open."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
