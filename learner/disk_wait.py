"""The learner on a full disk: it waits for space and tries again, instead of dying.

Everything the learner writes — the replay buffer, its offsets and dead letters on the bus, the
adapters it publishes, its own state — can fail on a full disk. The loop runs each turn inside
``with disk_wait:``: a turn cut short by a full disk (any error caused by one, or any error
while the disk is under its reserve, foundation.disk) is waited out, with backoff, and the loop
turns again from the top. Why that is safe: every write of a turn is atomic and its effects are
idempotent on a retry (learner.loop's crash-safety note), so an interrupted turn is the same as a
crash followed by a restart, without the restart.

One warning per episode (from the first interrupted turn to the next one that completes), one
line when it ends; ``kto_learner_disk_full_total`` counts the interrupted turns and
``kto_learner_waiting_for_disk`` is 1 while an episode lasts.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from foundation.disk import DiskProbe, is_disk_full
from learner.metrics import LearnerMetrics

logger = logging.getLogger(__name__)

FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0
"""The wait doubles from the first to this (seconds): space freed is noticed within it."""


class DiskWait:
    """``with disk_wait: <one turn>``: suppresses a full disk's error after waiting it out."""

    def __init__(
        self,
        probe: DiskProbe,
        metrics: LearnerMetrics,
        stop: threading.Event,
        *,
        first_wait_s: float = FIRST_WAIT_S,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.probe, self.metrics, self.stop = probe, metrics, stop
        self.first_wait_s, self.max_wait_s = first_wait_s, max_wait_s
        self.interrupted = False
        """Whether the last turn was cut short by a full disk."""
        self._since: float | None = None  # when the episode began (monotonic), None outside one
        self._wait_s = first_wait_s

    def check(self) -> None:
        """Raise DiskFull while the disk is under its reserve: the turn waits before writing anything."""
        self.probe.check()

    def __enter__(self) -> DiskWait:
        self.interrupted = False
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None:
            self._ended()
            return False
        if not isinstance(exc, Exception) or not (is_disk_full(exc) or self.probe.full()):
            return False
        self.interrupted = True
        self.metrics.disk_full.inc()
        if self._since is None:
            self._since = time.monotonic()
            self.metrics.waiting_for_disk.set(1)
            logger.warning("the disk is full (%s); waiting for space, then trying again", exc)
        else:
            logger.debug("the disk is still full (%s); next try in %.0f s", exc, self._wait_s)
        self.stop.wait(self._wait_s)
        self._wait_s = min(self._wait_s * 2, self.max_wait_s)
        return True

    def _ended(self) -> None:
        if self._since is not None:
            logger.info("space again after %.0f s; the learner goes on", time.monotonic() - self._since)
            self.metrics.waiting_for_disk.set(0)
        self._since, self._wait_s = None, self.first_wait_s
