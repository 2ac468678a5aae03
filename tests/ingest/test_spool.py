"""The spool and the spooled bus: order, the bound, outages, and durability across a SIGKILL.

The bus behind the spool here is the embedded one, wrapped in ``FlakyBus`` so that a test can
take it down, make it fail half way through a send, or make it hang like an unreachable Kafka.
The Kafka path is tested end to end in ``tests/serve/test_kafka_outage.py``.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ingest import spool as spool_module
from ingest.bus import BusUnavailable, Record
from ingest.spool import Spool, SpoolFull, SpoolLocked
from ingest.spooled_bus import SPOOLED, SpooledBus
from ingest.sqlite_bus import SqliteBus
from testkit.waiting import wait_for

WAIT_S = 30.0


class FlakyBus:
    """A SqliteBus that a test can take down, break half way through a send, or make hang."""

    def __init__(self, path: Path) -> None:
        self.inner = SqliteBus(path)
        self.down = False
        self.fail_after: int | None = None  # store this many records of the next send, then fail
        self.hang = threading.Event()  # set: every call blocks until it is cleared
        self.sends: list[list[tuple[str, bytes]]] = []  # acknowledged sends: (topic, value) each, in order
        self.created: list[str] = []

    def _check(self) -> None:
        while self.hang.is_set():
            time.sleep(0.01)
        if self.down:
            raise BusUnavailable("the test took the bus down")

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        self._check()
        if self.fail_after is not None:
            stored, self.fail_after = items[: self.fail_after], None
            self.inner.publish_batch(stored)
            raise BusUnavailable(f"failed after {len(stored)} records")
        records = self.inner.publish_batch(items)
        self.sends.append([(topic, value) for topic, _, value in items])
        return records

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        return self.publish_batch([(topic, key, value) for key, value in items])

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        self._check()
        self.inner.create_topics(topics, partitions)
        self.created += topics

    def ping(self) -> None:
        self._check()

    def close(self) -> None:
        """Left open: the fixture closes it (several spooled buses of one test share it)."""

    def values(self, topic: str) -> list[bytes]:
        """Everything on ``topic``, in offset order."""
        consumer = self.inner.consumer("check", [topic])
        got: list[bytes] = []
        while batch := consumer.poll(timeout_s=0):
            got += [r.value for r in batch]
        consumer.close()
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[FlakyBus]:
    bus = FlakyBus(tmp_path / "bus.sqlite3")
    yield bus
    bus.hang.clear()
    bus.inner.close()


@pytest.fixture
def make_spooled(tmp_path: Path, flaky: FlakyBus) -> Iterator[Callable[..., SpooledBus]]:
    """make_spooled(max_events=100) -> a SpooledBus on ``flaky`` and tmp_path/spool.sqlite3; closed at teardown."""
    made: list[SpooledBus] = []

    def make(max_events: int = 100, **kw: Any) -> SpooledBus:
        options = {"min_backoff_s": 0.01, "max_backoff_s": 0.05, **kw}
        made.append(SpooledBus(flaky, Spool(tmp_path / "spool.sqlite3", max_events=max_events), **options))
        return made[-1]

    yield make
    for spooled in made:
        spooled.close(drain_timeout_s=0)


def nums(*ints: int) -> list[bytes]:
    return [str(i).encode() for i in ints]


def test_records_reach_the_bus_in_spool_order_across_topics(make_spooled: Callable, flaky: FlakyBus) -> None:
    spooled = make_spooled()
    flaky.hang.set()  # hold the forwarder so that it finds one batch of several topics
    spooled.publish_many("a", [("k", b"0"), ("k", b"1")])
    spooled.publish("b", "k", b"2")
    record = spooled.publish("a", "k", b"3")
    assert (record.partition, record.offset) == (SPOOLED, SPOOLED)
    flaky.hang.clear()
    assert spooled.flush(WAIT_S)
    # What waited goes as one send, in spool order, whatever the topics (a backlog costs one round trip).
    sent = [item for send in flaky.sends for item in send]
    assert sent == [("a", b"0"), ("a", b"1"), ("b", b"2"), ("a", b"3")]
    assert len(flaky.sends) <= 2  # the forwarder may have picked up the first two before the others came
    assert flaky.values("a") == nums(0, 1, 3) and flaky.values("b") == nums(2)
    assert spooled.status().depth == 0 and spooled.status().sent == 4


def test_a_healthy_bus_gets_each_record_without_waiting_for_more(make_spooled: Callable, flaky: FlakyBus) -> None:
    spooled = make_spooled()
    for i in range(20):
        spooled.publish("a", "k", str(i).encode())
        wait_for(lambda: spooled.status().depth == 0, what="the record sent", timeout_s=WAIT_S, interval_s=0.01)
    assert flaky.values("a") == nums(*range(20))


def test_publishing_never_waits_for_a_hanging_bus(make_spooled: Callable, flaky: FlakyBus) -> None:
    spooled = make_spooled()
    flaky.hang.set()  # like Kafka while its broker is unreachable: calls block for its timeout
    started = time.monotonic()
    for i in range(10):
        spooled.publish("a", "k", str(i).encode())
    assert time.monotonic() - started < 2.0
    assert spooled.status().depth == 10
    flaky.hang.clear()
    assert spooled.flush(WAIT_S) and flaky.values("a") == nums(*range(10))


def test_an_outage_is_ridden_out_and_everything_goes_in_order_once(make_spooled: Callable, flaky: FlakyBus) -> None:
    flaky.down = True
    spooled = make_spooled()
    spooled.create_topics(["a", "b"], partitions=2)  # remembered until the bus answers
    for i in range(30):
        spooled.publish("a" if i % 3 else "b", "k", str(i).encode())
    wait_for(lambda: spooled.status().bus_up is False, what="the outage noticed", timeout_s=WAIT_S, interval_s=0.01)
    status = spooled.status()
    assert (status.depth, status.sent) == (30, 0) and "took the bus down" in status.last_error
    assert status.oldest_age_s >= 0
    flaky.down = False
    assert spooled.flush(WAIT_S)
    assert flaky.created == ["a", "b"]
    assert flaky.values("a") == nums(*(i for i in range(30) if i % 3))
    assert flaky.values("b") == nums(*(i for i in range(30) if not i % 3))
    assert spooled.status().bus_up is True and spooled.status().last_error is None


def test_a_send_that_fails_half_way_is_resent_and_duplicates_keep_the_order(
    make_spooled: Callable, flaky: FlakyBus
) -> None:
    flaky.hang.set()
    spooled = make_spooled()
    spooled.publish_many("a", [("k", v) for v in nums(0, 1, 2, 3)])
    flaky.fail_after = 2
    flaky.hang.clear()
    assert spooled.flush(WAIT_S)
    # At least once: the stored head comes again, and nothing is lost or reordered.
    assert flaky.values("a") == nums(0, 1, 0, 1, 2, 3)


def test_the_bound_refuses_whole_batches_and_frees_as_records_leave(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3", max_events=3) as spool:
        assert spool.append("a", [("k", b"0"), ("k", b"1")]) == [1, 2]
        with pytest.raises(SpoolFull, match=r"2 events are waiting for the bus.*limit is 3"):
            spool.append("a", [("k", b"2"), ("k", b"3")])  # all or none
        spool.check_room(1)
        spool.append("a", [("k", b"2")])
        with pytest.raises(SpoolFull):
            spool.check_room(1)
        assert [s.value for s in spool.peek(10)] == nums(0, 1, 2)
        assert spool.remove_through(2) == 2 and spool.depth == 1
        assert spool.append("a", [("k", b"3")]) == [4]  # seq never goes back
        assert [(s.seq, s.value) for s in spool.peek(10)] == [(3, b"2"), (4, b"3")]


def test_an_emptied_spool_gives_its_backlogs_disk_space_back(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with Spool(path, shrink_at_bytes=1 << 20) as spool:
        for _ in range(40):  # a 4 MiB backlog
            spool.append("t", [(None, bytes(1024))] * 100)
        size = lambda: path.stat().st_size + path.with_name(path.name + "-wal").stat().st_size
        backlog = size()
        assert backlog > 4 << 20
        last = spool.peek(4000)[-1].seq
        spool.remove_through(last - 1)  # not empty yet: nothing shrinks
        assert size() >= backlog
        spool.remove_through(last)
        assert size() < 256 << 10 and spool.depth == 0
        assert spool.append("t", [(None, b"after")]) == [last + 1]  # seq numbers are never reused
        assert [r.value for r in spool.peek(10)] == [b"after"]


def test_a_full_spool_refuses_publishes_and_says_so(make_spooled: Callable, flaky: FlakyBus) -> None:
    flaky.down = True
    spooled = make_spooled(max_events=2)
    spooled.publish("a", "k", b"0")
    spooled.publish("a", "k", b"1")
    with pytest.raises(SpoolFull) as refused:
        spooled.publish("a", "k", b"2")
    assert isinstance(refused.value, BusUnavailable)  # callers that know only the Bus protocol see it too
    with pytest.raises(SpoolFull):
        spooled.ping()
    assert (spooled.status().depth, spooled.status().rejected) == (2, 1)
    flaky.down = False
    assert spooled.flush(WAIT_S)
    spooled.ping()
    assert flaky.values("a") == nums(0, 1)


def test_unsent_records_stay_in_the_file_and_go_first_after_a_restart(make_spooled: Callable, flaky: FlakyBus) -> None:
    flaky.down = True
    first = make_spooled()
    first.publish_many("a", [("k", v) for v in nums(0, 1, 2)])
    first.close()
    second = make_spooled()
    assert second.status().depth == 3
    second.publish("a", "k", b"3")
    flaky.down = False
    assert second.flush(WAIT_S)
    assert flaky.values("a") == nums(0, 1, 2, 3)


class HeldInserts:
    """Stands in for ``ingest.spool._insert``: holds the first commit open while others queue, and
    can fail the second, so that a test controls which appends share a group commit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = spool_module._insert
        self.release = threading.Event()
        self.holding = threading.Event()
        self.fail_second = False
        self.calls = 0
        monkeypatch.setattr(spool_module, "_insert", self)

    def __call__(self, conn: Any, rows: list[Any]) -> int:
        self.calls += 1
        if self.calls == 1:
            self.holding.set()
            assert self.release.wait(WAIT_S)
        if self.calls == 2 and self.fail_second:
            raise sqlite3.OperationalError("disk I/O error")
        return self.real(conn, rows)


