"""The Registry: what serve and the learner may ask of any registry backend.

Each operation is written once, here and in the mixins (registry.transitions for the pointer,
the canary, rejections, erasures and pins; registry.publishing for publishes; registry.pruning
for retention). A backend supplies its
storage: `_files`, `_catalog`, `_records`, `_transaction` and the reads and lifecycle below
marked abstract.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from registry.canary import Canary
from registry.errors import UnknownVersion
from registry.pruning import Pruning
from registry.publishing import Publishing
from registry.transitions import Transitions
from registry.versions import HistoryEntry, RuleSetVersion, VersionInfo, VersionRecord

logger = logging.getLogger(__name__)


class Registry(Transitions, Publishing, Pruning, ABC):
    """Adapter versions, their files, the active pointer, the canary and their history.

    Version names (v0001, v0002, …) are allocated by the registry, never reused, and a version's
    files never change after publish. `None` as a version means the base model.
    """

    # ---- versions ----

    def get(self, version: str) -> VersionInfo:
        """The version's record; UnknownVersion if there is no such visible version."""
        return self._info(self._record(version))

    def list_versions(self) -> list[VersionInfo]:
        """All visible versions, oldest first."""
        return [self._info(record) for record in self._records(None)]

    def adapter_path(self, version: str) -> Path:
        """The directory holding the version's files; UnknownVersion if none."""
        return self.get(version).path

    def verify_files(self, version: str) -> None:
        """Raise VerificationError unless every file is present with its recorded checksum."""
        self._files.verify(version, self._record(version).files)

    @abstractmethod
    def _records(self, version: str | None) -> list[VersionRecord]:
        """The visible versions, oldest first: only `version` when given (none if it is not)."""

    def _record(self, version: str) -> VersionRecord:
        records = self._records(version)
        if not records:
            raise UnknownVersion(version)
        return records[0]

    def _info(self, r: VersionRecord) -> VersionInfo:
        return VersionInfo(
            version=r.version,
            status=r.state,
            parent=r.parent,
            created_at=r.created_at,
            base_model=r.base_model,
            sha256=r.sha256,
            path=self._files.path(r.version),
            metrics=r.metrics,
            lineage=r.lineage,
            rejected_reason=r.rejected_reason,
            flags=tuple(r.flags),
            pinned=r.pinned,
            pruned_at=r.pruned_at,
        )

    # ---- the pointer, its history and the canary ----

    def active(self) -> str | None:
        """The active version, None for the base model."""
        return self.pointer()[1]

    @abstractmethod
    def pointer(self) -> tuple[int, str | None]:
        """(change counter, active version): cheap enough to poll several times a second.

        The counter grows with every history entry (canary steps included), so a poller that saw
        the same counter has missed nothing."""

    @abstractmethod
    def wait_for_change(self, timeout_s: float) -> None:
        """Block until a pointer change may have happened, or timeout_s passed; then read
        `pointer()`. Only a wake-up hint: it may return early with nothing changed, and a
        backend without notifications just sleeps, so a poller that calls it between reads of
        `pointer()` sees every change within timeout_s however messages fare."""

    @abstractmethod
    def history(self) -> list[HistoryEntry]:
        """Every pointer change, oldest first."""

    @abstractmethod
    def canary(self) -> Canary | None:
        """The running canary (rules: registry.canary), None when none runs."""

    # ---- the operator's rule set, versioned like adapters ----

    def put_rules(self, rules: dict[str, Any], *, actor: str, reason: str = "") -> RuleSetVersion:
        """Store `rules` (the whole set, validated by the caller) as the next version; it becomes
        the current one. Versions count 1, 2, … and are never reused."""
        stored = self._append_rule_set(json.dumps(rules), actor, reason, time.time())
        logger.info("%s stored rule set version %d (%d rules)", actor, stored.version, len(rules.get("rules", [])))
        return stored

    def rules(self) -> RuleSetVersion | None:
        """The current rule set; None before the first `put_rules`."""
        sets = self._rule_sets(latest=True)
        return sets[-1] if sets else None

    def rule_history(self) -> list[RuleSetVersion]:
        """Every version of the rule set, oldest first."""
        return self._rule_sets(latest=False)

    @abstractmethod
    def _append_rule_set(self, rules_json: str, actor: str, reason: str, at: float) -> RuleSetVersion:
        """Atomically allocate the next version and store the set under it."""

    @abstractmethod
    def _rule_sets(self, latest: bool) -> list[RuleSetVersion]:
        """The stored sets, oldest first; only the newest when `latest`."""

    # ---- lifecycle ----

    @abstractmethod
    def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent."""

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
