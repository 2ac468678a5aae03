"""The learner's side of registry retention (registry.retention): it publishes the versions, so
it prunes them.

A prune runs after every publish (the candidate its canary just advanced past, or the waiting
version a newer one replaced, goes at once: versions never pile up behind a canary) and at least
every `EVERY_S` otherwise (grace periods run out, operators unpin). A registry that is away only
delays it: the next turn tries again.
"""

from __future__ import annotations

import logging
import time

from registry import Registry, RegistryError
from registry.retention import Policy

logger = logging.getLogger(__name__)

EVERY_S = 60.0
ACTOR = "learner"


class Pruner:
    def __init__(self, registry: Registry, policy: Policy) -> None:
        self.registry, self.policy = registry, policy
        self._last = -EVERY_S  # monotonic seconds of the last prune: the first turn prunes

    def after_publish(self) -> None:
        self._prune()

    def tick(self) -> None:
        """Prune when the last one is `EVERY_S` old."""
        if time.monotonic() - self._last >= EVERY_S:
            self._prune()

    def _prune(self) -> None:
        self._last = time.monotonic()
        try:
            self.registry.prune(self.policy, actor=ACTOR)
        except (RegistryError, OSError) as exc:
            logger.warning("could not prune the registry (trying again later): %s", exc)
