"""The embedded bus and the spool on a disk that fills up under concurrent writers: a write that
failed says the disk is full and stored nothing, every acknowledged one is kept exactly once, and
writes go through again once space is freed (group commit fails the calls of a failed group only)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from foundation.disk import is_disk_full
from ingest.bus import BusUnavailable
from ingest.spool import Spool
from ingest.sqlite_bus import SqliteBus
from testkit.waiting import wait_for
from tests.tmpfs import MiB, fill, small_disk

WRITERS = 4
MOST_WRITES = 3000
"""Per writer: a full disk refuses far sooner (the 8 MiB disk holds about 2,000 such records)."""
VALUE = b"v" * 2048
FIRST = 5
"""Writes per writer before the disk is filled."""


def write_until_refused(write: Callable[[str], None], fill_disk: Callable[[], None]) -> tuple[set[str], list]:
    """WRITERS threads each write FIRST keys, wait for the disk to be filled, then call write(key)
    at once until each has been refused twice. Returns (keys acknowledged, errors of the refused)."""
    acknowledged: set[str] = set()
    refused: list[BaseException] = []
    lock = threading.Lock()
    filled = threading.Event()

    def writer(w: int) -> None:
        mine = 0
        for i in range(MOST_WRITES):
            if i == FIRST:
                filled.wait()
            key = f"{w}-{i}"
            try:
                write(key)
            except BusUnavailable as exc:
                with lock:
                    refused.append(exc)
                mine += 1
                if mine == 2:
                    return
                continue
            with lock:
                acknowledged.add(key)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acknowledged) == WRITERS * FIRST, what="the first writes to go through")
    fill_disk()
    filled.set()
    for t in threads:
        t.join()
    return acknowledged, refused


def test_the_bus_keeps_every_acknowledged_record_and_nothing_else(tmp_path):
    with small_disk(tmp_path / "disk", 8 * MiB) as disk:
        bus = SqliteBus(disk / "bus.sqlite3")
        try:
            ballast: list = []

            def publish(key: str) -> None:
                bus.publish("t", key, VALUE)

            acknowledged, refused = write_until_refused(publish, lambda: ballast.append(fill(disk)))
            assert len(refused) == 2 * WRITERS and all(is_disk_full(e) for e in refused), refused[:3]

            ballast[0].unlink()
            after = {f"after-{i}" for i in range(10)}
            for key in after:
                bus.publish("t", key, VALUE)
            consumer = bus.consumer("check", ["t"])
            seen: list[str] = []
            end = bus.end_offsets(["t"])[("t", 0)]
            while len(seen) < end:
                seen += [r.key for r in consumer.poll(timeout_s=1.0) if r.key is not None]
            consumer.close()
        finally:
            bus.close()
    assert sorted(seen) == sorted(acknowledged | after)  # each once: nothing lost, nothing unacknowledged


def test_the_spool_keeps_every_acknowledged_record_and_nothing_else(tmp_path):
    with small_disk(tmp_path / "disk", 8 * MiB) as disk:
        spool = Spool(disk / "spool.sqlite3")
        try:
            ballast: list = []

            def append(key: str) -> None:
                spool.append("t", [(key, VALUE)])

            acknowledged, refused = write_until_refused(append, lambda: ballast.append(fill(disk)))
            assert len(refused) == 2 * WRITERS and all(is_disk_full(e) for e in refused), refused[:3]

            ballast[0].unlink()
            spool.append("t", [("after", VALUE)])
            kept = [str(r.key) for r in spool.peek(MOST_WRITES * WRITERS)]
        finally:
            spool.close()
    assert sorted(kept) == sorted(acknowledged | {"after"})
    assert spool.depth == len(kept)
