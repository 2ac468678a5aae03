"""The records the registry hands out (adapter versions, pointer history entries), and the reads
of versions every backend shares (`VersionReads`)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from registry.errors import UnknownVersion
from registry.store import AdapterFiles

VersionStatus = Literal["ready", "rejected"]
HistoryAction = Literal[
    "activate",
    "rollback",
    "canary_start",
    "canary_advance",
    "canary_promote",
    "canary_rollback",
    "canary_pause",
    "canary_resume",
    "erasure",
]
HISTORY_ACTIONS: tuple[str, ...] = get_args(HistoryAction)

# Accepted wherever a version may name the base model (besides None), e.g. from an admin API.
BASE = "base"


@dataclass(frozen=True)
class VersionInfo:
    """One published, immutable adapter version."""

    version: str
    status: VersionStatus
    parent: str | None
    created_at: float  # unix seconds, when the version became visible
    base_model: str
    sha256: str  # of adapter_model.safetensors
    path: Path
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    rejected_reason: str | None
    flags: tuple[dict[str, Any], ...] = ()
    """Added after publish, never removed: e.g. {"erasure": request id, "at", "reason"} when
    feedback it was trained on has since been erased at its user's request."""

    def to_json(self) -> dict[str, Any]:
        # path is left out on purpose: it is a detail of the host, not of the version.
        return {
            "version": self.version,
            "status": self.status,
            "parent": self.parent,
            "created_at": self.created_at,
            "base_model": self.base_model,
            "sha256": self.sha256,
            "metrics": copy.deepcopy(self.metrics),
            "lineage": copy.deepcopy(self.lineage),
            "rejected_reason": self.rejected_reason,
            "flags": copy.deepcopy(list(self.flags)),
        }


@dataclass(frozen=True)
class HistoryEntry:
    """One change of the active pointer or of the canary (registry.canary); version None is the
    base model.

    activate, rollback, canary_promote: the pointer moved from `previous` to `version`.
    canary_start, canary_rollback, canary_pause, canary_resume: the pointer stayed on `previous`
    (the active version); `version` is the canary's candidate.
    erasure: a user's data was erased; the pointer stayed, `version` and `previous` are None, and
    `evidence` has the request_id and the `flagged_versions` (registry.erasure).
    """

    seq: int
    at: float  # unix seconds
    action: HistoryAction
    version: str | None
    previous: str | None
    actor: str
    reason: str
    evidence: dict[str, Any] | None = None
    """What a decision rested on (counts, rates, statistic, threshold); None for plain moves and
    for entries written before evidence existed."""

    def names(self, version: str) -> bool:
        """Whether this entry is about `version`: it moved to or from it, or flagged it."""
        flagged = (self.evidence or {}).get("flagged_versions", ()) if self.action == "erasure" else ()
        return version in (self.version, self.previous) or version in flagged

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "version": self.version,
            "previous": self.previous,
            "actor": self.actor,
            "reason": self.reason,
            "evidence": copy.deepcopy(self.evidence),
        }


def metadata_json(value: dict[str, Any], what: str) -> str:
    """Strict JSON text of a metrics or lineage dict; ValueError if it cannot be one.

    Non-finite floats become null (with NaN the admin API could not serialize the version), so a
    gate that rejects a version for a NaN loss can still record it.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(_finite(value), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from e


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class VersionRecord(NamedTuple):
    """A visible version as a backend stores it: the fields of its metadata, written once at
    publish, with its state, rejection and flags."""

    version: str
    state: VersionStatus
    parent: str | None
    created_at: float
    base_model: str
    sha256: str
    files: dict[str, str]
    """{relative path: sha256} of every file."""
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    rejected_reason: str | None
    flags: list[dict[str, Any]]


class VersionReads:
    """`get`, `list_versions`, `adapter_path` and `verify_files` of registry.base.Registry, mixed
    into each backend, which supplies `_files` and `_records`."""

    _files: AdapterFiles

    def _records(self, version: str | None) -> list[VersionRecord]:
        """The visible versions, oldest first: only `version` when given (none if it is not)."""
        raise NotImplementedError

    def get(self, version: str) -> VersionInfo:
        return self._info(self._record(version))

    def list_versions(self) -> list[VersionInfo]:
        return [self._info(record) for record in self._records(None)]

    def adapter_path(self, version: str) -> Path:
        return self.get(version).path

    def verify_files(self, version: str) -> None:
        self._files.verify(version, self._record(version).files)

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
