"""Retention of the embedded bus: by age and by size, never past a group, dense offsets, a file
that shrinks, and publishers in other processes that lose nothing acknowledged."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from foundation.sqlite import file_bytes
from ingest.bus import Record
from ingest.sqlite_bus import SqliteBus
from tests.tiny import FakeClock

Spawn = Callable[..., "subprocess.Popen[str]"]
DAY = 24 * 3600.0


@pytest.fixture
def bus(bus_path: Path, clock: FakeClock) -> Iterator[SqliteBus]:
    with SqliteBus(bus_path, clock=clock) as bus:
        yield bus


def read_all(bus: SqliteBus, topics: list[str]) -> list[Record]:
    """Every record kept, read by a fresh member of a group that then leaves (and is forgotten)."""
    consumer = bus.consumer("reader", topics)
    records: list[Record] = []
    while batch := consumer.poll(timeout_s=0):
        records.extend(batch)
    consumer.close()
    return records


def offsets(records: list[Record]) -> list[int]:
    return [r.offset for r in records]


def publish(bus: SqliteBus, topic: str, n: int, size: int = 10) -> list[Record]:
    return bus.publish_many(topic, [(None, b"x" * size) for _ in range(n)])


def test_records_older_than_the_age_go_oldest_first(bus: SqliteBus, clock: FakeClock) -> None:
    publish(bus, "t", 10)
    clock.advance(2 * DAY)
    young = publish(bus, "t", 5)
    report = bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert report.deleted == {"t": 10} and report.held_back == {}
    assert read_all(bus, ["t"]) == young
    assert bus.publish("t", None, b"next").offset == 15  # offsets go on, never reused


def test_the_oldest_records_go_until_the_partition_fits_the_size(bus: SqliteBus) -> None:
    records = publish(bus, "t", 20, size=1000)
    bus.enforce_retention(max_age_s=None, max_bytes=5500)  # 5 records of 1000 bytes fit, 6 do not
    assert read_all(bus, ["t"]) == records[-5:]
    bus.enforce_retention(max_age_s=None, max_bytes=5500)  # nothing more to do
    assert read_all(bus, ["t"]) == records[-5:]


def test_each_partition_is_bounded_on_its_own(bus: SqliteBus) -> None:
    bus.create_topics(["t"], partitions=2)
    records = bus.publish_many("t", [(f"key-{i}", b"x" * 100) for i in range(40)])
    bus.enforce_retention(max_age_s=None, max_bytes=300)
    kept = read_all(bus, ["t"])
    for partition in (0, 1):
        mine = [r for r in records if r.partition == partition]
        assert len(mine) > 3  # 40 keys did not all hash to one partition
        assert [r for r in kept if r.partition == partition] == mine[-2:]  # 2 x (100 + 6) bytes fit, 3 do not


def test_nothing_a_group_has_not_committed_past_is_deleted_and_what_it_holds_is_reported(
    bus: SqliteBus, clock: FakeClock
) -> None:
    records = publish(bus, "t", 20)
    slow, fast = bus.consumer("slow", ["t"]), bus.consumer("fast", ["t"])
    slow.commit({("t", 0): 3})
    fast.commit({("t", 0): 20})
    clock.advance(2 * DAY)
    report = bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert report.deleted == {"t": 3}
    assert report.held_back == {("t", "slow"): 17}
    assert read_all(bus, ["t"]) == records[3:]
    slow.commit({("t", 0): 12})
    report = bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert report.held_back == {("t", "slow"): 8}
    assert read_all(bus, ["t"]) == records[12:]
    assert slow.poll(timeout_s=0) == records[12:]  # the slow group reads on where it left off
    slow.commit()
    assert bus.enforce_retention(max_age_s=DAY, max_bytes=None).held_back == {}
    assert read_all(bus, ["t"]) == []
    slow.close()
    fast.close()


def test_a_group_that_never_committed_holds_the_topic_while_a_topic_nobody_reads_is_cut(
    bus: SqliteBus, clock: FakeClock
) -> None:
    bus.create_topics(["read", "unread"], partitions=2)
    read = bus.publish_many("read", [(f"k{i}", b"x") for i in range(20)])
    publish(bus, "unread", 10)
    member = bus.consumer("g", ["read"])
    assert member.poll(timeout_s=0)  # holds leases on both partitions, has committed nothing
    clock.advance(2 * DAY)
    report = bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert report.deleted == {"read": 0, "unread": 10}
    assert report.held_back == {("read", "g"): 20}
    # Committing one partition does not release the other: the group will read it from the start.
    mine = [r for r in read if r.partition == 0]
    member.commit({("read", 0): mine[-1].offset + 1})
    bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert sorted(offsets(read_all(bus, ["read"]))) == sorted(r.offset for r in read if r.partition == 1)
    member.close()


def test_an_emptied_partition_keeps_its_offsets_across_reopening(bus_path: Path, clock: FakeClock) -> None:
    with SqliteBus(bus_path, clock=clock) as bus:
        publish(bus, "t", 7)
        clock.advance(2 * DAY)
        bus.enforce_retention(max_age_s=DAY, max_bytes=None)
        assert read_all(bus, ["t"]) == []
        assert bus.end_offsets(["t"]) == {("t", 0): 7}
    with SqliteBus(bus_path, clock=clock) as bus:
        assert bus.end_offsets(["t"]) == {("t", 0): 7}
        assert bus.publish("t", None, b"after").offset == 7
        assert offsets(read_all(bus, ["t"])) == [7]


def test_a_consumer_positioned_before_the_earliest_record_starts_at_the_earliest(
    bus: SqliteBus, clock: FakeClock
) -> None:
    publish(bus, "t", 10)
    clock.advance(2 * DAY)
    kept = publish(bus, "t", 3)
    bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    late = bus.consumer("late", ["t"])  # a new group: no committed offset
    assert late.poll(timeout_s=0) == kept
    late.close()
    stale = bus.consumer("stale", ["t"])
    stale.commit({("t", 0): 4})  # committed below the earliest record
    assert stale.poll(timeout_s=0) == kept
    stale.seek("t", 0, 0)
    assert stale.poll(timeout_s=0) == kept
    stale.close()


def test_the_file_shrinks_after_a_big_deletion(bus: SqliteBus, bus_path: Path, clock: FakeClock) -> None:
    for _ in range(20):
        publish(bus, "t", 100, size=10_000)  # 20 MB
    clock.advance(2 * DAY)
    kept = publish(bus, "t", 1)
    grown = file_bytes(bus_path)
    assert grown > 20_000_000
    report = bus.enforce_retention(max_age_s=DAY, max_bytes=None)
    assert report.deleted == {"t": 2000}
    assert report.file_bytes_before == grown
    assert file_bytes(bus_path) == report.file_bytes_after < 1_000_000  # the database and its WAL
    assert read_all(bus, ["t"]) == kept


def test_a_file_from_before_retention_is_migrated_and_shrinks_too(bus_path: Path, clock: FakeClock) -> None:
    with SqliteBus(bus_path, clock=clock) as bus:
        publish(bus, "t", 500, size=10_000)
    # Make it a layout-1 file as the previous version wrote it: no auto_vacuum, no log_starts.
    conn = sqlite3.connect(bus_path, isolation_level=None)
    conn.execute("DROP TABLE log_starts")
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.execute("PRAGMA user_version = 1")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    with SqliteBus(bus_path, clock=clock) as bus:
        clock.advance(2 * DAY)
        kept = publish(bus, "t", 1)
        grown = file_bytes(bus_path)
        bus.enforce_retention(max_age_s=DAY, max_bytes=None)
        assert file_bytes(bus_path) < grown / 10
        assert read_all(bus, ["t"]) == kept
        assert bus.publish("t", None, b"x").offset == 501
    conn = sqlite3.connect(bus_path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_deleting_a_group_releases_what_it_held(bus: SqliteBus, clock: FakeClock) -> None:
    publish(bus, "t", 5)
    gone = bus.consumer("gone", ["t"])
    gone.poll(timeout_s=0)
    with pytest.raises(ValueError, match="live member"):
        bus.delete_group("gone")  # as Kafka, not while a member runs
    gone.commit({("t", 0): 1})
    gone.close()
    clock.advance(2 * DAY)
    assert bus.enforce_retention(max_age_s=DAY, max_bytes=None).held_back == {("t", "gone"): 4}
    assert bus.delete_group("gone") and not bus.delete_group("gone")
    assert bus.enforce_retention(max_age_s=DAY, max_bytes=None).deleted == {"t": 4}


def test_retention_beside_writer_processes_loses_nothing_acknowledged(
    bus: SqliteBus, bus_url: str, tmp_path: Path, spawn_worker: Spawn
) -> None:
    """Two processes publish while this one reads, commits and runs retention that would keep
    nothing (1 byte): every acknowledged record is read once, at its offset, none reused."""
    bus.create_topics(["t"])
    go = tmp_path / "go"
    writers = {tag: spawn_worker("writer", bus_url, "t", tag, 300, batch, go) for tag, batch in (("a", 1), ("b", 7))}
    for child in writers.values():
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    reader = bus.consumer("reader", ["t"])
    got: list[Record] = []
    deleted_meanwhile = 0
    go.touch()
    while True:
        running = any(child.poll() is None for child in writers.values())
        batch = reader.poll(timeout_s=0.05, max_records=50)
        got += batch
        reader.commit()
        deleted = bus.enforce_retention(max_age_s=None, max_bytes=1).deleted["t"]
        deleted_meanwhile += deleted if running else 0
        if not running and not batch:  # the writers are done and everything is read
            break
    acked = {}
    for tag, child in writers.items():
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        for line in out.splitlines():
            offset, i = line.split()
            acked[int(offset)] = f"{tag}-{i}"
    assert deleted_meanwhile > 0  # retention did run while they published
    assert sorted(acked) == list(range(600))  # dense, none reused, though retention ran all along
    assert offsets(got) == list(range(600))
    assert all(r.key == acked[r.offset] for r in got)
    reader.commit()
    bus.enforce_retention(max_age_s=None, max_bytes=1)
    assert read_all(bus, ["t"]) == [] and bus.end_offsets(["t"]) == {("t", 0): 600}
    reader.close()
