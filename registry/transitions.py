"""Every change of the pointer, the canary and the version states, written once for all backends.

Each operation is one transaction of its backend (`_transaction`, over a `Tx`): it reads what it
needs, decides with the pure rules (registry.rollback for the stack, registry.canary for the
canary, registry.erasure for flags), and queues its writes. Reads see the state as the
transaction found it; the writes apply together when the operation returns, or not at all when
it raises. A backend may run an operation more than once (Redis reruns it when a watched key
moved), so operations only read, decide and queue: they log after their transaction.

Every history entry bumps the pointer's change counter to its own `seq`, so that `pointer()`
tells a poller whether it missed anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from registry import canary as canary_rules
from registry import rollback as stack_rules
from registry.canary import Canary
from registry.erasure import erasure_evidence
from registry.errors import UnknownVersion, VersionPruned, VersionRejected
from registry.publishing import VISIBLE
from registry.versions import BASE, HistoryAction, HistoryEntry

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Tx(Protocol):
    """One transaction of a backend: reads first-hand, writes queued until it commits."""

    def pointer(self) -> tuple[int, str | None, Canary | None]:
        """(change counter, active version, running canary)."""
        ...

    def stack(self) -> list[str | None]:
        """The rollback stack, oldest first (None: the base model)."""
        ...

    def state(self, version: str) -> str | None:
        """pending | ready | rejected | abandoned; None when there is no such name."""
        ...

    def rejected_reason(self, version: str) -> str | None: ...

    def parent(self, version: str) -> str | None: ...

    def flags(self, version: str) -> list[dict[str, Any]]:
        """The version's erasure flags (registry.erasure), oldest first."""
        ...

    def erasure(self, request_id: str) -> HistoryEntry | None:
        """The history entry of an erasure request already recorded."""
        ...

    def pinned(self, version: str) -> bool: ...

    def pruned_at(self, version: str) -> float | None:
        """When retention deleted the version's files; None while they are kept."""
        ...

    def reject(self, version: str, reason: str) -> None:
        """Queue: the version is rejected for `reason`."""
        ...

    def set_flags(self, version: str, flags: list[dict[str, Any]]) -> None:
        """Queue: the version's flags become `flags`."""
        ...

    def set_pinned(self, version: str, pinned: bool) -> None:
        """Queue: the version is pinned or not."""
        ...

    def set_pruned(self, version: str, at: float) -> None:
        """Queue: the version's files are gone (or going) since `at`."""
        ...

    def set_canary(self, canary: Canary | None) -> None:
        """Queue: the canary changes with no history entry and no counter bump."""
        ...

    def append(
        self, entry: HistoryEntry, *, active: str | None, canary: Canary | None, stack: list[str | None] | None = None
    ) -> None:
        """Queue: the history entry; the pointer becomes (entry.seq, active, canary); the stack
        is replaced when given; replicas are told."""
        ...


