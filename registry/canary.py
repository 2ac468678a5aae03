"""The canary: a newly published version serves a share of users before it may replace the
active one. Its state and rules, as pure functions shared by every backend.

A canary is part of the registry's pointer state (the SQLite `pointer` row, the Redis `pointer`
hash), so it changes atomically with the active version. One runs at a time:

    start            candidate C serves `share` of the users (a stable hash of user and C, so
                     sticky per user); everyone else, and every anonymous request, stays on the
                     active version A. C must be ready and not active.
    advance          the candidate moves on to C', a ready version trained from C (the learner
                     keeps training the candidate's lineage while its canary runs). The same
                     users stay inside (the hash is of the canary's first candidate), the
                     evidence goes on: what the canary tests is its lineage as it served
                     (learner.canary says how). `versions` lists every candidate in order.
    promote          C becomes active through the activate path (the rollback stack rules hold);
                     the canary is over.
    rollback         C is rejected, forever: nothing activates it, no stack rollback returns to
                     it, no later canary runs it. The canary is over; A never stopped serving.
    pause / resume   a paused canary routes nobody to C and the learner's controller decides
                     nothing; C stays loaded.
    report           the controller's latest evidence (counts, rates, interval) is kept on the
                     canary for operators; not a history entry, no change-counter bump.

Every step but report bumps the change counter and appends a history entry (with its evidence),
so serving replicas notice it through `pointer()` / `wait_for_change` as they notice activations.

Pointer moves made while a canary runs keep it, with two exceptions: activating C (by hand, or
a stack rollback that lands on it) ends it, since C is then what everyone gets; rejecting C ends
it as a rollback. When A changes under a running canary (an operator activates or rolls back),
the canary compares C with the new A from then on: `baseline` and `since` move, and evidence
gathered against the old A is not counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from registry.errors import CanaryRunning, InvalidCanary, NoCanary
from registry.versions import metadata_json


@dataclass(frozen=True)
class Canary:
    """A running canary."""

    version: str
    """The candidate."""
    share: float
    """Fraction of users, in (0, 1], routed to the candidate."""
    started_at: float
    """Unix seconds when the canary started."""
    baseline: str | None
    """The active version it is compared with (None = the base model)."""
    since: float
    """Unix seconds from which responses count as evidence: started_at, or the last time the
    active version changed under the canary."""
    paused: bool
    actor: str
    """Who started it."""
    evidence: dict[str, Any] | None = None
    """The controller's latest report (see learner.canary), None before the first."""
    evidence_at: float | None = None
    """Unix seconds of that report."""
    versions: tuple[str, ...] = ()
    """Every candidate of this canary, oldest first, `version` last (filled in when empty: a
    canary stored before `advance` existed had only its first)."""

    def __post_init__(self) -> None:
        if not self.versions:
            object.__setattr__(self, "versions", (self.version,))
        object.__setattr__(self, "versions", tuple(self.versions))

    @property
    def cohort(self) -> str:
        """What decides who is inside: the first candidate (registry.canary.in_canary)."""
        return self.versions[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def loads(cls, text: str | None) -> Canary | None:
        """The canary stored as `text` (None or "" when none runs)."""
        if not text:
            return None
        return cls(**json.loads(text))


def in_canary(user: str, cohort: str, share: float) -> bool:
    """Whether `user` is routed to the candidate of the canary whose `cohort` (its first
    candidate) is given, at `share`: a stable hash of both, so a user stays on one side for the
    whole canary, advances included, and each new canary draws its users anew. The users inside
    at share s are also inside at any larger share."""
    digest = hashlib.sha256(f"{cohort}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def check_share(share: float) -> float:
    if not 0 < share <= 1:
        raise ValueError(f"a canary's share must be in (0, 1], got {share!r}")
    return float(share)


def start(running: Canary | None, active: str | None, version: str, share: float, *, actor: str, now: float) -> Canary:
    """The new canary; CanaryRunning if one runs, InvalidCanary if `version` is active.
    (Whether the version exists and is ready is the backend's check.)"""
    share = check_share(share)
    if running is not None:
        raise CanaryRunning(running.version)
    if version == active:
        raise InvalidCanary(version, "it is the active version already")
    return Canary(version, share, now, active, now, False, actor)


def advance(running: Canary | None, version: str, to: str, parent: str | None) -> Canary:
    """The canary of `version` with `to` (whose parent is `parent`) as its candidate;
    NoCanary unless a canary of `version` runs, InvalidCanary unless `to` was trained from it.
    (Whether `to` exists and is ready is the backend's check.)"""
    running = require(running, version)
    if parent != running.version:
        raise InvalidCanary(
            to, f"it was trained from {parent or 'the base model'}, not from the candidate {running.version}"
        )
    return replace(running, version=to, versions=(*running.versions, to))


def require(running: Canary | None, version: str | None) -> Canary:
    """The running canary; NoCanary unless one runs, and (when given) it is of `version`."""
    if running is None or (version is not None and running.version != version):
        raise NoCanary(version)
    return running


def after_move(running: Canary | None, active: str | None, *, now: float) -> Canary | None:
    """The canary after the active version moved to `active` (see the module docstring)."""
    if running is None or running.version == active:
        return None
    if running.baseline == active:
        return running
    return replace(running, baseline=active, since=now, evidence=None, evidence_at=None)


def paused(running: Canary, flag: bool) -> Canary:
    return replace(running, paused=flag)


def reported(running: Canary, evidence: dict[str, Any], *, now: float) -> Canary:
    strict = json.loads(metadata_json(evidence, "evidence"))  # what a reader will get back
    return replace(running, evidence=strict, evidence_at=now)


def evidence_json(evidence: dict[str, Any] | None) -> str | None:
    """Strict JSON text of a history entry's evidence (None stays None)."""
    return None if evidence is None else metadata_json(evidence, "evidence")


def rejection(actor: str, reason: str) -> str:
    """The rejected_reason a rolled-back candidate keeps."""
    return f"canary rolled back by {actor}" + (f": {reason}" if reason else "")
