"""The embedded bus, reading side: partition leases (who reads a partition of a group, and when).

The behaviour both backends share is in ``test_consumer_contract.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest import sqlite_consumer
from ingest.bus import Record
from ingest.sqlite_bus import SqliteBus
from ingest.sqlite_consumer import SqliteConsumer
from tests.ingest.helpers import fill, nums, values


def drain(consumer: SqliteConsumer, max_records: int = 500) -> list[Record]:
    out: list[Record] = []
    while batch := consumer.poll(timeout_s=0, max_records=max_records):
        out.extend(batch)
    return out


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
