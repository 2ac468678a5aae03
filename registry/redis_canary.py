"""The canary steps of the Redis registry (rules: registry.canary).

Each step is one WATCH/MULTI/EXEC transaction of the registry's (`_transact`), reading and
queueing with its helpers, so that the canary, a field of the pointer hash, changes atomically
with the pointer, the stack, the version states and the history.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from redis.client import Pipeline

from registry import canary as canary_rules
from registry import rollback as stack_rules
from registry.versions import HistoryEntry

logger = logging.getLogger(__name__)


class RedisCanarySteps:
    """Mixed into RedisRegistry: uses its `_transact`, `_keys`, `_*_in` and `_queue_*` helpers."""

    def start_canary(
        self, version: str, share: float, *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        def plan(pipe: Pipeline) -> HistoryEntry:
            self._check_servable_in(pipe, version)
            counter, active, running = self._pointer_in(pipe)
            running = canary_rules.start(running, active, version, share, actor=actor,
                                         now=time.time())
            pipe.multi()
            return self._queue_note(pipe, counter, active, running, "canary_start", version,
                                    actor, reason, evidence)

        entry = self._transact(plan)
        logger.info("%s started a canary of %s for %.0f%% of users", actor, version, 100 * share)
        return entry

    def advance_canary(
        self, version: str, to: str, *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        def plan(pipe: Pipeline) -> HistoryEntry:
            self._check_servable_in(pipe, to)
            parent = json.loads(pipe.hget(self._keys.meta, to))["parent"]
            counter, active, running = self._pointer_in(pipe)
            running = canary_rules.advance(running, version, to, parent)
            pipe.multi()
            return self._queue_note(pipe, counter, active, running, "canary_advance", to,
                                    actor, reason, evidence)

        entry = self._transact(plan)
        logger.info("%s advanced the canary from %s to %s", actor, version, to)
        return entry

    def promote_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        def plan(pipe: Pipeline) -> HistoryEntry:
            # The state before the pointer: these reads are not one snapshot (EXEC checks that
            # later), and in this order a rollback landing between them reads as "no canary".
            ready = pipe.hget(self._keys.state, version) == "ready"
            counter, previous, running = self._pointer_in(pipe)
            canary_rules.require(running if ready else None, version)
            stack = stack_rules.push_on_activate(self._stack_in(pipe), previous, version)
            pipe.multi()
            return self._queue_move(pipe, counter, previous, running, "canary_promote", version,
                                    stack, actor, reason, evidence)

        entry = self._transact(plan)
        logger.info("%s promoted canary %s (was %s)", actor, version, entry.previous or "base")
        return entry

    def rollback_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        k = self._keys

        def plan(pipe: Pipeline) -> HistoryEntry:
            counter, active, running = self._pointer_in(pipe)
            canary_rules.require(running, version)
            ready = pipe.hget(k.state, version) == "ready"
            pipe.multi()
            if ready:
                pipe.hset(k.state, version, "rejected")
                pipe.hset(k.rejected, version, canary_rules.rejection(actor, reason))
            return self._queue_note(pipe, counter, active, None, "canary_rollback", version,
                                    actor, reason, evidence)

        entry = self._transact(plan)
        logger.warning("%s rolled back canary %s: %s", actor, version, reason)
        return entry

    def pause_canary(
        self, version: str, paused: bool, *, actor: str, reason: str = ""
    ) -> HistoryEntry:
        def plan(pipe: Pipeline) -> HistoryEntry:
            counter, active, running = self._pointer_in(pipe)
            running = canary_rules.paused(canary_rules.require(running, version), paused)
            pipe.multi()
            action = "canary_pause" if paused else "canary_resume"
            return self._queue_note(pipe, counter, active, running, action, version, actor, reason)

        entry = self._transact(plan)
        logger.info("%s %s canary %s", actor, "paused" if paused else "resumed", version)
        return entry

    def report_canary(self, version: str, evidence: dict[str, Any]) -> bool:
        def plan(pipe: Pipeline) -> bool:
            _, _, running = self._pointer_in(pipe)
            if running is None or running.version != version:
                return False
            running = canary_rules.reported(running, evidence, now=time.time())
            pipe.multi()
            pipe.hset(self._keys.pointer, "canary", running.dumps())
            return True

        return self._transact(plan)
