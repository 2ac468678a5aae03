"""Erasure in the registry: when a user's data is erased on request, the versions trained on it
are flagged and the erasure goes into the history.

A published version never changes (its files, metrics and lineage are written once), so a flag
is kept beside it and shown with it (`VersionInfo.flags`): an operator sees that a version
learned from feedback that no longer exists and may retrain or roll back; the registry does not
decide that for them. The history entry (action `erasure`, pointer unchanged) carries the
evidence: the request id, the flagged versions and what the learner removed. Neither holds the
user id (the learner's evidence has its SHA-256, so a given id can be checked): the request id is
what ties the entry to the operator's record of the request.

Both steps happen in one transaction (registry.transitions), with the pointer's counter bumped
as for every history entry; a request id already recorded returns its first entry and writes
nothing, so the learner may retry after a crash (its report is at least once).
"""

from __future__ import annotations

from typing import Any


def erasure_evidence(request_id: str, versions: list[str], evidence: dict[str, Any] | None) -> dict[str, Any]:
    """The evidence of an erasure's history entry: the learner's, with the request and the flags."""
    return {**(evidence or {}), "request_id": request_id, "flagged_versions": sorted(set(versions))}