def queue_behind(spool: Spool, pool: ThreadPoolExecutor, appends: list[list[tuple[str | None, bytes]]]) -> list[Future]:
    """Start ``appends`` one by one, each queued behind the commit in progress before the next starts."""
    futures = []
    for items in appends:
        futures.append(pool.submit(spool.append, "a", items))
        wait_for(
            lambda: len(spool._appends._queue) == len(futures),
            what="the append queued",
            timeout_s=WAIT_S,
            interval_s=0.01,
        )
    return futures


def test_concurrent_appends_are_each_stored_once_and_in_each_threads_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3", max_events=100_000) as spool:

        def appender(thread: int) -> list[list[int]]:
            # Appends of 1 to 3 records, like a request that publishes one event or several.
            return [
                spool.append("a", [(f"k{thread}", f"{thread}-{i}-{j}".encode()) for j in range(i % 3 + 1)])
                for i in range(60)
            ]

        with ThreadPoolExecutor(16) as pool:
            acknowledged = list(pool.map(appender, range(16)))
        stored = {s.seq: s.value.decode() for s in spool.peek(100_000)}
        expected = [f"{t}-{i}-{j}" for t in range(16) for i in range(60) for j in range(i % 3 + 1)]
        assert sorted(stored.values()) == sorted(expected) and spool.depth == len(expected)  # each once
        for thread, seqs_per_append in enumerate(acknowledged):
            # The seqs an append returned hold its records, in its order, one append after the other.
            assert [stored[seq] for seqs in seqs_per_append for seq in seqs] == [
                f"{thread}-{i}-{j}" for i in range(60) for j in range(i % 3 + 1)
            ]
            flat = [seq for seqs in seqs_per_append for seq in seqs]
            assert flat == sorted(flat)
            assert all(seqs == list(range(seqs[0], seqs[0] + len(seqs))) for seqs in seqs_per_append)  # contiguous
        assert spool._appends.groups < 16 * 60  # appends did share commits (one fsync for several)


