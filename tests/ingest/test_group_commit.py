"""Group commit (``ingest._group_commit``): who leads, who waits, what each caller gets back.

A commit function that the test can hold open makes the groups deterministic: while the first
caller's commit is held, every later caller queues, and the queue becomes the next group.
The spool and the embedded bus are tested on top of it in ``test_spool.py`` and
``test_sqlite_bus.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from ingest._group_commit import GroupCommit
from ingest.bus import BusUnavailable
from testkit.waiting import wait_for

WAIT_S = 10.0


class Recorder:
    """A commit function that records its groups; ``hold`` keeps a commit open until released."""

    def __init__(self) -> None:
        self.groups: list[list[object]] = []
        self.hold = threading.Event()
        self.held = threading.Event()  # set while a commit waits on `hold`
        self.fail: Callable[[list[object]], BaseException | None] = lambda items: None

    def __call__(self, items: list[object]) -> list[object]:
        if self.hold.is_set():
            self.held.set()
            while self.hold.is_set():
                time.sleep(0.001)
            self.held.clear()
        error = self.fail(items)
        if error is not None:
            raise error
        self.groups.append(list(items))
        return [ValueError(f"refused {item}") if item == "refuse" else f"done {item}" for item in items]


def queued(committer: GroupCommit, n: int) -> None:
    wait_for(lambda: len(committer._queue) >= n, what=f"{n} callers queued", timeout_s=WAIT_S, interval_s=0.001)


def start(pool: ThreadPoolExecutor, committer: GroupCommit, items: list[object]) -> list[Future]:
    return [pool.submit(committer.run, item) for item in items]


def test_one_caller_alone_commits_alone() -> None:
    recorder = Recorder()
    committer = GroupCommit(recorder)
    assert committer.run("a") == "done a"
    assert committer.run("b") == "done b"
    assert recorder.groups == [["a"], ["b"]]


def test_callers_that_arrive_during_a_commit_share_the_next_one_in_arrival_order() -> None:
    recorder = Recorder()
    committer = GroupCommit(recorder)
    recorder.hold.set()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(committer.run, "first")
        assert recorder.held.wait(WAIT_S)
        later = []
        for i in range(6):  # one at a time, so that the arrival order is known
            later.append(pool.submit(committer.run, i))
            queued(committer, i + 1)
        assert not any(f.done() for f in [first, *later])  # nobody returns before its commit is done
        recorder.hold.clear()
        assert first.result(WAIT_S) == "done first"
        assert [f.result(WAIT_S) for f in later] == [f"done {i}" for i in range(6)]
    assert recorder.groups == [["first"], [0, 1, 2, 3, 4, 5]]
    assert committer.groups == 2


def test_each_caller_gets_its_own_outcome() -> None:
    recorder = Recorder()
    committer = GroupCommit(recorder)
    recorder.hold.set()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(committer.run, "first")
        assert recorder.held.wait(WAIT_S)
        rest = []
        for item in ("a", "refuse", "b"):
            rest.append(pool.submit(committer.run, item))
            queued(committer, len(rest))
        recorder.hold.clear()
        assert first.result(WAIT_S) == "done first"
        assert rest[0].result(WAIT_S) == "done a" and rest[2].result(WAIT_S) == "done b"
        with pytest.raises(ValueError, match="refused refuse"):
            rest[1].result(WAIT_S)
    assert recorder.groups == [["first"], ["a", "refuse", "b"]]


def test_a_failed_commit_fails_its_group_and_only_its_group() -> None:
    recorder = Recorder()
    committer = GroupCommit(recorder)
    recorder.fail = lambda items: OSError("disk on fire") if "poison" in items else None
    recorder.hold.set()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(committer.run, "first")
        assert recorder.held.wait(WAIT_S)
        doomed = []
        for item in ("x", "poison", "y"):
            doomed.append(pool.submit(committer.run, item))
            queued(committer, len(doomed))
        recorder.hold.clear()
        assert first.result(WAIT_S) == "done first"  # the group before is untouched
        errors = [f.exception(WAIT_S) for f in doomed]
    # Whoever led the failed group re-raises what the commit raised; the others get BusUnavailable.
    assert sum(isinstance(e, OSError) for e in errors) == 1
    assert sum(isinstance(e, BusUnavailable) and "disk on fire" in str(e) for e in errors) == 2
    assert len({id(e) for e in errors}) == 3  # each caller raises an exception object of its own
    assert committer.run("after") == "done after"  # and the next group goes through
    assert recorder.groups == [["first"], ["after"]]


def test_many_threads_hammering_get_their_own_results_once_each_in_their_own_order() -> None:
    recorder = Recorder()

    def slow_commit(items: list[object]) -> list[object]:
        time.sleep(0.0005)  # like an fsync: the GIL is free meanwhile, so callers pile up
        return recorder(items)

    committer = GroupCommit(slow_commit)

    def caller(thread: int) -> list[object]:
        return [committer.run((thread, i)) for i in range(100)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(caller, range(16)))
    assert results == [[f"done {(thread, i)}" for i in range(100)] for thread in range(16)]
    committed: list[tuple[int, int]] = []
    for group in recorder.groups:
        for item in group:
            assert isinstance(item, tuple)  # the (thread, i) pairs that the callers sent
            committed.append(item)
    assert sorted(committed) == [(thread, i) for thread in range(16) for i in range(100)]  # each exactly once
    for thread in range(16):
        assert [i for t, i in committed if t == thread] == list(range(100))  # in each thread's order
    assert committer.groups == len(recorder.groups) < len(committed) / 2  # and they did share commits
