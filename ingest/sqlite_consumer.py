"""Consumers of the embedded bus (``ingest.sqlite_bus``) and their delivery rules.

- A consumer's position starts at its group's committed offset (or 0); ``poll`` advances the
  position but never commits. ``commit`` stores the NEXT offset to read, as Kafka does. A
  position below the earliest record that retention kept reads from that record on (Kafka's
  ``auto.offset.reset=earliest``); retention never deletes what a group has not committed past
  (``ingest.sqlite_retention``), so only a new group, a seek or a lower commit gets there.
- Delivery is at least once: records polled but not committed are delivered again (to the
  same group) after a crash, a ``close``, or a lost lease. Consumers must therefore be idempotent
  by ``event_id``, and should commit only once the records' effects are durable.
- Within a group each topic-partition is leased to one consumer at a time. ``poll`` takes and
  renews the lease (it lasts ``lease_s``, 10 s by default). A consumer that stops polling for
  longer may lose its partitions to another member, which starts again from the committed
  offset; if nobody took them meanwhile, they stay its own. ``close`` releases them at once. A
  commit for a partition that another live member now holds is skipped with a warning: its
  records will be re-delivered to that member.
- Different groups read independently.
- Leases and committed offsets live in the bus file, so they hold across processes.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from foundation.sqlite import connect, write_transaction
from ingest.bus import BusUnavailable, Record, TopicPartition, check_topic_name

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.05

# Take the lease if it is free, expired, or already ours; leave it alone if another member holds it.
_TAKE_LEASE = """
    INSERT INTO leases (group_id, topic, part, owner, expires_at) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (group_id, topic, part) DO UPDATE
    SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE leases.owner = excluded.owner OR leases.expires_at <= ?"""


def partition_counts(conn: sqlite3.Connection, topics: list[str]) -> dict[str, int]:
    """Partitions per existing topic among ``topics`` (shared with ``ingest.sqlite_bus``)."""
    marks = ",".join("?" * len(topics))
    rows = conn.execute(f"SELECT name, partitions FROM topics WHERE name IN ({marks})", topics)
    return dict(rows.fetchall())


def _committed(conn: sqlite3.Connection, group_id: str, tp: TopicPartition) -> int | None:
    row = conn.execute(
        "SELECT next_offset FROM group_offsets WHERE group_id = ? AND topic = ? AND part = ?", (group_id, *tp)
    ).fetchone()
    return None if row is None else row[0]


class SqliteConsumer:
    """One member of a consumer group on the embedded bus; see the module docstring for its rules.

    Thread-safe, though a consumer is normally driven by one loop.
    """

    def __init__(
        self,
        path: Path,
        group_id: str,
        topics: list[str],
        *,
        lease_s: float,
        busy_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.group_id = group_id
        self.topics = list(dict.fromkeys(topics))
        self.member_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._owned: dict[TopicPartition, float] = {}  # partition -> when our lease runs out
        self._positions: dict[TopicPartition, int] = {}  # next offset to return
        self._rotation = 0
        try:
            self._conn: sqlite3.Connection | None = connect(path, synchronous="FULL", busy_timeout_s=busy_timeout_s)
        except sqlite3.Error as exc:
            raise BusUnavailable(f"cannot open the bus at {path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BusUnavailable("this consumer is closed")
        return self._conn

    @property
    def assignment(self) -> set[TopicPartition]:
        """The partitions this consumer holds a lease on."""
        with self._lock:
            return set(self._owned)

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        """Records after our position on the partitions we hold, in offset order per partition.

        Waits up to ``timeout_s`` (checking every 50 ms) and returns ``[]`` if nothing came.
        """
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            with self._lock:
                conn = self._connection()
                try:
                    self._renew_leases(conn)
                    records = self._fetch(conn, max_records)
                except sqlite3.Error as exc:
                    raise BusUnavailable(f"cannot poll: {exc}") from exc
            left = deadline - time.monotonic()
            if records or left <= 0:
                return records
            time.sleep(min(_POLL_INTERVAL_S, left))

    def _renew_leases(self, conn: sqlite3.Connection) -> None:
        """Take free partitions, renew ours when half-spent, and drop those another member took."""
        now = self._clock()
        counts = partition_counts(conn, self.topics)
        wanted = [(t, p) for t in self.topics for p in range(counts.get(t, 0))]
        rows = conn.execute("SELECT topic, part, owner, expires_at FROM leases WHERE group_id = ?", (self.group_id,))
        leases = {(t, p): (owner, expires) for t, p, owner, expires in rows.fetchall()}
        to_take = []
        for tp in wanted:
            owner, expires = leases.get(tp, (None, 0.0))
            mine = owner == self.member_id
            if mine and expires - now > self._lease_s / 2:
                continue
            if not mine and owner is not None and expires > now:
                self._lose(tp, f"held by {owner}")
                continue
            if not mine:
                # Someone else held it since we last did (or it was never ours): start afresh.
                self._lose(tp, "lease was taken over meanwhile")
            to_take.append(tp)
        if not to_take:
            return
        with write_transaction(conn):
            for tp in to_take:
                cur = conn.execute(_TAKE_LEASE, (self.group_id, *tp, self.member_id, now + self._lease_s, now))
                if cur.rowcount != 1:
                    self._lose(tp, "another member took it first")
                    continue
                if tp not in self._owned:
                    if tp not in self._positions:  # else a seek() chose the start
                        self._positions[tp] = _committed(conn, self.group_id, tp) or 0
                    logger.info(
                        "consumer %s of group %s took %s[%d] at offset %d",
                        self.member_id,
                        self.group_id,
                        tp[0],
                        tp[1],
                        self._positions[tp],
                    )
                self._owned[tp] = now + self._lease_s

    def _lose(self, tp: TopicPartition, why: str) -> None:
        if self._owned.pop(tp, None) is not None:
            # Uncommitted records will be re-delivered to whoever holds it next.
            self._positions.pop(tp, None)
            logger.warning("consumer %s of group %s lost %s[%d]: %s", self.member_id, self.group_id, tp[0], tp[1], why)

    def _fetch(self, conn: sqlite3.Connection, max_records: int) -> list[Record]:
        owned = sorted(self._owned)
        if not owned:
            return []
        # Start at a different partition each poll so a busy one cannot starve the rest.
        start = self._rotation % len(owned)
        self._rotation += 1
        records: list[Record] = []
        for tp in owned[start:] + owned[:start]:
            room = max_records - len(records)
            if room <= 0:
                break
            rows = conn.execute(
                "SELECT record_offset, key, value, timestamp FROM records"
                " WHERE topic = ? AND part = ? AND record_offset >= ? ORDER BY record_offset LIMIT ?",
                (*tp, self._positions[tp], room),
            ).fetchall()
            records.extend(Record(tp[0], tp[1], off, key, bytes(value), ts) for off, key, value, ts in rows)
            if rows:
                self._positions[tp] = rows[-1][0] + 1
        return records

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Store the group's next offset per partition; ``None`` commits our current positions.

        A partition that another live member holds is skipped with a warning.
        """
        with self._lock:
            conn = self._connection()
            if offsets is None:
                offsets = {tp: pos for tp, pos in self._positions.items() if tp in self._owned}
            for (topic, partition), offset in offsets.items():
                check_topic_name(topic)
                if not isinstance(offset, int) or offset < 0 or not isinstance(partition, int) or partition < 0:
                    raise ValueError(f"invalid commit {topic}[{partition}] -> {offset!r}")
            if not offsets:
                return
            now = self._clock()
            try:
                with write_transaction(conn):
                    for tp, offset in offsets.items():
                        if not self._may_commit(conn, tp, now):
                            continue
                        conn.execute(
                            "INSERT INTO group_offsets (group_id, topic, part, next_offset, committed_at)"
                            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, part) DO UPDATE"
                            " SET next_offset = excluded.next_offset, committed_at = excluded.committed_at",
                            (self.group_id, *tp, offset, now),
                        )
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot commit: {exc}") from exc

    def _may_commit(self, conn: sqlite3.Connection, tp: TopicPartition, now: float) -> bool:
        """False if another live member holds ``tp``; renews our own lease as a side effect."""
        row = conn.execute(
            "SELECT owner, expires_at FROM leases WHERE group_id = ? AND topic = ? AND part = ?", (self.group_id, *tp)
        ).fetchone()
        if row is None or (row[0] != self.member_id and row[1] <= now):
            return True  # nobody holds it: the commit is safe, and takes no lease
        if row[0] == self.member_id:
            # Still ours even if expired, since nobody took it: a long pause between polls is fine.
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE group_id = ? AND topic = ? AND part = ?",
                (now + self._lease_s, self.group_id, *tp),
            )
            if tp in self._owned:
                self._owned[tp] = now + self._lease_s
            return True
        logger.warning(
            "group %s: not committing %s[%d], now held by %s (its records will be re-delivered there)",
            self.group_id,
            tp[0],
            tp[1],
            row[0],
        )
        self._lose(tp, f"held by {row[0]}")
        return False

    def committed(self, topic: str, partition: int = 0) -> int | None:
        """The group's committed next offset for the partition, or None."""
        with self._lock:
            conn = self._connection()
            try:
                return _committed(conn, self.group_id, (topic, partition))
            except sqlite3.Error as exc:
                raise BusUnavailable(f"cannot read committed offset: {exc}") from exc

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Make the next poll of the partition start at ``offset``; commits nothing."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with self._lock:
            self._positions[(topic, partition)] = offset

    def close(self) -> None:
        """Release our leases so another member can take over at once; idempotent. Commits nothing."""
        with self._lock:
            if self._conn is None:
                return
            try:
                with write_transaction(self._conn):
                    self._conn.execute(
                        "DELETE FROM leases WHERE group_id = ? AND owner = ?", (self.group_id, self.member_id)
                    )
            except sqlite3.Error as exc:
                # The leases will expire on their own.
                logger.warning("consumer %s could not release its leases: %s", self.member_id, exc)
            self._conn.close()
            self._conn = None
            self._owned.clear()

    def __enter__(self) -> SqliteConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
