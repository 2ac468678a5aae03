"""Erasure in the registry: when a user's data is erased on request, the versions trained on it
are flagged and the erasure goes into the history.

A published version never changes (its files, metrics and lineage are written once), so a flag
is kept beside it and shown with it (`VersionInfo.flags`): an operator sees that a version
learned from feedback that no longer exists and may retrain or roll back; the registry does not
decide that for them. The history entry (action `erasure`, pointer unchanged) carries the
evidence: the request id, the flagged versions and what the learner removed. Neither holds the
user id (the learner's evidence has its SHA-256, so a given id can be checked): the request id is
what ties the entry to the operator's record of the request.

Both steps happen in one transaction, with the pointer's counter bumped as for every history
entry; a request id already recorded returns its first entry and writes nothing, so the learner
may retry after a crash (its report is at least once).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from registry.errors import UnknownVersion
from registry.publishing import VISIBLE
from registry.versions import HistoryEntry, VersionInfo

if TYPE_CHECKING:
    from redis.client import Pipeline

logger = logging.getLogger(__name__)


def _evidence(request_id: str, versions: list[str], evidence: dict[str, Any] | None) -> dict[str, Any]:
    return {**(evidence or {}), "request_id": request_id, "flagged_versions": sorted(set(versions))}


class SqliteErasures:
    """Mixed into SqliteRegistry: uses its `_write`, `_read`, `_append_in`."""

    def record_erasure(
        self, request_id: str, versions: list[str], *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        with self._write() as c:
            done = c.execute(
                "SELECT seq, at, action, version, previous, actor, reason, evidence FROM history"
                " WHERE action = 'erasure' AND json_extract(evidence, '$.request_id') = ?",
                (request_id,)).fetchone()
            if done is not None:
                return HistoryEntry(*done[:7], json.loads(done[7]))
            for version in set(versions):
                if c.execute("SELECT 1 FROM versions WHERE version = ? AND state IN (?, ?)",
                             (version, *VISIBLE)).fetchone() is None:
                    raise UnknownVersion(version)
            at = time.time()
            c.executemany("INSERT OR IGNORE INTO flags (version, erasure, at, reason) VALUES (?, ?, ?, ?)",
                          [(v, request_id, at, reason) for v in sorted(set(versions))])
            entry = self._append_in(c, at, "erasure", None, None, actor, reason,
                                    _evidence(request_id, versions, evidence))
            c.execute("UPDATE pointer SET counter = counter + 1 WHERE id = 1")
        logger.info("%s recorded erasure %s: flagged %s", actor, request_id, ", ".join(versions) or "no version")
        return entry

    def _with_flags(self, infos: list[VersionInfo]) -> list[VersionInfo]:
        flags: dict[str, list[dict[str, Any]]] = defaultdict(list)
        # One version (get, on every swap): only its rows; a list: the whole (small) table.
        where, args = ("WHERE version = ? ", (infos[0].version,)) if len(infos) == 1 else ("", ())
        for version, erasure, at, reason in self._read(
                f"SELECT version, erasure, at, reason FROM flags {where}ORDER BY at", args):
            flags[version].append({"erasure": erasure, "at": at, "reason": reason})
        return [_flagged(info, flags.get(info.version)) for info in infos]


class RedisErasures:
    """Mixed into RedisRegistry: uses its `_redis`, `_keys`, `_pointer_in`, `_queue_entry`."""

    def record_erasure(
        self, request_id: str, versions: list[str], *, actor: str, reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        k = self._keys

        def plan(pipe: Pipeline) -> HistoryEntry:
            done = pipe.hget(k.erasures, request_id)
            if done is not None:
                pipe.multi()
                return HistoryEntry(**json.loads(done))
            flagged = sorted(set(versions))
            for version in flagged:
                if pipe.hget(k.state, version) not in VISIBLE:
                    raise UnknownVersion(version)
            # Read under WATCH of the pointer, which every erasure writes: a concurrent one
            # makes this transaction run again, so no flag is lost.
            old = [json.loads(text) if text else [] for text in (pipe.hmget(k.flags, flagged) if flagged else [])]
            counter, active, running = self._pointer_in(pipe)
            at = time.time()
            pipe.multi()
            for version, flags in zip(flagged, old):
                flags.append({"erasure": request_id, "at": at, "reason": reason})
                pipe.hset(k.flags, version, json.dumps(flags))
            entry = self._queue_entry(pipe, counter, "erasure", None, None, active, running, actor, reason,
                                      _evidence(request_id, versions, evidence))
            pipe.hset(k.erasures, request_id, json.dumps(entry.to_json()))
            return entry

        with self._redis() as r:
            entry = r.transaction(plan, k.state, k.pointer, k.erasures, value_from_callable=True)
        logger.info("%s recorded erasure %s: flagged %s", actor, request_id, ", ".join(versions) or "no version")
        return entry

    def _with_flags(self, infos: list[VersionInfo]) -> list[VersionInfo]:
        if not infos:
            return infos
        with self._redis() as r:
            texts = r.hmget(self._keys.flags, [info.version for info in infos])
        return [_flagged(info, text and json.loads(text)) for info, text in zip(infos, texts)]


def _flagged(info: VersionInfo, flags: list[dict[str, Any]] | None) -> VersionInfo:
    if not flags:
        return info
    return VersionInfo(**{**info.__dict__, "flags": tuple(flags)})

