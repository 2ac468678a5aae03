"""`Registry.prune`: delete the files of the versions retention lets go (registry.retention).

Two steps, safe against a kill between them:
 1. one transaction decides, from the pointer, the canary, the stack and the pins as they are
    in it, which versions with files on disk may go, and marks each pruned with a `prune`
    history entry. From its commit on nothing activates, canaries or stack-rolls-back to them;
 2. their directories are deleted. Every prune also deletes the directories of versions marked
    pruned earlier, so a prune killed between the steps is finished by the next one.

Only directories of visible versions are considered: a publish in flight (renamed, not yet
committed) is invisible, so it is never touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry import store
from registry.publishing import VISIBLE
from registry.retention import Candidate, Policy, reasons_to_keep
from registry.transitions import Tx
from registry.versions import HistoryEntry, VersionRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneReport:
    """What a prune did (or, with `dry_run`, would do)."""

    pruned: list[str]
    """Versions whose files went (or would go)."""
    kept: dict[str, str]
    """Every other version with files on disk: why it stays (registry.retention)."""
    freed_bytes: int
    dry_run: bool
    policy: Policy
    entries: list[HistoryEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "kept": self.kept,
            "freed_bytes": self.freed_bytes,
            "dry_run": self.dry_run,
            "policy": {"rollback_depth": self.policy.depth, "grace_s": self.policy.grace_s},
        }


@dataclass(frozen=True)
class DiskUsage:
    """The registry's files: how many versions have them on disk, and their bytes."""

    versions: int
    bytes: int


class Pruning:
    """`prune` and `disk_usage` of registry.base.Registry; it uses the backend's `_files`,
    `_records` and the `_mark_pruned` / `_transaction` of registry.transitions."""

    _files: store.AdapterFiles
    _transaction: Callable[[Callable[[Tx], Any]], Any]
    _mark_pruned: Callable[..., list[HistoryEntry]]

    def _records(self, version: str | None) -> list[VersionRecord]:
        raise NotImplementedError

    def prune(self, policy: Policy, *, actor: str, dry_run: bool = False, reason: str = "") -> PruneReport:
        """Delete the files of every version `policy` lets go; with `dry_run`, only say which."""
        on_disk = {r.version: r for v in self._files.versions() for r in self._records(v)}
        sizes = {v: self._files.size(v) for v in on_disk}
        reason = reason or f"retention: rollback depth {policy.depth}, grace {policy.grace_s:g} s"
        verdicts: dict[str, str] = {}

        def decide(tx: Tx) -> dict[str, dict[str, Any]]:
            _, active, running = tx.pointer()
            candidates = [
                Candidate(v, state, r.created_at, tx.pinned(v))
                for v, r in on_disk.items()
                if (state := tx.state(v)) in VISIBLE and tx.pruned_at(v) is None
            ]
            verdicts.clear()  # a backend may run the transaction again
            now = time.time()
            verdicts.update(
                reasons_to_keep(candidates, active=active, canary=running, stack=tx.stack(), policy=policy, now=now)
            )
            return {v: {"bytes": sizes[v]} for v, why in verdicts.items() if not why}

        if dry_run:
            going = list(self._transaction(decide))
            entries: list[HistoryEntry] = []
        else:
            entries = self._mark_pruned(decide, actor=actor, reason=reason)
            going = [e.version for e in entries if e.version is not None]
            self._delete_pruned()
        kept = {v: why for v, why in verdicts.items() if why}
        report = PruneReport(going, kept, sum(sizes[v] for v in going), dry_run, policy, entries)
        if going:
            logger.info(
                "%s %s the files of %s (%d bytes); kept %s",
                actor,
                "would prune" if dry_run else "pruned",
                ", ".join(going),
                report.freed_bytes,
                ", ".join(f"{v} ({why})" for v, why in kept.items()) or "nothing",
            )
        return report

    def _delete_pruned(self) -> None:
        for version in self._files.versions():
            records = self._records(version)
            if records and records[0].pruned_at is not None:
                self._files.remove(version)

    def disk_usage(self) -> DiskUsage:
        """What the registry's files take now (a walk of the version directories)."""
        names = self._files.versions()
        return DiskUsage(len(names), sum(self._files.size(v) for v in names))
