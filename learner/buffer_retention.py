"""What the replay buffer (``learner.buffer``) keeps, and for how long.

Unrated responses and seen event_ids (``prune_unrated``): dropped ``retention_s`` after they were
stored, lazily, inside ``ReplayBuffer.apply``. Ratings parked for a response that never came
(``expire_pending``): moved to the dead-letter outbox after ``KTO_PENDING_TTL_S``.

Examples (``choose_drops``, then ``drop``), when the learner asks (``ReplayBuffer.enforce_retention``,
on its housekeeping schedule):

- none whose response was created more than ``max_age_s`` ago;
- of the rest, when more than ``max_examples`` remain: the newest ``recent_share`` of
  ``max_examples`` (by insertion), plus a uniform sample of the older ones for the remainder: those
  with the smallest salted hash of their response_id (a bottom-k sample, independent of the
  held-out split's hash). It is deterministic and stable: a sampled example stays until a newcomer
  to the past with a smaller hash pushes it out, so the past thins out evenly rather than
  churning, and replay keeps some memory of old feedback;
- never an example whose response was created at or after ``keep_since`` (the running canary's
  start: the canary counts those labels), bound or not.

Dropping an example is not an erasure, and keeps what the rest relies on, in one transaction:

- its row goes, and its response (the token ids) too, unless a kept example has it as KL partner:
  then the response stays, without an example, until no kept example points to it, so every kept
  pair (this prompt, the partner's completion) and its reference log-prob stay as computed and no
  example becomes fresh again. A later vote on such a response makes it an example again;
- if a version trained on it, a ``retired`` row keeps its id, a hash of its user and when it was
  created, and its ``trained`` rows stay, so that erasing that user later still flags the version
  (``learner.erasure``). An example no version trained on leaves nothing;
- the highest ``seq`` of a dropped referenced example is remembered (counter ``retired_seq``), so
  that ``ReplayBuffer.max_seq``, hence the trainer's watermark, never goes back.

A vote that arrives later for an answer whose response is gone waits for it like any early vote,
and goes to dead letters after ``KTO_PENDING_TTL_S``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
from dataclasses import dataclass

from learner import erasure
from learner.example import DeadLetter
from learner.join import dead_letter_event

logger = logging.getLogger(__name__)

SCHEMA = [
    # Whose response is the partner of which examples: what dropping and pruning look up.
    "CREATE INDEX IF NOT EXISTS examples_kl_partner ON examples (kl_partner)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('retired_seq', 0)",
]

# ReplayBuffer.max_seq: the highest seq of a referenced example, dropped ones included.
MAX_SEQ = """SELECT MAX(COALESCE((SELECT MAX(seq) FROM examples WHERE ref_logp IS NOT NULL), 0),
    (SELECT value FROM counters WHERE name = 'retired_seq'))"""

CHUNK = 2_000
"""Examples dropped per transaction, so that a scrape or a poll waits for one chunk at most."""


@dataclass(frozen=True)
class Bound:
    """The bound on examples (``learner.settings``: ``KTO_BUFFER_*``)."""

    max_examples: int | None = None
    """Most examples kept; None: no limit by count."""
    max_age_s: float | None = None
    """Seconds after its response was created that an example is dropped; None: no limit by age."""
    recent_share: float = 0.5
    """Share of ``max_examples`` kept as the newest; the rest is a sample of the older ones."""


def prune_unrated(conn: sqlite3.Connection, now: float, retention_s: float) -> None:
    """Drop responses stored before ``now - retention_s`` that no example has (nor has as KL
    partner), and event_ids seen before then. In the caller's transaction."""
    cutoff = now - retention_s
    dropped = conn.execute(
        "DELETE FROM responses WHERE stored_at < ?"
        " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.response_id = responses.response_id)"
        " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.kl_partner = responses.response_id)",
        (cutoff,),
    ).rowcount
    forgotten = conn.execute("DELETE FROM seen WHERE seen_at < ?", (cutoff,)).rowcount
    if dropped or forgotten:
        logger.info(
            "buffer dropped %d unrated responses and %d event ids older than %.0f s", dropped, forgotten, retention_s
        )


