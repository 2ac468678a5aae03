"""The Registry: what serve and the learner may ask of any registry backend.

Each operation is written once, here and in the mixins (registry.transitions for the pointer,
the canary, rejections and erasures; registry.publishing for publishes). A backend supplies its
storage: `_files`, `_catalog`, `_records`, `_transaction` and the reads and lifecycle below
marked abstract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from registry.canary import Canary
from registry.errors import UnknownVersion
from registry.publishing import Publishing
from registry.transitions import Transitions
from registry.versions import HistoryEntry, VersionInfo, VersionRecord


class Registry(Transitions, Publishing, ABC):
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
