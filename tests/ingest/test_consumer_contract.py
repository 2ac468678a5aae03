"""The bus contract, reading side, on both backends: positions, commits, groups, seeks, closing.

What differs by design (leases on the embedded bus, group rebalances on Kafka) is tested in
``test_sqlite_consumer.py`` and ``test_kafka_bus.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ingest.bus import BusUnavailable
from tests.ingest.conftest import both_backends
from tests.ingest.helpers import batches, drain, fill, nums, quiet, take, values

pytestmark = both_backends


def test_new_group_starts_at_the_earliest_record(bus: Any) -> None:
    fill(bus, "t", 5)
    consumer = bus.consumer("g", ["t"])
    assert consumer.committed("t") is None
    assert values(take(consumer, 5)) == nums(0, 1, 2, 3, 4)
    assert quiet(consumer) == []


def test_poll_respects_max_records_and_keeps_order(bus: Any) -> None:
    fill(bus, "t", 10)
    consumer = bus.consumer("g", ["t"])
    got = batches(consumer, 10, max_records=4)
    assert all(1 <= len(b) <= 4 for b in got)
    assert [r.offset for b in got for r in b] == list(range(10))
    with pytest.raises(ValueError):
        consumer.poll(max_records=0)


def test_poll_times_out_empty_and_wakes_up_for_new_records(bus: Any) -> None:
    bus.create_topics(["t"])
    consumer = bus.consumer("g", ["t"])
    assert consumer.poll(timeout_s=0.1) == []
    publisher = threading.Timer(0.2, lambda: bus.publish("t", "k", b"late"))
    publisher.start()
    started = time.monotonic()
    got = consumer.poll(timeout_s=20)
    publisher.join()
    assert values(got) == [b"late"]
    assert time.monotonic() - started < 20  # returned on arrival, not at the timeout


def test_commit_and_restart_resume_from_the_committed_offset(bus: Any) -> None:
    fill(bus, "t", 10)
    first = bus.consumer("g", ["t"])
    assert len(take(first, 6, max_records=6)) == 6
    first.commit()  # current position: 6
    assert first.committed("t", 0) == 6
    first.close()

    second = bus.consumer("g", ["t"])
    assert values(drain(bus, second, ["t"])) == nums(6, 7, 8, 9)


def test_uncommitted_records_are_redelivered(open_test_bus: Callable[[], Any]) -> None:
    bus = open_test_bus()
    fill(bus, "t", 10)
    crashed = bus.consumer("g", ["t"])
    assert len(take(crashed, 10)) == 10
    crashed.commit({("t", 0): 4})  # processed only 0..3 durably
    crashed.close()
    bus.close()
    # A new process (new bus object) picks up where the commit says.
    bus = open_test_bus()
    restarted = bus.consumer("g", ["t"])
    assert restarted.committed("t") == 4
    assert values(drain(bus, restarted, ["t"])) == nums(4, 5, 6, 7, 8, 9)


def test_commit_does_not_move_the_position(bus: Any) -> None:
    fill(bus, "t", 5)
    consumer = bus.consumer("g", ["t"])
    take(consumer, 2, max_records=2)
    consumer.commit({("t", 0): 0})
    assert values(take(consumer, 3)) == nums(2, 3, 4)
    assert consumer.committed("t") == 0


def test_commit_rejects_bad_offsets(bus: Any) -> None:
    consumer = bus.consumer("g", ["t"])
    for bad in ({("t", 0): -1}, {("t", -1): 0}, {("t", 0): "3"}):
        with pytest.raises(ValueError):
            consumer.commit(bad)
    assert consumer.committed("t") is None


def test_groups_are_independent(bus: Any) -> None:
    fill(bus, "t", 3)
    a, b = bus.consumer("learner", ["t"]), bus.consumer("audit", ["t"])
    assert values(drain(bus, a, ["t"])) == nums(0, 1, 2)
    a.commit()
    assert values(drain(bus, b, ["t"])) == nums(0, 1, 2)
    assert b.committed("t") is None and a.committed("t") == 3
    fill(bus, "t", 1, start=3)
    assert values(take(a, 1)) == values(take(b, 1)) == nums(3)


def test_consumer_reads_several_topics(bus: Any) -> None:
    fill(bus, "responses", 3)
    fill(bus, "feedback", 2)
    consumer = bus.consumer("g", ["responses", "feedback", "not-yet"])
    got = take(consumer, 5)
    assert sorted((r.topic, r.offset) for r in got) == [
        ("feedback", 0),
        ("feedback", 1),
        ("responses", 0),
        ("responses", 1),
        ("responses", 2),
    ]
    fill(bus, "not-yet", 1)  # created after subscribing: picked up by a later poll
    assert [(r.topic, r.value) for r in take(consumer, 1)] == [("not-yet", b"0")]
    consumer.commit()
    assert (consumer.committed("responses"), consumer.committed("feedback"), consumer.committed("not-yet")) == (3, 2, 1)


def test_all_partitions_are_consumed_in_order(bus: Any) -> None:
    bus.create_topics(["t"], partitions=3)
    published = [bus.publish("t", f"key{i}", str(i).encode()) for i in range(30)]
    consumer = bus.consumer("g", ["t"])
    got = take(consumer, 30, max_records=4)
    assert quiet(consumer) == []
    assert sorted(got, key=lambda r: int(r.value)) == published
    for p in range(3):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == sorted(offsets)
    consumer.commit()
    ends = bus.end_offsets(["t"])
    assert {tp: consumer.committed(*tp) for tp in ends} == ends


def test_seek_rewinds_and_skips(bus: Any) -> None:
    fill(bus, "t", 6)
    consumer = bus.consumer("g", ["t"])
    consumer.seek("t", 0, 4)  # before the first poll: overrides the start
    assert values(take(consumer, 2)) == nums(4, 5)
    assert quiet(consumer) == []
    consumer.seek("t", 0, 1)
    assert values(take(consumer, 5)) == nums(1, 2, 3, 4, 5)
    assert quiet(consumer) == []
    assert consumer.committed("t") is None  # seek commits nothing
    with pytest.raises(ValueError):
        consumer.seek("t", 0, -1)


def test_close_is_idempotent_and_final(bus: Any) -> None:
    consumer = bus.consumer("g", ["t"])
    consumer.close()
    consumer.close()
    with pytest.raises(BusUnavailable):
        consumer.poll(timeout_s=0)


def test_consumer_arguments_are_checked(bus: Any) -> None:
    with pytest.raises(TypeError):
        bus.consumer("g", "t")
    with pytest.raises(ValueError):
        bus.consumer("", ["t"])
    with pytest.raises(ValueError):
        bus.consumer("g", [])
    with pytest.raises(ValueError):
        bus.consumer("g", ["no spaces"])
