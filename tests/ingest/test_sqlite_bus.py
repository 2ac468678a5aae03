"""The embedded bus, publishing side: what only a file has (locks, deletion, layout versions), URLs.

The behaviour both backends share is in ``test_bus_contract.py``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ingest.bus import BusUnavailable, Record, open_bus
from ingest.sqlite_bus import SqliteBus
from testkit.waiting import wait_for


def read_all(bus: SqliteBus, topics: list[str], group: str = "reader") -> list[Record]:
    consumer = bus.consumer(group, topics)
    records: list[Record] = []
    while batch := consumer.poll(timeout_s=0):
        records.extend(batch)
    consumer.close()
    return records


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


@pytest.mark.parametrize("url", ["http://x", "bus.sqlite3", "sqlite://", "sqlite:///", "sqlite://:memory:"])
def test_open_bus_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        open_bus(url)


def test_ingest_imports_no_kafka_redis_http_or_torch() -> None:
    # The Kafka and Redis modules import their clients only when a KafkaBus or RedisLedger is made.
    code = (
        "import sys, ingest.bus, ingest.sqlite_bus, ingest.sqlite_consumer, ingest.events, serve.ledger,"
        " ingest.kafka_bus, ingest.kafka_consumer, serve.redis_ledger, ingest.spool, ingest.spooled_bus\n"
        "bad = sorted(m for m in ('kafka', 'redis', 'torch', 'fastapi', 'starlette', 'httpx') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_file_from_a_newer_version_is_refused(bus_path: Path) -> None:
    SqliteBus(bus_path).close()
    conn = sqlite3.connect(bus_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SqliteBus(bus_path)


def test_concurrent_publishes_share_commits_and_keep_each_call_whole_and_in_order(bus_path: Path) -> None:
    with SqliteBus(bus_path) as bus:

        def publisher(thread: int) -> list[list[Record]]:
            return [
                bus.publish_batch(
                    [("a" if j % 2 else "b", f"k{thread}", f"{thread}-{i}-{j}".encode()) for j in range(i % 3 + 1)]
                )
                for i in range(40)
            ]

        with ThreadPoolExecutor(12) as pool:
            acknowledged = list(pool.map(publisher, range(12)))
        stored = {(r.topic, r.offset): r.value for r in read_all(bus, ["a", "b"])}
        for topic in ("a", "b"):  # dense offsets, every record once
            assert sorted(o for t, o in stored if t == topic) == list(range(sum(t == topic for t, _ in stored)))
        assert len(stored) == sum(i % 3 + 1 for i in range(40)) * 12
        for thread, calls in enumerate(acknowledged):
            for i, records in enumerate(calls):
                assert [r.value for r in records] == [f"{thread}-{i}-{j}".encode() for j in range(i % 3 + 1)]
                assert all(stored[(r.topic, r.offset)] == r.value for r in records)  # what it said it stored
                for topic in ("a", "b"):  # a call's records of a topic are contiguous
                    offsets = [r.offset for r in records if r.topic == topic]
                    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True
            for topic in ("a", "b"):  # and each thread's calls are in its order
                offsets = [r.offset for records in calls for r in records if r.topic == topic]
                assert offsets == sorted(offsets)
        assert bus._publishes.groups < 12 * 40


def test_a_failed_group_commit_fails_only_the_publishes_of_that_group(bus_path: Path) -> None:
    with SqliteBus(bus_path) as bus, ThreadPoolExecutor(4) as pool:
        real, calls, holding, release = bus._append, [], threading.Event(), threading.Event()

        def append(conn: sqlite3.Connection, topic: str, items: list) -> list[Record]:
            calls.append(topic)
            if len(calls) == 1:  # hold the first commit open while the others queue behind it
                holding.set()
                assert release.wait(10)
            elif len(calls) == 2:  # and fail the second: the group of those that queued
                raise sqlite3.OperationalError("disk I/O error")
            return real(conn, topic, items)

        bus._append = append  # type: ignore[method-assign]
        first = pool.submit(bus.publish, "t", "k", b"first")
        assert holding.wait(10)
        doomed = []
        for value in (b"x", b"y"):
            doomed.append(pool.submit(bus.publish_many, "t", [("k", value), ("k", value)]))
            wait_for(
                lambda: len(bus._publishes._queue) >= len(doomed),
                what=f"{len(doomed)} publishes queued",
                timeout_s=10,
                interval_s=0.001,
            )
        release.set()
        assert first.result(10).offset == 0
        for future in doomed:
            with pytest.raises(BusUnavailable, match="disk I/O error"):
                future.result(10)
        assert bus.publish("t", "k", b"after").offset == 1  # nothing of the failed group was stored
        assert [r.value for r in read_all(bus, ["t"])] == [b"first", b"after"]
