"""The records the registry hands out (adapter versions, pointer history entries) and keeps
(`VersionRecord`)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

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
    "pin",
    "unpin",
    "prune",
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
    pinned: bool = False
    """An operator pinned it: retention keeps its files (registry.retention)."""
    pruned_at: float | None = None
    """Unix seconds when retention deleted its files; its metadata stays, nothing can serve it."""

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
            "pinned": self.pinned,
            "pruned_at": self.pruned_at,
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
    pin, unpin, prune: `version` was pinned, unpinned, or had its files deleted by retention
    (registry.retention; `evidence` says why and how many bytes); the pointer stayed on `previous`.
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


@dataclass(frozen=True)
class RuleSetVersion:
    """One version of the operator's rule set (labelers.rules validates it; the registry keeps it)."""

    version: int
    at: float  # unix seconds
    actor: str
    reason: str
    rules: dict[str, Any]
    """The whole set, as `PUT /v1/rules` took it: {"rules": [...]}."""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "at": self.at,
            "actor": self.actor,
            "reason": self.reason,
            "rules": copy.deepcopy(self.rules),
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
    pinned: bool = False
    pruned_at: float | None = None
