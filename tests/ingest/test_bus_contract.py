"""The bus contract, publishing side, on both backends: offsets, keys, partitions, topics, closing."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ingest.bus import BusUnavailable
from tests.ingest.conftest import both_backends
from tests.ingest.helpers import read_all

pytestmark = both_backends


def test_offsets_are_dense_and_records_come_back_in_order(bus: Any) -> None:
    bus.create_topics(["t"])
    published = [bus.publish("t", f"k{i}", f"v{i}".encode()) for i in range(25)]
    assert [r.offset for r in published] == list(range(25))
    assert all(r.partition == 0 and r.topic == "t" for r in published)
    assert read_all(bus, ["t"]) == published


def test_keys_values_and_timestamps_are_preserved(bus: Any) -> None:
    values = [b"", b"\x00\xff binary", "ünïcode".encode(), b"x" * 100_000]
    keys = ["resp-1", None, "ключ", "resp-1"]
    published = [bus.publish("t", k, v) for k, v in zip(keys, values)]
    got = read_all(bus, ["t"])
    assert [r.key for r in got] == keys
    assert [r.value for r in got] == values
    assert [r.timestamp for r in got] == [r.timestamp for r in published]
    assert all(isinstance(r.value, bytes) for r in got)


def test_topics_have_independent_offsets(bus: Any) -> None:
    bus.create_topics(["a", "b"])
    assert bus.publish("a", None, b"1").offset == 0
    assert bus.publish("a", None, b"2").offset == 1
    assert bus.publish("b", None, b"3").offset == 0
    assert bus.end_offsets(["a", "b", "missing"]) == {("a", 0): 2, ("b", 0): 1}


def test_publish_many_is_one_dense_batch(bus: Any) -> None:
    bus.publish("t", None, b"first")
    records = bus.publish_many("t", [(f"k{i}", bytes([i])) for i in range(10)])
    assert [r.offset for r in records] == list(range(1, 11))
    assert bus.publish_many("t", []) == []
    assert [r.value for r in read_all(bus, ["t"])][1:] == [bytes([i]) for i in range(10)]


def test_publish_batch_mixes_topics_and_keeps_each_partitions_order(bus: Any) -> None:
    bus.create_topics(["responses", "feedback"], partitions=2)
    items = [(topic, f"r{i % 3}", f"{topic}-{i}".encode()) for i in range(12) for topic in ("responses", "feedback")]
    records = bus.publish_batch(items)
    assert [(r.topic, r.key, r.value) for r in records] == items  # returned in input order
    for topic in ("responses", "feedback"):
        got = read_all(bus, [topic])
        assert sorted(r.value for r in got) == sorted(v for t, _, v in items if t == topic)
        for key in ("r0", "r1", "r2"):  # one key, one partition, publish order
            assert [r.value for r in got if r.key == key] == [v for t, k, v in items if t == topic and k == key]
    assert bus.publish_batch([]) == []


def test_create_topics_is_idempotent_and_publish_auto_creates(bus: Any) -> None:
    bus.create_topics(["t"], partitions=2)
    bus.create_topics(["t"], partitions=5)  # exists: kept with 2
    assert set(bus.end_offsets(["t"])) == {("t", 0), ("t", 1)}
    bus.publish("fresh", None, b"x")
    assert bus.end_offsets(["fresh"]) == {("fresh", 0): 1}


def test_same_key_same_partition_and_dense_offsets_per_partition(bus: Any) -> None:
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


def test_keyless_records_spread_over_partitions(bus: Any) -> None:
    bus.create_topics(["t"], partitions=2)
    assert {bus.publish("t", None, b"x").partition for _ in range(4)} == {0, 1}


def test_the_log_survives_reopening(open_test_bus: Callable[[], Any]) -> None:
    first = open_test_bus()
    first.publish_many("t", [("k", b"1"), ("k", b"2")])
    first.close()
    second = open_test_bus()
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
def test_publish_rejects_bad_arguments(bus: Any, topic: str, key: object, value: object, error: type) -> None:
    with pytest.raises(error):
        bus.publish(topic, key, value)
    assert bus.end_offsets(["t"]) == {}


def test_ping_and_closed_bus(open_test_bus: Callable[[], Any]) -> None:
    bus = open_test_bus()
    bus.ping()
    bus.close()
    bus.close()  # idempotent
    with pytest.raises(BusUnavailable):
        bus.ping()
    with pytest.raises(BusUnavailable):
        bus.publish("t", None, b"x")
    with pytest.raises(BusUnavailable):
        bus.consumer("g", ["t"])


def test_threads_publishing_through_one_bus(bus: Any) -> None:
    # The server publishes from a thread pool.
    with ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(lambda i: bus.publish("t", f"k{i}", str(i).encode()), range(200)))
    assert sorted(r.offset for r in records) == list(range(200))
    stored = read_all(bus, ["t"])
    assert sorted(int(r.value) for r in stored) == list(range(200))
    assert {r.offset: r.value for r in stored} == {r.offset: r.value for r in records}
