"""Version retention: which versions keep their files, as pure rules shared by every backend.

A version's metadata, lineage and history are kept forever; only its files (the adapter
weights, the bulk of the disk) go. The files of a version stay while any of these holds:

    active      it is what everyone is served;
    canary      it is the running canary's candidate;
    pinned      an operator pinned it (`pin`), to keep it whatever happens;
    rollback    it is one of the newest `depth` versions of the rollback stack, so that `depth`
                plain rollbacks in a row still land on a version that can be loaded;
    newest      it is the newest ready version: not served yet, it may still be released (by
                the learner between its publish and its canary step, or by an operator when
                activation is manual). A newer ready version replaces it, so versions waiting to
                be served never pile up;
    grace       it is ready, younger than `grace_s`, and newer than what serves (the active
                version and the candidate): it may still be released, and a replica or an
                operator may have just seen it.

A version the gate or a canary rejected can never be served again, a candidate its canary
advanced past will not be served again, and a version older than what serves was superseded
by it: no grace for these. Everything else goes once no rule keeps it. A pruned version answers
404 wherever it is named for serving, and a stack rollback skips it like a rejected one (the
base model stays the floor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from registry.canary import Canary

DEFAULT_DEPTH = 3
DEFAULT_GRACE_S = 60.0


@dataclass(frozen=True)
class Policy:
    """How much to keep: `depth` rollback steps, and `grace_s` seconds for a new ready version."""

    depth: int = DEFAULT_DEPTH
    grace_s: float = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"rollback depth must be >= 0, not {self.depth}")
        if self.grace_s < 0:
            raise ValueError(f"grace must be >= 0 seconds, not {self.grace_s}")


@dataclass(frozen=True)
class Candidate:
    """A version whose files are still on disk, as the rules see it."""

    version: str
    state: str  # ready | rejected
    created_at: float
    pinned: bool


def kept_stack(stack: Sequence[str | None], depth: int) -> list[str]:
    """The versions of the newest `depth` distinct entries of the rollback stack (the base model,
    None, counts as an entry but has no files)."""
    seen: list[str | None] = []
    for entry in reversed(stack):
        if entry not in seen:
            seen.append(entry)
        if len(seen) == depth:
            break
    return [v for v in seen if v is not None]


def reasons_to_keep(
    candidates: Iterable[Candidate],
    *,
    active: str | None,
    canary: Canary | None,
    stack: Sequence[str | None],
    policy: Policy,
    now: float,
) -> dict[str, str]:
    """{version: why its files stay, or "" when they may go} for every candidate."""
    candidates = sorted(candidates, key=lambda c: c.created_at)
    ready = [c.version for c in candidates if c.state == "ready"]
    newest = ready[-1] if ready else None
    in_stack = set(kept_stack(stack, policy.depth))
    replaced = set(canary.versions[:-1]) if canary is not None else set()
    serving = [c.created_at for c in candidates if c.version in (active, canary and canary.version)]
    superseded_before = max(serving, default=float("-inf"))
    out: dict[str, str] = {}
    for c in candidates:
        if c.version == active:
            why = "active"
        elif canary is not None and c.version == canary.version:
            why = "canary"
        elif c.pinned:
            why = "pinned"
        elif c.version in in_stack:
            why = "rollback"
        elif c.state != "ready" or c.version in replaced:
            why = ""
        elif c.version == newest:
            why = "newest"
        elif now - c.created_at < policy.grace_s and c.created_at > superseded_before:
            why = "grace"
        else:
            why = ""
        out[c.version] = why
    return out
