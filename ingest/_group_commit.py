"""Group commit: concurrent writers share one durable commit (one fsync) instead of one each.

The spool and the embedded bus commit with ``synchronous=FULL``, so an fsync is most of what a
write costs, and the server writes from a pool of request threads. ``GroupCommit`` turns the
writes that arrive while a commit is in progress into the next commit (leader/follower, as
databases do with their logs):

- A caller whose write finds no commit in progress leads: it takes every write queued so far,
  in arrival order, and commits them together; writes that arrive meanwhile queue behind it.
- When that commit is done, the next queued caller is handed the lead (at once, so the next
  commit starts while the group's callers are still waking up), then every caller of the group
  is woken with ITS outcome. No caller returns before the commit holding its write is done.
- The commit function decides each write's outcome (a result, or an exception that write
  raises), so one write can be refused (a full spool) while the others of its group go through.
  If the commit function itself raises, every write of that group fails (the leader re-raises,
  the others get ``BusUnavailable``) and the next group is unaffected.

Each caller is woken through its own lock, so a commit wakes its group's callers, not every
waiting thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ingest.bus import BusUnavailable

T = TypeVar("T")
R = TypeVar("R")


class _Waiter(Generic[T]):
    __slots__ = ("done", "item", "outcome", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.outcome: object = None
        self.done = False
        self.wake = threading.Lock()
        self.wake.acquire()  # released once: when this write is done, or when it is handed the lead


class GroupCommit(Generic[T, R]):
    """Runs ``commit`` on groups of concurrent writes; see the module docstring. Thread-safe."""

    def __init__(self, commit: Callable[[list[T]], list[R | BaseException]]) -> None:
        """``commit(items)``: make the items durable together, in this order; return, for each,
        its result or the exception that its caller should raise (a distinct object per item)."""
        self._commit = commit
        self._mutex = threading.Lock()
        self._queue: list[_Waiter[T]] = []
        self._leading = False
        self.groups = 0
        """Commits run so far (for tests and diagnostics)."""

    def run(self, item: T) -> R:
        """Commit ``item`` with whatever else is queued; its result once that commit is done."""
        mine = _Waiter(item)
        with self._mutex:
            self._queue.append(mine)
            lead = not self._leading
            self._leading = True
        if not lead:
            mine.wake.acquire()  # done, or handed the lead
        if not mine.done:
            self._lead(mine)
        if isinstance(mine.outcome, BaseException):
            raise mine.outcome
        return mine.outcome  # type: ignore[return-value]

    def _lead(self, mine: _Waiter[T]) -> None:
        with self._mutex:
            group, self._queue = self._queue, []
        try:
            outcomes = self._commit([w.item for w in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"the commit returned {len(outcomes)} outcomes for {len(group)} writes")
            for waiter, outcome in zip(group, outcomes):
                waiter.outcome = outcome
        except BaseException as exc:
            for waiter in group:
                failed = BusUnavailable(f"the group commit failed: {type(exc).__name__}: {exc}")
                failed.__cause__ = exc
                waiter.outcome = failed
            raise
        finally:
            for waiter in group:
                waiter.done = True
            with self._mutex:
                self.groups += 1
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
            if successor is not None:
                successor.wake.release()
            for waiter in group:
                if waiter is not mine:
                    waiter.wake.release()
