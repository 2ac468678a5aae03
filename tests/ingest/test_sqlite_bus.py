"""The embedded bus, publishing side: offsets, keys, partitions, durability errors, URLs."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.bus import BusUnavailable, Record, open_bus
from ingest.sqlite_bus import SqliteBus


def read_all(bus: SqliteBus, topics: list[str], group: str = "reader") -> list[Record]:
    consumer = bus.consumer(group, topics)
    records: list[Record] = []
    while batch := consumer.poll(timeout_s=0):
        records.extend(batch)
    consumer.close()
    return records


def test_offsets_are_dense_and_records_come_back_in_order(bus: SqliteBus) -> None:
    bus.create_topics(["t"])
    published = [bus.publish("t", f"k{i}", f"v{i}".encode()) for i in range(25)]
    assert [r.offset for r in published] == list(range(25))
    assert all(r.partition == 0 and r.topic == "t" for r in published)
    assert read_all(bus, ["t"]) == published


def test_keys_values_and_timestamps_are_preserved(bus: SqliteBus) -> None:
    values = [b"", b"\x00\xff binary", "ünïcode".encode(), b"x" * 100_000]
    keys = ["resp-1", None, "ключ", "resp-1"]
    published = [bus.publish("t", k, v) for k, v in zip(keys, values)]
    got = read_all(bus, ["t"])
    assert [r.key for r in got] == keys
    assert [r.value for r in got] == values
    assert [r.timestamp for r in got] == [r.timestamp for r in published]
    assert all(isinstance(r.value, bytes) for r in got)


def test_topics_have_independent_offsets(bus: SqliteBus) -> None:
    bus.create_topics(["a", "b"])
    assert bus.publish("a", None, b"1").offset == 0
    assert bus.publish("a", None, b"2").offset == 1
    assert bus.publish("b", None, b"3").offset == 0
    assert bus.end_offsets(["a", "b", "missing"]) == {("a", 0): 2, ("b", 0): 1}


def test_publish_many_is_one_dense_batch(bus: SqliteBus) -> None:
    bus.publish("t", None, b"first")
    records = bus.publish_many("t", [(f"k{i}", bytes([i])) for i in range(10)])
    assert [r.offset for r in records] == list(range(1, 11))
    assert bus.publish_many("t", []) == []
    assert [r.value for r in read_all(bus, ["t"])][1:] == [bytes([i]) for i in range(10)]


def test_create_topics_is_idempotent_and_publish_auto_creates(bus: SqliteBus) -> None:
    bus.create_topics(["t"], partitions=2)
    bus.create_topics(["t"], partitions=5)  # exists: kept with 2
    assert set(bus.end_offsets(["t"])) == {("t", 0), ("t", 1)}
    bus.publish("fresh", None, b"x")
    assert bus.end_offsets(["fresh"]) == {("fresh", 0): 1}


def test_same_key_same_partition_and_dense_offsets_per_partition(bus: SqliteBus) -> None:
    bus.create_topics(["t"], partitions=3)
    published = [bus.publish("t", f"resp-{i % 7}", f"{i}".encode()) for i in range(60)]
    partition_of: dict[str, int] = {}
    for r in published:
        assert partition_of.setdefault(r.key, r.partition) == r.partition
    assert len(set(partition_of.values())) > 1  # 7 keys did not all hash to one partition
    by_partition: dict[int, list[int]] = {}
    for r in published:
        by_partition.setdefault(r.partition, []).append(r.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    assert bus.end_offsets(["t"]) == {("t", p): len(by_partition.get(p, [])) for p in range(3)}
    assert sorted(read_all(bus, ["t"]), key=lambda r: int(r.value)) == published


def test_keyless_records_spread_over_partitions(bus: SqliteBus) -> None:
    bus.create_topics(["t"], partitions=2)
    assert {bus.publish("t", None, b"x").partition for _ in range(4)} == {0, 1}


def test_the_log_survives_reopening(bus_path: Path) -> None:
    with SqliteBus(bus_path) as first:
        first.publish_many("t", [("k", b"1"), ("k", b"2")])
    with SqliteBus(bus_path) as second:
        assert second.publish("t", "k", b"3").offset == 2
        assert [r.value for r in read_all(second, ["t"])] == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    ("topic", "key", "value", "error"),
    [
        ("t", "k", "not bytes", TypeError),
        ("t", 5, b"v", TypeError),
        ("bad topic", "k", b"v", ValueError),
        ("", "k", b"v", ValueError),
    ],
)
def test_publish_rejects_bad_arguments(bus: SqliteBus, topic: str, key: object, value: object, error: type) -> None:
    with pytest.raises(error):
        bus.publish(topic, key, value)  # type: ignore[arg-type]
    assert bus.end_offsets(["t"]) == {}


def test_publish_raises_bus_unavailable_when_the_file_stays_locked(bus_path: Path) -> None:
    bus = SqliteBus(bus_path, busy_timeout_s=0.2)
    bus.publish("t", None, b"before")
    blocker = sqlite3.connect(bus_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BusUnavailable):
            bus.publish("t", None, b"blocked")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Nothing half-written; the bus works again once the lock is gone.
    assert bus.publish("t", None, b"after").offset == 1
    assert [r.value for r in read_all(bus, ["t"])] == [b"before", b"after"]
    bus.close()


def test_ping_and_closed_bus(bus_path: Path) -> None:
    bus = SqliteBus(bus_path)
    bus.ping()
    bus.close()
    bus.close()  # idempotent
    with pytest.raises(BusUnavailable):
        bus.ping()
    with pytest.raises(BusUnavailable):
        bus.publish("t", None, b"x")


def test_ping_notices_a_deleted_file(bus_path: Path) -> None:
    with SqliteBus(bus_path) as bus:
        bus_path.unlink()
        with pytest.raises(BusUnavailable):
            bus.ping()


def test_open_bus_with_absolute_path_creates_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "bus.sqlite3"
    bus = open_bus(f"sqlite:///{path}")  # SQLAlchemy's convention: four slashes for an absolute path
    assert isinstance(bus, SqliteBus) and bus.path == path
    bus.publish("t", None, b"x")
    bus.close()
    assert path.is_file()
    with open_bus(f"sqlite:///{path}") as again:
        assert again.end_offsets(["t"]) == {("t", 0): 1}


def test_open_bus_with_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_bus("sqlite:///data/bus.sqlite3") as bus:
        bus.ping()
    assert (tmp_path / "data" / "bus.sqlite3").is_file()


def test_open_bus_kafka_is_not_available_yet() -> None:
    with pytest.raises(ValueError, match="Kafka backend is not available yet"):
        open_bus("kafka://127.0.0.1:9092")


@pytest.mark.parametrize("url", ["http://x", "bus.sqlite3", "sqlite://", "sqlite:///", "sqlite://:memory:"])
def test_open_bus_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        open_bus(url)


def test_ingest_imports_no_kafka_http_or_torch() -> None:
    code = (
        "import sys, ingest.bus, ingest.sqlite_bus, ingest.sqlite_consumer, ingest.events, ingest.ledger\n"
        "bad = sorted(m for m in ('kafka', 'torch', 'fastapi', 'starlette', 'httpx') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_threads_publishing_through_one_bus(bus: SqliteBus) -> None:
    # The server publishes from a thread pool.
    with ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(lambda i: bus.publish("t", f"k{i}", str(i).encode()), range(200)))
    assert sorted(r.offset for r in records) == list(range(200))
    stored = read_all(bus, ["t"])
    assert sorted(int(r.value) for r in stored) == list(range(200))
    assert {r.offset: r.value for r in stored} == {r.offset: r.value for r in records}


def test_a_file_from_a_newer_version_is_refused(bus_path: Path) -> None:
    SqliteBus(bus_path).close()
    conn = sqlite3.connect(bus_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SqliteBus(bus_path)
