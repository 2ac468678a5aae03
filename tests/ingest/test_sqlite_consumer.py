"""The embedded bus, reading side: positions, commits, groups, leases, seeks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ingest.bus import BusUnavailable, Record
from ingest.sqlite_bus import SqliteBus
from ingest import sqlite_consumer
from ingest.sqlite_consumer import SqliteConsumer



def values(records: list[Record]) -> list[bytes]:
    return [r.value for r in records]


def fill(bus: SqliteBus, topic: str, n: int, start: int = 0) -> None:
    bus.publish_many(topic, [(f"k{i}", str(i).encode()) for i in range(start, start + n)])


def drain(consumer: SqliteConsumer, max_records: int = 500) -> list[Record]:
    out: list[Record] = []
    while batch := consumer.poll(timeout_s=0, max_records=max_records):
        out.extend(batch)
    return out


def nums(*ints: int) -> list[bytes]:
    return [str(i).encode() for i in ints]


def test_new_group_starts_at_the_earliest_record(bus: SqliteBus) -> None:
    fill(bus, "t", 5)
    consumer = bus.consumer("g", ["t"])
    assert consumer.committed("t") is None
    assert values(consumer.poll(timeout_s=0)) == nums(0, 1, 2, 3, 4)
    assert consumer.poll(timeout_s=0) == []


def test_poll_respects_max_records_and_keeps_order(bus: SqliteBus) -> None:
    fill(bus, "t", 10)
    consumer = bus.consumer("g", ["t"])
    batches = [consumer.poll(timeout_s=0, max_records=4) for _ in range(3)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [r.offset for b in batches for r in b] == list(range(10))
    with pytest.raises(ValueError):
        consumer.poll(max_records=0)


def test_poll_times_out_empty_and_wakes_up_for_new_records(bus: SqliteBus) -> None:
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


def test_commit_and_restart_resume_from_the_committed_offset(bus: SqliteBus) -> None:
    fill(bus, "t", 10)
    first = bus.consumer("g", ["t"])
    assert len(first.poll(timeout_s=0, max_records=6)) == 6
    first.commit()  # current position: 6
    assert first.committed("t", 0) == 6
    first.close()

    second = bus.consumer("g", ["t"])
    assert values(drain(second)) == nums(6, 7, 8, 9)


def test_uncommitted_records_are_redelivered(bus_path: Path) -> None:
    with SqliteBus(bus_path) as bus:
        fill(bus, "t", 10)
        crashed = bus.consumer("g", ["t"])
        assert len(drain(crashed)) == 10
        crashed.commit({("t", 0): 4})  # processed only 0..3 durably
        crashed.close()
    # A new process (new bus object) picks up where the commit says.
    with SqliteBus(bus_path) as bus:
        restarted = bus.consumer("g", ["t"])
        assert restarted.committed("t") == 4
        assert values(drain(restarted)) == nums(4, 5, 6, 7, 8, 9)


def test_commit_does_not_move_the_position(bus: SqliteBus) -> None:
    fill(bus, "t", 5)
    consumer = bus.consumer("g", ["t"])
    consumer.poll(timeout_s=0, max_records=2)
    consumer.commit({("t", 0): 0})
    assert values(consumer.poll(timeout_s=0)) == nums(2, 3, 4)
    assert consumer.committed("t") == 0


def test_commit_rejects_bad_offsets(bus: SqliteBus) -> None:
    consumer = bus.consumer("g", ["t"])
    for bad in ({("t", 0): -1}, {("t", -1): 0}, {("t", 0): "3"}):
        with pytest.raises(ValueError):
            consumer.commit(bad)  # type: ignore[arg-type]
    assert consumer.committed("t") is None


def test_groups_are_independent(bus: SqliteBus) -> None:
    fill(bus, "t", 3)
    a, b = bus.consumer("learner", ["t"]), bus.consumer("audit", ["t"])
    assert values(drain(a)) == nums(0, 1, 2)
    a.commit()
    assert values(drain(b)) == nums(0, 1, 2)
    assert b.committed("t") is None and a.committed("t") == 3
    fill(bus, "t", 1, start=3)
    assert values(drain(a)) == values(drain(b)) == nums(3)


def test_consumer_reads_several_topics(bus: SqliteBus) -> None:
    fill(bus, "responses", 3)
    fill(bus, "feedback", 2)
    consumer = bus.consumer("g", ["responses", "feedback", "not-yet"])
    got = drain(consumer)
    assert sorted((r.topic, r.offset) for r in got) == [
        ("feedback", 0), ("feedback", 1), ("responses", 0), ("responses", 1), ("responses", 2)
    ]
    fill(bus, "not-yet", 1)  # created after subscribing: picked up on the next poll
    assert [(r.topic, r.value) for r in consumer.poll(timeout_s=0)] == [("not-yet", b"0")]
    consumer.commit()
    assert (consumer.committed("responses"), consumer.committed("feedback"), consumer.committed("not-yet")) == (3, 2, 1)


def test_all_partitions_are_consumed_in_order(bus: SqliteBus) -> None:
    bus.create_topics(["t"], partitions=3)
    published = [bus.publish("t", f"key{i}", str(i).encode()) for i in range(30)]
    consumer = bus.consumer("g", ["t"])
    got = drain(consumer, max_records=4)
    assert sorted(got, key=lambda r: int(r.value)) == published
    for p in range(3):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == sorted(offsets)
    consumer.commit()
    ends = bus.end_offsets(["t"])
    assert {tp: consumer.committed(*tp) for tp in ends} == ends


def test_second_consumer_of_a_group_waits_until_the_first_closes(bus: SqliteBus) -> None:
    fill(bus, "t", 5)
    first, second = bus.consumer("g", ["t"]), bus.consumer("g", ["t"])
    assert values(first.poll(timeout_s=0, max_records=3)) == nums(0, 1, 2)
    first.commit()
    fill(bus, "t", 1, start=5)
    assert second.poll(timeout_s=0.1) == []
    assert second.assignment == set() and first.assignment == {("t", 0)}
    first.close()
    # Starts from the group's commit: 3 and 4 were polled by `first` but never committed.
    assert values(drain(second)) == nums(3, 4, 5)
    assert second.assignment == {("t", 0)}


def test_a_consumer_that_stops_polling_loses_its_partition(bus_path: Path, clock: Any) -> None:
    bus = SqliteBus(bus_path, lease_s=10.0, clock=clock)
    fill(bus, "t", 4)
    stalled, standby = bus.consumer("g", ["t"]), bus.consumer("g", ["t"])
    assert values(stalled.poll(timeout_s=0, max_records=2)) == nums(0, 1)
    stalled.commit()
    clock.advance(5.0)
    assert standby.poll(timeout_s=0) == []  # lease still live
    clock.advance(6.0)  # 11 s since the last renewal
    assert values(drain(standby)) == nums(2, 3)
    standby.commit()
    # The stalled member's commit is refused, and it gets nothing more.
    stalled.commit({("t", 0): 1})
    assert standby.committed("t") == 4
    assert stalled.poll(timeout_s=0) == []
    assert stalled.assignment == set()
    bus.close()


def test_polling_renews_the_lease(bus_path: Path, clock: Any) -> None:
    bus = SqliteBus(bus_path, lease_s=10.0, clock=clock)
    fill(bus, "t", 1)
    active, standby = bus.consumer("g", ["t"]), bus.consumer("g", ["t"])
    assert len(active.poll(timeout_s=0)) == 1
    for _ in range(5):  # 30 s in all, but never 10 s without a poll
        clock.advance(6.0)
        active.poll(timeout_s=0)
        assert standby.poll(timeout_s=0) == []
    bus.close()


def test_a_long_pause_without_a_rival_keeps_the_position(bus_path: Path, clock: Any) -> None:
    # E.g. a learner that trains for a minute between polls: no re-delivery if nobody took over.
    bus = SqliteBus(bus_path, lease_s=10.0, clock=clock)
    fill(bus, "t", 4)
    consumer = bus.consumer("g", ["t"])
    assert values(consumer.poll(timeout_s=0, max_records=2)) == nums(0, 1)
    clock.advance(60.0)
    consumer.commit()
    assert consumer.committed("t") == 2
    clock.advance(60.0)
    assert values(consumer.poll(timeout_s=0)) == nums(2, 3)
    bus.close()


def test_seek_rewinds_and_skips(bus: SqliteBus) -> None:
    fill(bus, "t", 6)
    consumer = bus.consumer("g", ["t"])
    consumer.seek("t", 0, 4)  # before the first poll: overrides the start
    assert values(drain(consumer)) == nums(4, 5)
    consumer.seek("t", 0, 1)
    assert values(drain(consumer)) == nums(1, 2, 3, 4, 5)
    assert consumer.committed("t") is None  # seek commits nothing
    with pytest.raises(ValueError):
        consumer.seek("t", 0, -1)


def test_close_is_idempotent_and_final(bus: SqliteBus) -> None:
    consumer = bus.consumer("g", ["t"])
    consumer.close()
    consumer.close()
    with pytest.raises(BusUnavailable):
        consumer.poll(timeout_s=0)


def test_consumer_arguments_are_checked(bus: SqliteBus) -> None:
    with pytest.raises(TypeError):
        bus.consumer("g", "t")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bus.consumer("", ["t"])
    with pytest.raises(ValueError):
        bus.consumer("g", [])
    with pytest.raises(ValueError):
        bus.consumer("g", ["no spaces"])


def test_a_lease_taken_between_check_and_write_is_respected(bus: SqliteBus, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(bus, "t", 2)
    slow, rival = bus.consumer("g", ["t"]), bus.consumer("g", ["t"])
    real = sqlite_consumer.write_transaction

    def rival_gets_in_first(conn: Any) -> Any:
        # `slow` has seen the partition free; before it writes, `rival` takes it.
        monkeypatch.setattr(sqlite_consumer, "write_transaction", real)
        assert values(rival.poll(timeout_s=0)) == nums(0, 1)
        return real(conn)

    monkeypatch.setattr(sqlite_consumer, "write_transaction", rival_gets_in_first)
    assert slow.poll(timeout_s=0) == []
    assert slow.assignment == set() and rival.assignment == {("t", 0)}
