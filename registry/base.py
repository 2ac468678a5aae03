"""The Registry protocol: what serve and the learner may ask of any registry backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from registry.canary import Canary
from registry.versions import HistoryEntry, VersionInfo


class Registry(Protocol):
    """Adapter versions, their files, the active pointer, the canary and their history.

    Version names (v0001, v0002, …) are allocated by the registry, never reused, and a version's
    files never change after publish. `None` as a version means the base model.
    """

    def publish(
        self,
        src_dir: Path,
        *,
        base_model: str,
        parent: str | None,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "ready",
        rejected_reason: str | None = None,
    ) -> VersionInfo:
        """Copy a PEFT adapter directory in as a new immutable version, atomically."""
        ...

    def get(self, version: str) -> VersionInfo:
        """The version's record; UnknownVersion if there is no such visible version."""
        ...

    def list_versions(self) -> list[VersionInfo]:
        """All visible versions, oldest first."""
        ...

    def adapter_path(self, version: str) -> Path:
        """The directory holding the version's files; UnknownVersion if none."""
        ...

    def active(self) -> str | None:
        """The active version, None for the base model."""
        ...

    def pointer(self) -> tuple[int, str | None]:
        """(change counter, active version): cheap enough to poll several times a second.

        The counter grows with every history entry (canary steps included), so a poller that saw
        the same counter has missed nothing."""
        ...

    def wait_for_change(self, timeout_s: float) -> None:
        """Block until a pointer change may have happened, or timeout_s passed; then read
        `pointer()`. Only a wake-up hint: it may return early with nothing changed, and a
        backend without notifications just sleeps, so a poller that calls it between reads of
        `pointer()` sees every change within timeout_s however messages fare."""
        ...

    def activate(self, version: str | None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Point serving at `version` (None = base); UnknownVersion, VersionRejected."""
        ...

    def rollback(self, to: str | None = None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Return to an earlier version: `to` if given (BASE for the base), else the stack rule."""
        ...

    def history(self) -> list[HistoryEntry]:
        """Every pointer change, oldest first."""
        ...

    def reject(self, version: str, reason: str, *, actor: str = "registry") -> None:
        """Mark a version rejected forever; if it is active, roll back from it; if it is the
        canary's candidate, the canary ends (a canary_rollback entry)."""
        ...

    # The canary: rules in registry.canary. `version` names the candidate the caller means, so a
    # decision about one canary never lands on the next: NoCanary if that is not what runs.

    def canary(self) -> Canary | None:
        """The running canary, None when none runs."""
        ...

    def start_canary(
        self, version: str, share: float, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Route `share` of the users to `version`; CanaryRunning, InvalidCanary (it is active),
        UnknownVersion, VersionRejected, ValueError (share not in (0, 1])."""
        ...

    def advance_canary(
        self, version: str, to: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Move the canary of `version` on to `to`, a version trained from it; same users, the
        evidence goes on. NoCanary, InvalidCanary (not trained from it), UnknownVersion,
        VersionRejected."""
        ...

    def promote_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Activate the candidate (the activate path: the stack rules hold); the canary ends."""
        ...

    def rollback_canary(
        self, version: str, *, actor: str, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> HistoryEntry:
        """Reject the candidate forever; the canary ends and the active version stays."""
        ...

    def pause_canary(self, version: str, paused: bool, *, actor: str, reason: str = "") -> HistoryEntry:
        """Pause (route nobody to the candidate, decide nothing) or resume the canary."""
        ...

    def report_canary(self, version: str, evidence: dict[str, Any]) -> bool:
        """Keep the controller's latest evidence on the canary (no history entry, no counter
        bump); False if no canary of `version` runs."""
        ...

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
        and append an `erasure` history entry, in one transaction; the pointer stays. Idempotent
        per request_id (a repeat returns the first entry); UnknownVersion writes nothing."""
        ...

    def verify_files(self, version: str) -> None:
        """Raise VerificationError unless every file is present with its recorded checksum."""
        ...

    def ping(self) -> None:
        """Raise if the backend cannot be reached."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...