def expire_pending(conn: sqlite3.Connection, now: float, ttl_s: float) -> list[DeadLetter]:
    """Move feedback parked since ``now - ttl_s`` or earlier to the outbox, in the caller's
    transaction (``ReplayBuffer.expire_pending`` says why that is crash-safe)."""
    rows = conn.execute(
        "SELECT event_id, response_id, topic, part, record_offset, key, raw FROM pending"
        " WHERE parked_at <= ? ORDER BY parked_at, event_id",
        (now - ttl_s,),
    ).fetchall()
    expired = []
    for event_id, response_id, topic, part, offset, key, raw in rows:
        reason = f"response {response_id} never arrived within {ttl_s:g} s of its feedback {event_id}"
        dead_letter_event(conn, event_id, reason, topic, part, offset, key, raw, now)
        conn.execute("DELETE FROM pending WHERE event_id = ?", (event_id,))
        row = conn.execute(
            "SELECT id, reason FROM outbox WHERE topic = ? AND part = ? AND record_offset = ?", (topic, part, offset)
        ).fetchone()
        expired.append(DeadLetter(row[0], row[1], topic, part, offset, key, bytes(raw)))
    return expired


def _sample_key(response_id: str) -> bytes:
    # Salted, so that the sample is independent of the held-out split (a sha256 of the bare id).
    return hashlib.blake2b(response_id.encode(), digest_size=8, person=b"kto-retain").digest()


def choose_drops(conn: sqlite3.Connection, bound: Bound, *, now: float, keep_since: float | None) -> list[str]:
    """The response_ids of the examples to drop (see the module docstring), oldest first."""
    rows = conn.execute(
        "SELECT e.response_id, r.created_at FROM examples e JOIN responses r ON r.response_id = e.response_id"
        " ORDER BY e.position"
    ).fetchall()
    protected = {i for i, created in rows if keep_since is not None and created >= keep_since}
    max_age_s, max_examples = bound.max_age_s, bound.max_examples
    too_old = {i for i, created in rows if max_age_s is not None and created < now - max_age_s} - protected
    left = [i for i, _ in rows if i not in too_old]
    if max_examples is None or len(left) <= max_examples:
        return [i for i, _ in rows if i in too_old]
    recent = math.ceil(max_examples * bound.recent_share)
    older = left[: len(left) - recent]
    room = max(0, max_examples - recent - sum(i in protected for i in older))
    sampled = set(sorted((i for i in older if i not in protected), key=_sample_key)[:room])
    drops = too_old | {i for i in older if i not in protected and i not in sampled}
    return [i for i, _ in rows if i in drops]


def drop(conn: sqlite3.Connection, response_ids: list[str]) -> int:
    """Drop these examples (see the module docstring) in the caller's transaction; how many were there."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS dropping (response_id TEXT PRIMARY KEY)")
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS unpaired (response_id TEXT PRIMARY KEY)")
    conn.executemany("INSERT OR IGNORE INTO dropping VALUES (?)", [(i,) for i in response_ids])
    conn.execute(
        "UPDATE counters SET value = MAX(value, (SELECT COALESCE(MAX(seq), 0) FROM examples"
        " WHERE response_id IN dropping AND ref_logp IS NOT NULL)) WHERE name = 'retired_seq'"
    )
    trained = conn.execute(
        "SELECT r.response_id, r.user, r.created_at FROM responses r WHERE r.response_id IN dropping"
        " AND r.user IS NOT NULL AND EXISTS (SELECT 1 FROM trained t WHERE t.response_id = r.response_id)"
    ).fetchall()
    conn.executemany(
        "INSERT OR IGNORE INTO retired (response_id, user_hash, created_at) VALUES (?, ?, ?)",
        [(i, erasure.user_hash(user), created) for i, user, created in trained],
    )
    # Their own responses, and their partners' (which may have been kept only for them).
    conn.execute("INSERT OR IGNORE INTO unpaired SELECT response_id FROM dropping")
    conn.execute(
        "INSERT OR IGNORE INTO unpaired SELECT kl_partner FROM examples"
        " WHERE response_id IN dropping AND kl_partner IS NOT NULL"
    )
    dropped = conn.execute("DELETE FROM examples WHERE response_id IN dropping").rowcount
    conn.execute(
        "DELETE FROM responses WHERE response_id IN unpaired"
        " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.response_id = responses.response_id)"
        " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.kl_partner = responses.response_id)"
    )
    conn.execute("DELETE FROM dropping")
    conn.execute("DELETE FROM unpaired")
    return dropped