def test_appends_that_queue_during_a_commit_go_in_one_commit_in_arrival_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserts = HeldInserts(monkeypatch)
    with Spool(tmp_path / "spool.sqlite3") as spool, ThreadPoolExecutor(8) as pool:
        first = pool.submit(spool.append, "a", [("k", b"first")])
        assert inserts.holding.wait(WAIT_S)
        later = queue_behind(spool, pool, [[("k", str(i).encode()), ("k", f"{i}b".encode())] for i in range(5)])
        assert not any(f.done() for f in [first, *later])  # nobody is acknowledged before its commit
        inserts.release.set()
        assert first.result(WAIT_S) == [1]
        assert [f.result(WAIT_S) for f in later] == [[2 + 2 * i, 3 + 2 * i] for i in range(5)]
        assert inserts.calls == 2  # the five waiting appends took one commit
        assert [s.value for s in spool.peek(20)] == [b"first", *(v for i in range(5) for v in (b"%d" % i, b"%db" % i))]


def test_a_failed_group_commit_fails_only_the_appends_of_that_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserts = HeldInserts(monkeypatch)
    with Spool(tmp_path / "spool.sqlite3") as spool, ThreadPoolExecutor(8) as pool:
        first = pool.submit(spool.append, "a", [("k", b"first")])
        assert inserts.holding.wait(WAIT_S)
        doomed = queue_behind(spool, pool, [[("k", b"x")], [("k", b"y"), ("k", b"z")]])
        inserts.fail_second = True  # the commit of the group that is queued now
        inserts.release.set()
        assert first.result(WAIT_S) == [1]
        for future in doomed:
            with pytest.raises(BusUnavailable, match=r"cannot write to the spool.*disk I/O error"):
                future.result(WAIT_S)
        assert spool.depth == 1  # nothing of the failed group is stored, or counted
        assert spool.append("a", [("k", b"after")]) == [2]  # and the next append is fine
        assert [s.value for s in spool.peek(10)] == [b"first", b"after"]


