"""Erasing a user's data from the learner (an ``ErasureEvent``, sent by serve's admin API).

Inside the buffer's write transaction, before the rest of the batch (``learner.join``):

- the user's responses, examples, parked ratings and training records leave the buffer;
- examples of other users whose KL partner was one of the user's answers get a new partner (the
  nearest remaining example) and lose their reference log-probs, which are computed again: the
  erased completion must not stay in anybody's training pair;
- a tombstone, keyed by a hash of the user id, drops the user's events created up to the
  erasure if they arrive later (a replay after a restart, a spool emptying late); their events
  created afterwards are new data;
- an ``erasures`` row keeps what was removed and which versions were trained on it (from the
  ``trained`` table that ``ReplayBuffer.mark_trained`` fills at each publish), the user's examples
  that buffer retention dropped included (their ``retired`` rows, ``learner.buffer_retention``).

The learner then reports each erasure to the registry (``report``): the versions are flagged and
the erasure goes into the history (``registry.erasure``), at least once, and the registry ignores a
repeat. Neither the buffer nor the registry keeps the user id afterwards, only its hash here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass

from ingest.events import ErasureEvent

logger = logging.getLogger(__name__)

SCHEMA = [
    # Which version was trained on which example (an example's label may change between versions).
    """CREATE TABLE IF NOT EXISTS trained (
        response_id TEXT NOT NULL,
        version TEXT NOT NULL,
        PRIMARY KEY (response_id, version)) WITHOUT ROWID""",
    # Examples that buffer retention dropped after a version trained on them: enough to flag that
    # version if their user is erased later (a hash of the user, not the user).
    """CREATE TABLE IF NOT EXISTS retired (
        response_id TEXT PRIMARY KEY,
        user_hash TEXT NOT NULL,
        created_at REAL NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS retired_user ON retired (user_hash)",
    "CREATE TABLE IF NOT EXISTS tombstones (user_hash TEXT PRIMARY KEY, erased_before REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS erasures (
        request_id TEXT PRIMARY KEY,
        user_hash TEXT NOT NULL,
        requested_at REAL NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        removed TEXT NOT NULL,
        versions TEXT NOT NULL,
        reported_at REAL)""",
]


def user_hash(user: str) -> str:
    """How the buffer remembers an erased user: enough to recognise their events, not to name them."""
    return hashlib.sha256(user.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Erasure:
    """An erasure applied to the buffer, to be reported to the registry."""

    request_id: str
    user_hash: str
    requested_at: float
    actor: str
    reason: str
    removed: dict[str, int]
    versions: list[str]


def erase(conn: sqlite3.Connection, event: ErasureEvent) -> Erasure:
    """Apply ``event`` in the caller's transaction (see the module docstring); idempotent."""
    key = user_hash(event.user)
    conn.execute(
        "INSERT INTO tombstones (user_hash, erased_before) VALUES (?, ?) ON CONFLICT (user_hash)"
        " DO UPDATE SET erased_before = MAX(erased_before, excluded.erased_before)",
        (key, event.created_at),
    )
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS erased (response_id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM erased")
    conn.execute(
        "INSERT INTO erased SELECT response_id FROM responses WHERE user = ? AND created_at <= ?",
        (event.user, event.created_at),
    )
    conn.execute(
        "INSERT OR IGNORE INTO erased SELECT response_id FROM retired WHERE user_hash = ? AND created_at <= ?",
        (key, event.created_at),
    )
    versions = [
        v
        for (v,) in conn.execute(
            "SELECT DISTINCT version FROM trained WHERE response_id IN (SELECT response_id FROM erased) "
            "ORDER BY version"
        )
    ]
    _repartner(conn)
    removed = {
        "examples": conn.execute("DELETE FROM examples WHERE response_id IN (SELECT response_id FROM erased)").rowcount,
        "pending_ratings": conn.execute(
            "DELETE FROM pending WHERE user = ? AND created_at <= ?", (event.user, event.created_at)
        ).rowcount,
    }
    conn.execute("DELETE FROM trained WHERE response_id IN (SELECT response_id FROM erased)")
    conn.execute("DELETE FROM retired WHERE response_id IN (SELECT response_id FROM erased)")
    removed["responses"] = conn.execute(
        "DELETE FROM responses WHERE response_id IN (SELECT response_id FROM erased)"
    ).rowcount
    conn.execute("DELETE FROM erased")
    erasure = Erasure(event.event_id, key, event.created_at, event.actor, event.reason, removed, versions)
    conn.execute(
        "INSERT OR IGNORE INTO erasures (request_id, user_hash, requested_at, actor, reason, removed, versions)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            erasure.request_id,
            key,
            erasure.requested_at,
            erasure.actor,
            erasure.reason,
            json.dumps(removed),
            json.dumps(versions),
        ),
    )
    logger.info("erasure %s: removed %s; versions trained on it: %s", event.event_id, removed, versions or "none")
    return erasure


def _repartner(conn: sqlite3.Connection) -> None:
    """Give every remaining example whose KL partner is erased the nearest remaining one instead."""
    orphans = conn.execute(
        "SELECT response_id, position FROM examples WHERE kl_partner IN (SELECT response_id FROM erased)"
        " AND response_id NOT IN (SELECT response_id FROM erased) ORDER BY position"
    ).fetchall()
    for response_id, position in orphans:
        kept = " AND response_id NOT IN (SELECT response_id FROM erased) AND response_id != ?"
        partner = (
            conn.execute(
                f"SELECT response_id FROM examples WHERE position < ?{kept} ORDER BY position DESC LIMIT 1",
                (position, response_id),
            ).fetchone()
            or conn.execute(
                f"SELECT response_id FROM examples WHERE position > ?{kept} ORDER BY position LIMIT 1",
                (position, response_id),
            ).fetchone()
        )
        # Its reference log-probs were of the old pair: computed again (which makes it fresh again).
        conn.execute(
            "UPDATE examples SET kl_partner = ?, ref_logp = NULL, kl_ref_logp = NULL WHERE response_id = ?",
            (partner and partner[0], response_id),
        )


def tombstones(conn: sqlite3.Connection) -> dict[str, float]:
    """user hash → events of that user created up to this time are erased."""
    return dict(conn.execute("SELECT user_hash, erased_before FROM tombstones").fetchall())


def is_erased(tombstones: dict[str, float], user: str | None, created_at: float) -> bool:
    """Whether an event of ``user`` created at ``created_at`` was erased (``tombstones()``)."""
    return user is not None and tombstones.get(user_hash(user), float("-inf")) >= created_at


def to_report(conn: sqlite3.Connection) -> list[Erasure]:
    rows = conn.execute(
        "SELECT request_id, user_hash, requested_at, actor, reason, removed, versions FROM erasures"
        " WHERE reported_at IS NULL ORDER BY requested_at"
    ).fetchall()
    return [
        Erasure(request_id, hashed, requested_at, actor, reason, json.loads(removed), json.loads(versions))
        for request_id, hashed, requested_at, actor, reason, removed, versions in rows
    ]


def report(buffer, registry) -> int:
    """Record each applied erasure in the registry (flags and history), then mark it reported."""
    done = 0
    for erasure in buffer.erasures_to_report():
        registry.record_erasure(
            erasure.request_id,
            erasure.versions,
            actor=f"learner (asked by {erasure.actor})",
            reason=erasure.reason or "a user's data was erased on request",
            evidence={
                "user_sha256": erasure.user_hash,
                "requested_at": erasure.requested_at,
                "removed": erasure.removed,
            },
        )
        buffer.erasure_reported(erasure.request_id)
        done += 1
    return done
