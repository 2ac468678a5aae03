"""Chat through a ledger outage: responses are recorded later instead of refused now.

The ledger (Redis, in production) is an index for feedback checks, not the record of truth: the
response event is already durable on the bus (or in the spool) when the ledger is written. So
when the ledger cannot be reached, ``BackloggedLedger.record_response`` keeps the entry in a
bounded in-memory backlog and returns; a thread writes the backlog, oldest first, once the
ledger answers again. Chat keeps serving through a Redis restart.

Rules:

- A rating of a response still in the backlog gets ``LedgerUnavailable`` (503, try again),
  never "unknown response": its entry is on its way.
- The backlog holds at most ``max_entries``; beyond that the oldest entries are dropped with a
  warning. Those responses stay on the bus (and in the learner), but cannot be rated. An entry
  is also lost if the server stops before the ledger returns.
- ``lookup`` and ``set_vote`` go straight to the ledger: a vote must be checked against the
  shared state, so during an outage feedback answers 503 rather than guessing.
"""

from __future__ import annotations

import collections
import logging
import threading

from serve.ledger import LedgerEntry, LedgerUnavailable, ResponseLedger, VersionTally

logger = logging.getLogger(__name__)


class BackloggedLedger:
    """A ``ResponseLedger`` whose ``record_response`` outlives an outage of the ledger it wraps."""

    def __init__(self, ledger: ResponseLedger, *, max_entries: int = 100_000, retry_s: float = 0.5) -> None:
        """``max_entries``: responses kept while the ledger is away. ``retry_s``: seconds between tries."""
        self._ledger = ledger
        self._max = max_entries
        self._retry_s = retry_s
        self._backlog: collections.OrderedDict[str, tuple[str | None, str | None]] = collections.OrderedDict()
        self._lock = threading.Lock()  # the backlog
        self._writing = threading.Lock()  # one backlog entry being written, or a user being forgotten
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    @property
    def backlog(self) -> int:
        """Responses waiting to be recorded (for metrics)."""
        return len(self._backlog)

    def record_response(self, response_id: str, user: str | None, version: str | None = None) -> None:
        if not self._backlog:  # the usual case: straight through
            try:
                self._ledger.record_response(response_id, user, version)
                return
            except LedgerUnavailable as exc:
                logger.warning("ledger unavailable (%s); recording responses later", exc)
        with self._lock:
            self._backlog[response_id] = (user, version)  # behind the others, so order is kept
            while len(self._backlog) > self._max:
                lost, _ = self._backlog.popitem(last=False)
                self.dropped += 1
                logger.error("ledger backlog full (%d): response %s can no longer be rated", self._max, lost)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="ledger-backlog", daemon=True)
                self._thread.start()
        self._wake.set()

    def lookup(self, response_id: str) -> LedgerEntry | None:
        if response_id in self._backlog:
            raise LedgerUnavailable(f"response {response_id} is not recorded in the ledger yet")
        return self._ledger.lookup(response_id)

    def set_vote(self, response_id: str, user: str, label: str, event_id: str) -> str | None:
        if response_id in self._backlog:
            raise LedgerUnavailable(f"response {response_id} is not recorded in the ledger yet")
        return self._ledger.set_vote(response_id, user, label, event_id)

    def tally(self, version: str | None) -> VersionTally:
        return self._ledger.tally(version)  # backlogged responses are counted once they are written

    def forget_user(self, user: str) -> int:
        with self._writing:  # no entry of theirs is on its way from the backlog meanwhile
            forgotten = self._ledger.forget_user(user)  # first: while it is away, the caller retries
            with self._lock:
                waiting = [r for r, (owner, _) in self._backlog.items() if owner == user]
                for response_id in waiting:
                    del self._backlog[response_id]
        return forgotten + len(waiting)

    def _drain(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._retry_s)
            self._wake.clear()
            while self._backlog and not self._closed.is_set():
                # One entry at a time under _writing, so that forget_user never runs between
                # reading an entry here and writing it to the ledger (it would come back).
                with self._writing:
                    with self._lock:
                        if not self._backlog:
                            break
                        response_id, (user, version) = next(iter(self._backlog.items()))
                    try:
                        self._ledger.record_response(response_id, user, version)
                    except LedgerUnavailable:
                        break  # still away: try again after retry_s
                    with self._lock:
                        self._backlog.pop(response_id, None)
                if not self._backlog:
                    logger.info("ledger backlog written; recording responses directly again")

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._backlog:
            logger.warning("%d responses were never recorded in the ledger (it was unavailable)", len(self._backlog))
        self._ledger.close()
