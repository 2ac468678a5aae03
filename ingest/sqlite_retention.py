"""Retention of the embedded bus (``ingest.sqlite_bus``): old records deleted as Kafka's
``retention.ms`` and ``retention.bytes`` delete them, except what a consumer group still has to read.

The rules, per (topic, partition):

- By age: records appended more than ``max_age_s`` ago go, oldest first. The first record young
  enough stops the cut (a clock that stepped back cannot punch a hole), so what is kept is always
  one dense range of offsets, from the earliest kept to the end.
- By size: while the partition's keys and values take more than ``max_bytes``, its oldest records
  go. Per partition, as Kafka's ``retention.bytes``: the file holds at most about partitions x
  ``max_bytes``, plus SQLite's own overhead (indexes, pages not yet given back).
- Never past a group: records at or above the lowest committed offset of the groups that know the
  topic stay. A group knows a topic once it has committed on, or holds a lease on, any of its
  partitions; a partition such a group never committed on counts as committed at 0 (the group
  will read it from the start), so nothing of it goes. A topic no group knows is cut by age and
  size alone, as Kafka cuts it (the dead-letter topic, unless something reads it). What would go
  but a group holds is reported per (topic, group) in ``RetentionReport.held_back``; a group gone
  for good is forgotten with ``SqliteBus.delete_group``.
- Offsets stay dense and are never reused: the earliest kept offset of each partition is recorded
  (``log_starts``), so a partition that retention emptied goes on at its next offset. A consumer
  whose position lies below the earliest record reads from the earliest, as Kafka's
  ``auto.offset.reset=earliest`` would have it.
- Deletions go in chunks of ``CHUNK_RECORDS``, one transaction each, reading the groups' offsets
  again in each, so publishers wait for one chunk at most and a commit made meanwhile is obeyed.
- Then the file shrinks: free pages go back to the filesystem and the WAL is truncated
  (``foundation.sqlite.shrink``; a file from before layout 2 is switched over by one VACUUM).

Who runs it: the process that owns the log's writes, on a schedule, on a connection of its own;
``kto-loop learn`` does (``learner.housekeeping``), so that serving never waits for it.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from foundation.sqlite import connect, file_bytes, shrink, write_transaction

logger = logging.getLogger(__name__)

CHUNK_RECORDS = 5_000
"""Records deleted per transaction: a few tens of milliseconds of the write lock."""

# The newest record that does not fit in max_bytes, counting from the newest down: it and every
# older one go. Sizes are bytes of key (as UTF-8) and value; length() of a BLOB reads no content.
_SIZE_CUT = """
    SELECT record_offset FROM (
        SELECT record_offset,
               SUM(LENGTH(value) + COALESCE(LENGTH(CAST(key AS BLOB)), 0)) OVER (ORDER BY record_offset DESC) AS kept
        FROM records WHERE topic = ? AND part = ?)
    WHERE kept > ? ORDER BY record_offset DESC LIMIT 1"""


@dataclass
class RetentionReport:
    """What one pass did."""

    deleted: dict[str, int] = field(default_factory=dict)
    """Records deleted, per topic (every topic of the bus, 0 where nothing went)."""
    held_back: dict[tuple[str, str], int] = field(default_factory=dict)
    """(topic, group) -> records that retention would delete but the group has not committed past."""
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    """The file and its WAL, before and after the pass (bytes)."""


def enforce_retention(
    path: Path, *, max_age_s: float | None, max_bytes: int | None, now: float, busy_timeout_s: float = 10.0
) -> RetentionReport:
    """One pass over every partition of the bus at ``path`` (see the module docstring).

    ``max_age_s``: seconds a record is kept (None: no limit by age); ``max_bytes``: bytes of keys
    and values kept per partition (None: no limit by size); ``now``: unix seconds.
    """
    report = RetentionReport(file_bytes_before=file_bytes(path))
    conn = connect(path, synchronous="FULL", busy_timeout_s=busy_timeout_s)
    try:
        partitions = conn.execute("SELECT name, partitions FROM topics ORDER BY name").fetchall()
        for topic, count in partitions:
            report.deleted[topic] = 0
            for part in range(count):
                want = _wanted_cut(conn, topic, part, max_age_s, max_bytes, now)
                if want is None:
                    continue
                start, cut = want
                for group, offset in _committed(conn, topic, part).items():
                    if offset < cut:
                        held = report.held_back.get((topic, group), 0)
                        report.held_back[(topic, group)] = held + cut - max(offset, start)
                report.deleted[topic] += _delete_below(conn, topic, part, start, cut)
        if any(report.deleted.values()):
            shrink(conn)
    finally:
        conn.close()
    report.file_bytes_after = file_bytes(path)
    deleted = sum(report.deleted.values())
    if deleted or report.held_back:
        logger.info(
            "bus retention deleted %d records (%s), file %d -> %d bytes; held back by groups: %s",
            deleted,
            {t: n for t, n in report.deleted.items() if n},
            report.file_bytes_before,
            report.file_bytes_after,
            {f"{t}/{g}": n for (t, g), n in report.held_back.items()} or "none",
        )
    return report


def _wanted_cut(
    conn: sqlite3.Connection, topic: str, part: int, max_age_s: float | None, max_bytes: int | None, now: float
) -> tuple[int, int] | None:
    """(earliest offset, first offset to keep) when age or size asks to delete something, else None."""
    start, end = conn.execute(
        "SELECT MIN(record_offset), MAX(record_offset) + 1 FROM records WHERE topic = ? AND part = ?", (topic, part)
    ).fetchone()
    if start is None:
        return None
    cut = start
    if max_age_s is not None:
        young = conn.execute(
            "SELECT record_offset FROM records WHERE topic = ? AND part = ? AND timestamp >= ?"
            " ORDER BY record_offset LIMIT 1",
            (topic, part, now - max_age_s),
        ).fetchone()
        cut = max(cut, end if young is None else young[0])
    if max_bytes is not None:
        too_much = conn.execute(_SIZE_CUT, (topic, part, max_bytes)).fetchone()
        cut = max(cut, 0 if too_much is None else too_much[0] + 1)
    return (start, cut) if cut > start else None


def _committed(conn: sqlite3.Connection, topic: str, part: int) -> dict[str, int]:
    """Every group that knows ``topic`` -> its committed offset on ``part`` (0 if it never committed there)."""
    rows = conn.execute(
        "SELECT g.group_id, COALESCE(o.next_offset, 0) FROM"
        " (SELECT group_id FROM group_offsets WHERE topic = ?1 UNION SELECT group_id FROM leases WHERE topic = ?1) g"
        " LEFT JOIN group_offsets o ON o.group_id = g.group_id AND o.topic = ?1 AND o.part = ?2",
        (topic, part),
    )
    return dict(rows.fetchall())


def _delete_below(conn: sqlite3.Connection, topic: str, part: int, start: int, cut: int) -> int:
    """Delete offsets [start, cut) but none at or above a group's committed offset; the count deleted."""
    deleted, low = 0, start
    while low < cut:
        with write_transaction(conn):
            # Read again in each chunk's transaction: a group may have committed lower meanwhile.
            floor = min(_committed(conn, topic, part).values(), default=cut)
            high = min(cut, floor, low + CHUNK_RECORDS)
            if high <= low:
                break
            deleted += conn.execute(
                "DELETE FROM records WHERE topic = ? AND part = ? AND record_offset < ?", (topic, part, high)
            ).rowcount
            conn.execute(
                "INSERT INTO log_starts (topic, part, start_offset) VALUES (?, ?, ?) ON CONFLICT (topic, part)"
                " DO UPDATE SET start_offset = MAX(start_offset, excluded.start_offset)",
                (topic, part, high),
            )
        low = high
    return deleted
