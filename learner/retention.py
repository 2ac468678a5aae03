"""The learner's side of retention: it owns the writes of the bus, the buffer and the registry's
versions, which would grow without end, so it bounds them (``Retention.tick``, between turns of
the loop: serving never waits for it).

- The embedded bus (``ingest.sqlite_retention``): records older than ``KTO_BUS_RETENTION_S`` or
  beyond ``KTO_BUS_RETENTION_BYTES`` per partition are deleted, never one a consumer group has not
  committed past. What groups hold back is ``kto_learner_bus_retention_held_back_records{topic,
  group}`` (alert: KtoBusRetentionHeldBack). On Kafka retention is the broker's (the topics'
  ``retention.ms`` and ``retention.bytes``): nothing to do here.
- The replay buffer (``learner.buffer_retention``): the bound ``KTO_BUFFER_MAX_EXAMPLES`` /
  ``KTO_BUFFER_MAX_AGE_S``, keeping the examples a running canary counts. Both every
  ``KTO_RETENTION_EVERY_S``.
- The registry's version files (registry.retention: ``KTO_ROLLBACK_DEPTH``,
  ``KTO_RETENTION_GRACE_S``): pruned after every publish (the candidate its canary just advanced
  past, or the waiting version a newer one replaced, goes at once: versions never pile up behind
  a canary) and every ``PRUNE_EVERY_S`` otherwise (grace periods run out, operators unpin).

A failure (the bus or the registry away, a full disk) is logged and tried again at the next
tick; it never stops the learner. Several learners on one bus each run it, harmlessly: deletions
are transactions, and each reads the groups' offsets anew.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from ingest.bus import Bus, BusUnavailable
from ingest.sqlite_bus import SqliteBus
from learner.buffer import ReplayBuffer
from learner.buffer_retention import Bound
from learner.metrics import LearnerMetrics
from learner.settings import LearnerSettings
from registry import Registry, RegistryError
from registry.retention import Policy

logger = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
ACTOR = "learner"


class Retention:
    def __init__(
        self, bus: Bus, buffer: ReplayBuffer, registry: Registry, settings: LearnerSettings, metrics: LearnerMetrics
    ) -> None:
        self.bus, self.buffer, self.registry, self.metrics = bus, buffer, registry, metrics
        self.every_s = settings.retention_every_s
        self.bus_max_age_s, self.bus_max_bytes = settings.bus_retention_s, settings.bus_retention_bytes
        self.bound = Bound(settings.buffer_max_examples, settings.buffer_max_age_s, settings.buffer_recent_share)
        self.policy = Policy(depth=settings.rollback_depth, grace_s=settings.retention_grace_s)
        self._last = self._pruned = -float("inf")  # monotonic seconds of the last runs: the first tick runs
        if not isinstance(bus, SqliteBus):
            logger.info("bus retention is the broker's (retention.ms, retention.bytes on the topics)")

    def tick(self) -> None:
        """Prune the registry when the last prune is ``PRUNE_EVERY_S`` old; bound the bus and the
        buffer when their last run is ``every_s`` old."""
        if time.monotonic() - self._pruned >= PRUNE_EVERY_S:
            self.run_registry()
        if time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        self.run_bus()
        self.run_buffer()

    def after_publish(self) -> None:
        self.run_registry()

    def run_registry(self) -> None:
        self._pruned = time.monotonic()
        try:
            report = self.registry.prune(self.policy, actor=ACTOR)
        except (RegistryError, OSError) as exc:
            logger.warning("registry pruning failed (trying again in %.0f s): %s", PRUNE_EVERY_S, exc)
            return
        self.metrics.versions_pruned.inc(len(report.pruned))

    def run_bus(self) -> None:
        if not isinstance(self.bus, SqliteBus):
            return
        try:
            report = self.bus.enforce_retention(max_age_s=self.bus_max_age_s, max_bytes=self.bus_max_bytes)
        except (BusUnavailable, OSError) as exc:
            logger.warning("bus retention failed (trying again in %.0f s): %s", self.every_s, exc)
            return
        self.metrics.observe_bus_retention(report.deleted, report.held_back)

    def run_buffer(self) -> None:
        try:
            canary = self.registry.canary()
            dropped = self.buffer.enforce_retention(self.bound, keep_since=None if canary is None else canary.since)
        except (RegistryError, sqlite3.Error, OSError) as exc:
            # Without the registry the canary's start is unknown: better to drop nothing this time.
            logger.warning("buffer retention failed (trying again in %.0f s): %s", self.every_s, exc)
            return
        self.metrics.buffer_dropped.inc(dropped)
        if dropped:
            logger.info("buffer retention dropped %d examples (bound %s)", dropped, self.bound)