class Transitions:
    """The pointer, canary, rejection and erasure operations of `registry.base.Registry`; the
    backend supplies `_transaction(operation) -> its result`."""

    _transaction: Callable[[Callable[[Tx], Any]], Any]

    def activate(self, version: str | None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Point serving at `version` (None or BASE: the base model); UnknownVersion,
        VersionRejected. Activating the version already active still records an entry (an audit
        of the request) and bumps the counter, but pushes nothing on the rollback stack."""
        version = None if version == BASE else version

        def operation(tx: Tx) -> HistoryEntry:
            _check_servable(tx, version)
            _, previous, _ = tx.pointer()
            return _move(
                tx, "activate", version, stack_rules.push_on_activate(tx.stack(), previous, version), actor, reason
            )

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s activated %s (was %s)", actor, version or "base", entry.previous or "base")
        return entry

    def rollback(self, to: str | None = None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Return to an earlier version: `to` if given (BASE for the base), else the stack rule
        (registry.rollback)."""

        def operation(tx: Tx) -> HistoryEntry:
            _, previous, _ = tx.pointer()
            target, stack = stack_rules.plan_rollback(
                tx.stack(),
                previous,
                to,
                is_rejected=lambda v: not _servable(tx, v),
                check_servable=lambda v: _check_servable(tx, v),
            )
            return _move(tx, "rollback", target, stack, actor, reason)

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s rolled back from %s to %s", actor, entry.previous or "base", entry.version or "base")
        return entry

    def reject(self, version: str, reason: str, *, actor: str = "registry") -> None:
        """Mark a version rejected forever; idempotent (the first reason stays). Rejecting the
        active version rolls back from it
        in the same transaction, so that every replica that finds it broken agrees on one step;
        rejecting the canary's candidate ends the canary as a rollback."""

        def operation(tx: Tx) -> bool:
            state = tx.state(version)
            if state not in VISIBLE:
                raise UnknownVersion(version)
            if state == "rejected":
                return False
            _, active, running = tx.pointer()
            why = f"{version} rejected: {reason}"
            if active == version:  # the stack rule skips the active version itself
                target, stack = stack_rules.pop_for_rollback(tx.stack(), active, lambda v: not _servable(tx, v))
                _move(tx, "rollback", target, stack, actor, why)
            elif running is not None and running.version == version:
                _note(tx, "canary_rollback", version, None, actor, why)
            tx.reject(version, reason)
            return True

        if self._transaction(operation):
            logger.warning("rejected %s: %s", version, reason)

    # ---- the canary (rules: registry.canary). `version` names the candidate the caller means, so a
    # decision about one canary never lands on the next: NoCanary if that is not what runs.

    def start_canary(
        self, version: str, share: float, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Route `share` of the users to `version`; CanaryRunning, InvalidCanary (it is active),
        UnknownVersion, VersionRejected, ValueError (share not in (0, 1])."""

        def operation(tx: Tx) -> HistoryEntry:
            _check_servable(tx, version)
            _, active, running = tx.pointer()
            started = canary_rules.start(running, active, version, share, actor=actor, now=time.time())
            return _note(tx, "canary_start", version, started, actor, reason, evidence)

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s started a canary of %s for %.0f%% of users", actor, version, 100 * share)
        return entry

    def advance_canary(
        self, version: str, to: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Move the canary of `version` on to `to`, a version trained from it; same users, the
        evidence goes on. NoCanary, InvalidCanary (not trained from it), UnknownVersion,
        VersionRejected."""

        def operation(tx: Tx) -> HistoryEntry:
            _check_servable(tx, to)
            _, _, running = tx.pointer()
            advanced = canary_rules.advance(running, version, to, tx.parent(to))
            return _note(tx, "canary_advance", to, advanced, actor, reason, evidence)

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s advanced the canary from %s to %s", actor, version, to)
        return entry

    def promote_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Activate the candidate (the activate path: the stack rules hold); the canary ends."""

        def operation(tx: Tx) -> HistoryEntry:
            # The state before the pointer: on Redis these reads are not one snapshot (EXEC checks
            # that later), and in this order a rollback landing between them reads as "no canary".
            ready = tx.state(version) == "ready"
            _, previous, running = tx.pointer()
            canary_rules.require(running if ready else None, version)
            stack = stack_rules.push_on_activate(tx.stack(), previous, version)
            return _move(tx, "canary_promote", version, stack, actor, reason, evidence)

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s promoted canary %s (was %s)", actor, version, entry.previous or "base")
        return entry

    def rollback_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Reject the candidate forever; the canary ends and the active version stays."""

        def operation(tx: Tx) -> HistoryEntry:
            _, _, running = tx.pointer()
            canary_rules.require(running, version)
            if tx.state(version) == "ready":
                tx.reject(version, canary_rules.rejection(actor, reason))
            return _note(tx, "canary_rollback", version, None, actor, reason, evidence)

        entry: HistoryEntry = self._transaction(operation)
        logger.warning("%s rolled back canary %s: %s", actor, version, reason)
        return entry

    def pause_canary(self, version: str, paused: bool, *, actor: str, reason: str = "") -> HistoryEntry:
        """Pause (route nobody to the candidate, decide nothing) or resume the canary."""

        def operation(tx: Tx) -> HistoryEntry:
            _, _, running = tx.pointer()
            changed = canary_rules.paused(canary_rules.require(running, version), paused)
            return _note(tx, "canary_pause" if paused else "canary_resume", version, changed, actor, reason)

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s %s canary %s", actor, "paused" if paused else "resumed", version)
        return entry

    def report_canary(self, version: str, evidence: dict[str, Any]) -> bool:
        """Keep the controller's latest evidence on the canary (no history entry, no counter
        bump); False if no canary of `version` runs."""

        def operation(tx: Tx) -> bool:
            _, _, running = tx.pointer()
            if running is None or running.version != version:
                return False
            tx.set_canary(canary_rules.reported(running, evidence, now=time.time()))
            return True

        return bool(self._transaction(operation))

    # ---- retention (rules: registry.retention; the files go in registry.pruning) ----

    def pin(self, version: str, pinned: bool = True, *, actor: str, reason: str = "") -> HistoryEntry | None:
        """Pin a version (retention keeps its files whatever happens) or unpin it; None when it
        was so already. UnknownVersion, VersionPruned (its files are gone: too late to pin)."""

        def operation(tx: Tx) -> HistoryEntry | None:
            if tx.state(version) not in VISIBLE:
                raise UnknownVersion(version)
            if pinned and (pruned_at := tx.pruned_at(version)) is not None:
                raise VersionPruned(version, pruned_at)
            if tx.pinned(version) == pinned:
                return None
            tx.set_pinned(version, pinned)
            return _note(tx, "pin" if pinned else "unpin", version, tx.pointer()[2], actor, reason)

        entry: HistoryEntry | None = self._transaction(operation)
        if entry is not None:
            logger.info("%s %s %s", actor, "pinned" if pinned else "unpinned", version)
        return entry

    def _mark_pruned(
        self, decide: Callable[[Tx], dict[str, dict[str, Any]]], *, actor: str, reason: str
    ) -> list[HistoryEntry]:
        """In one transaction: `decide(tx)` names the versions whose files may go now, with each
        one's evidence; each is marked pruned with a `prune` history entry. From the commit on,
        nothing may load them, so their files can be deleted."""

        def operation(tx: Tx) -> list[HistoryEntry]:
            # Reads see the state the transaction found, so the entries count on from it here.
            counter, active, running = tx.pointer()
            now, entries = time.time(), list[HistoryEntry]()
            for version, evidence in decide(tx).items():
                entry = HistoryEntry(counter + 1 + len(entries), now, "prune", version, active, actor, reason, evidence)
                tx.append(entry, active=active, canary=running)
                tx.set_pruned(version, now)
                entries.append(entry)
            return entries

        entries: list[HistoryEntry] = self._transaction(operation)
        return entries

    # ---- erasure (rules: registry.erasure) ----

    def record_erasure(
        self,
        request_id: str,
        versions: list[str],
        *,
        actor: str,
        reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """A user's data was erased (request `request_id`): flag `versions`, those trained on it,
        and append an `erasure` history entry; the pointer stays. Idempotent per request_id (a
        repeat returns the first entry); UnknownVersion writes nothing."""
        flagged = sorted(set(versions))

        def operation(tx: Tx) -> HistoryEntry:
            if (done := tx.erasure(request_id)) is not None:
                return done
            for version in flagged:
                if tx.state(version) not in VISIBLE:
                    raise UnknownVersion(version)
            _, active, running = tx.pointer()
            entry = _entry(tx, "erasure", None, None, actor, reason, erasure_evidence(request_id, flagged, evidence))
            for version in flagged:
                tx.set_flags(version, [*tx.flags(version), {"erasure": request_id, "at": entry.at, "reason": reason}])
            tx.append(entry, active=active, canary=running)
            return entry

        entry: HistoryEntry = self._transaction(operation)
        logger.info("%s recorded erasure %s: flagged %s", actor, request_id, ", ".join(flagged) or "no version")
        return entry


def _check_servable(tx: Tx, version: str | None) -> None:
    if version is None:
        return
    state = tx.state(version)
    if state not in VISIBLE:
        raise UnknownVersion(version)
    if state == "rejected":
        raise VersionRejected(version, tx.rejected_reason(version))
    if (pruned_at := tx.pruned_at(version)) is not None:
        raise VersionPruned(version, pruned_at)


def _servable(tx: Tx, version: str) -> bool:
    """Ready, with its files: what a stack rollback may land on."""
    return tx.state(version) == "ready" and tx.pruned_at(version) is None


def _entry(
    tx: Tx,
    action: HistoryAction,
    version: str | None,
    previous: str | None,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None,
) -> HistoryEntry:
    counter, _, _ = tx.pointer()
    text = canary_rules.evidence_json(evidence)
    return HistoryEntry(
        counter + 1, time.time(), action, version, previous, actor, reason, json.loads(text) if text else None
    )


def _move(
    tx: Tx,
    action: HistoryAction,
    version: str | None,
    stack: list[str | None],
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> HistoryEntry:
    """The pointer moves to `version` (the canary follows: registry.canary.after_move)."""
    _, previous, running = tx.pointer()
    entry = _entry(tx, action, version, previous, actor, reason, evidence)
    tx.append(entry, active=version, canary=canary_rules.after_move(running, version, now=entry.at), stack=stack)
    return entry


def _note(
    tx: Tx,
    action: HistoryAction,
    candidate: str,
    canary: Canary | None,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> HistoryEntry:
    """A step that leaves the pointer where it is (a canary step, a pin)."""
    _, active, _ = tx.pointer()
    entry = _entry(tx, action, candidate, active, actor, reason, evidence)
    tx.append(entry, active=active, canary=canary)
    return entry