def test_the_bound_is_judged_append_by_append_within_a_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inserts = HeldInserts(monkeypatch)
    with Spool(tmp_path / "spool.sqlite3", max_events=4) as spool, ThreadPoolExecutor(8) as pool:
        first = pool.submit(spool.append, "a", [("k", b"0")])
        assert inserts.holding.wait(WAIT_S)
        # As if one after another: 2 fit (3 held), the next 2 would make 5 and are refused whole, 1 fits.
        fits, refused, last = queue_behind(
            spool, pool, [[("k", b"1"), ("k", b"2")], [("k", b"x"), ("k", b"y")], [("k", b"3")]]
        )
        inserts.release.set()
        assert first.result(WAIT_S) == [1]
        assert fits.result(WAIT_S) == [2, 3] and last.result(WAIT_S) == [4]
        with pytest.raises(SpoolFull, match=r"3 events are waiting for the bus.*limit is 4"):
            refused.result(WAIT_S)
        assert [s.value for s in spool.peek(10)] == nums(0, 1, 2, 3) and spool.depth == 4


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3"), pytest.raises(SpoolLocked, match="in use by another process"):
        Spool(tmp_path / "spool.sqlite3")
    Spool(tmp_path / "spool.sqlite3").close()  # free again once closed


@pytest.mark.parametrize("target", ["down", "up"])
def test_every_acknowledged_publish_survives_sigkill(tmp_path: Path, spawn_worker: Callable, target: str) -> None:
    # "down": killed between append and send. "up": killed anywhere, between a send and its delete too.
    spool_path, bus_path = tmp_path / "spool.sqlite3", tmp_path / "bus.sqlite3"
    SqliteBus(bus_path).close()
    child = spawn_worker("spooler", spool_path, "down" if target == "down" else f"sqlite:///{bus_path}", "a")
    acknowledged = -1
    while acknowledged < 200:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        acknowledged = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)

    bus = FlakyBus(bus_path)
    with SpooledBus(bus, Spool(spool_path), min_backoff_s=0.01) as spooled:
        assert spooled.flush(WAIT_S)
        got = [int(v) for v in bus.values("a")]
    bus.inner.close()
    # Every acknowledged record is there; only the tail after a lost delete may repeat, in order.
    first_seen = list(dict.fromkeys(got))
    assert first_seen == list(range(len(first_seen))) and len(first_seen) > acknowledged
    if target == "down":
        assert got == first_seen
