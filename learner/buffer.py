"""The replay buffer: labeled examples, durable in one SQLite file, and the state of the join.

One file (WAL, ``synchronous=FULL``) holds everything the learner must not lose or count twice:

- ``seen``: every event_id applied, so a re-delivered event changes nothing (a dead-lettered
  event's id is forgotten, so that replaying it from the dead-letter topic counts);
- ``responses``: every response, with its token ids exactly as served, kept for joining; those
  never rated are dropped after ``retention_s`` (seen event_ids too: by then they were committed);
- ``examples``: one per rated response, with its current label, ``seq``, reference log-probs
  and fixed KL partner; kept until erased, or dropped by the bound on the buffer (what stays, and
  what a dropped example leaves for the rest: ``learner.buffer_retention``);
- ``pending``: feedback parked until its response arrives, with raw bytes and bus position;
- ``outbox``: dead letters not yet published (see ``learner.consumer`` for who sends them);
- ``trained``, ``tombstones``, ``erasures``: which version trained on which example, and what
  erasing a user's data removed (``learner.erasure``).

``seq`` is a counter, never reused, stamped on an example whenever it becomes something new to
train on: when it is labeled, relabeled with the other label, and when its reference log-probs
are set. An example is "fresh" above the trainer's watermark. The bump at ``set_reference`` is
what keeps the watermark safe: an example labeled before others but referenced after them still
lands above a watermark taken meanwhile, so it is never skipped.

The KL partner of an example is the example inserted just before it (the mismatched pair of the
KTO paper's z0: prompt i with completion i-1). The very first example has none until the second
arrives, and takes that one; ``unreferenced`` returns only examples that have a partner.

Held-out selection is the trainer's (by a hash of response_id over ``index()``).

Thread-safe: one connection under a lock. Other processes may open the file too (WAL).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from foundation.sqlite import connect, ensure_schema, shrink, write_transaction
from learner import buffer_retention, erasure
from learner.example import EXAMPLE_SQL, DeadLetter, Example, ExampleRef, example_from_row
from learner.join import ApplyResult, Polled, apply_batch, next_counter

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
_PRUNE_EVERY_S = 60.0
_LAYOUT_VERSION = 5  # 2 adds the erasure tables (created on open); 3 the labels' source; 4 their weight;
# 5 retention (older code would prune the responses kept as KL partners of kept examples)
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, seen_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_at ON seen (seen_at)",
    """CREATE TABLE IF NOT EXISTS responses (
        response_id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        user TEXT,
        adapter_version TEXT,
        prompt_ids TEXT NOT NULL,
        completion_ids TEXT NOT NULL,
        created_at REAL NOT NULL,
        stored_at REAL NOT NULL,
        rejected TEXT)""",
    "CREATE INDEX IF NOT EXISTS responses_stored_at ON responses (stored_at)",
    # Covering ``index()``'s join, so that planning an update never reads the token-id columns.
    "CREATE INDEX IF NOT EXISTS responses_user_of ON responses (response_id, user)",
    """CREATE TABLE IF NOT EXISTS examples (
        response_id TEXT PRIMARY KEY REFERENCES responses (response_id),
        desirable INTEGER NOT NULL,
        feedback_event_id TEXT NOT NULL,
        labeled_at REAL NOT NULL,
        seq INTEGER NOT NULL UNIQUE,
        position INTEGER NOT NULL UNIQUE,
        kl_partner TEXT,
        ref_logp REAL,
        kl_ref_logp REAL,
        times_trained INTEGER NOT NULL DEFAULT 0,
        source TEXT NOT NULL DEFAULT 'human',
        weight REAL NOT NULL DEFAULT 1.0)""",
    "CREATE INDEX IF NOT EXISTS examples_unreferenced ON examples (position) WHERE ref_logp IS NULL",
    """CREATE TABLE IF NOT EXISTS pending (
        event_id TEXT PRIMARY KEY,
        response_id TEXT NOT NULL,
        user TEXT NOT NULL,
        desirable INTEGER NOT NULL,
        created_at REAL NOT NULL,
        parked_at REAL NOT NULL,
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        record_offset INTEGER NOT NULL,
        key TEXT,
        raw BLOB NOT NULL,
        source TEXT NOT NULL DEFAULT 'human',
        weight REAL NOT NULL DEFAULT 1.0)""",
    "CREATE INDEX IF NOT EXISTS pending_response ON pending (response_id)",
    "CREATE INDEX IF NOT EXISTS pending_parked_at ON pending (parked_at)",
    """CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY,
        reason TEXT NOT NULL,
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        record_offset INTEGER NOT NULL,
        key TEXT,
        raw BLOB NOT NULL,
        queued_at REAL NOT NULL,
        UNIQUE (topic, part, record_offset))""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('seq', 0), ('position', 0)",
    *erasure.SCHEMA,
    *buffer_retention.SCHEMA,
]


def _migrations(found: int) -> list[str]:
    """From layout `found`: the erasure tables are created on open; labels before 3 were people's,
    and before 4 each weighed 1."""
    columns = ["source TEXT NOT NULL DEFAULT 'human'"] if found < 3 else []
    columns += ["weight REAL NOT NULL DEFAULT 1.0"] if found < 4 else []
    return [f"ALTER TABLE {table} ADD COLUMN {column}" for column in columns for table in ("examples", "pending")]


class ReplayBuffer:
    """The buffer at ``path``; see the module docstring."""

    def __init__(self, path: Path, *, retention_s: float = DEFAULT_RETENTION_S, busy_timeout_s: float = 10.0) -> None:
        """``retention_s``: seconds an unrated response (and a seen event_id) is kept.
        ``busy_timeout_s``: seconds to wait for another writer of the file.
        """
        if retention_s <= 0:
            raise ValueError(f"retention_s must be > 0, got {retention_s}")
        self.path = Path(path)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._last_prune = float("-inf")
        # FULL: an offset is committed on the strength of this commit, so it must survive power loss.
        self._conn: sqlite3.Connection | None = connect(
            self.path, synchronous="FULL", busy_timeout_s=busy_timeout_s, incremental_vacuum=True
        )
        try:
            ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "replay buffer", migrations=_migrations)
        except BaseException:
            self._conn.close()
            raise
        logger.info("replay buffer open at %s: %s", self.path, self.counts())

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the replay buffer at {self.path} is closed")
        return self._conn

    # ---- writes from the consumer ----

    def apply(self, batch: list[Polled], *, now: float | None = None) -> ApplyResult:
        """Apply one polled batch in ONE transaction (see ``learner.join``); durable on return."""
        now = time.time() if now is None else now
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                result = apply_batch(conn, batch, now)
                if now - self._last_prune >= _PRUNE_EVERY_S:
                    # Lazily, inside this transaction, so that the file stays bounded without a janitor.
                    buffer_retention.prune_unrated(conn, now, self.retention_s)
                    self._last_prune = now
        return result

    def enforce_retention(
        self, bound: buffer_retention.Bound, *, keep_since: float | None = None, now: float | None = None
    ) -> int:
        """Drop the examples beyond ``bound``, then shrink the file; how many went (what stays, and
        what a dropped one leaves for the rest: ``learner.buffer_retention``)."""
        now = time.time() if now is None else now
        with self._lock:
            drops = buffer_retention.choose_drops(self._connection(), bound, now=now, keep_since=keep_since)
        for start in range(0, len(drops), buffer_retention.CHUNK):
            with self._lock, write_transaction(self._connection()) as conn:
                buffer_retention.drop(conn, drops[start : start + buffer_retention.CHUNK])
        if drops:
            with self._lock:
                shrink(self._connection())
        return len(drops)

    def expire_pending(self, now: float, ttl_s: float) -> list[DeadLetter]:
        """Move feedback parked for ``ttl_s`` or longer (by ``now``) from ``pending`` to the outbox.

        Crash-safe by construction: removing it from ``pending`` and queueing its dead letter are
        one transaction, so the rating is either still parked or queued for the dead-letter topic,
        never lost. Publishing it is the outbox's job (``dead_letters_to_send``), at least once.
        Its event_id is forgotten too, so replaying the dead letter later counts it.
        """
        with self._lock, write_transaction(self._connection()) as conn:
            return buffer_retention.expire_pending(conn, now, ttl_s)

    def dead_letters_to_send(self, limit: int = 100) -> list[DeadLetter]:
        """Queued dead letters, oldest first."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT id, reason, topic, part, record_offset, key, raw FROM outbox ORDER BY id LIMIT ?", (limit,)
                )
                .fetchall()
            )
        return [
            DeadLetter(id_, reason, topic, part, offset, key, bytes(raw))
            for id_, reason, topic, part, offset, key, raw in rows
        ]

    def dead_letters_sent(self, ids: Iterable[int]) -> None:
        """Forget dead letters once the bus has acknowledged them."""
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    # ---- the trainer's side ----

    def unreferenced(self, limit: int) -> list[Example]:
        """Examples without reference log-probs, oldest first; only those that have a KL partner."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    EXAMPLE_SQL + " WHERE e.ref_logp IS NULL AND e.kl_partner IS NOT NULL ORDER BY e.position LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [example_from_row(row) for row in rows]

    def set_reference(self, items: list[tuple[str, float, float]]) -> int:
        """Store (response_id, ref_logp, kl_ref_logp) in one transaction; return how many were set.

        A newly referenced example gets a new ``seq`` (it just became trainable); a relabel later
        keeps these values (same tokens, same reference). Unknown ids are skipped.
        """
        for response_id, ref, kl_ref in items:
            if not (math.isfinite(ref) and math.isfinite(kl_ref)):
                raise ValueError(f"reference log-probs of {response_id} must be finite, got {ref}, {kl_ref}")
        done = 0
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                for response_id, ref, kl_ref in items:
                    row = conn.execute("SELECT ref_logp FROM examples WHERE response_id = ?", (response_id,)).fetchone()
                    if row is None:
                        logger.warning("set_reference: no example %s (deleted meanwhile?)", response_id)
                        continue
                    seq_sql, args = ("seq = ?, ", [next_counter(conn, "seq")]) if row[0] is None else ("", [])
                    conn.execute(
                        f"UPDATE examples SET {seq_sql}ref_logp = ?, kl_ref_logp = ? WHERE response_id = ?",
                        [*args, ref, kl_ref, response_id],
                    )
                    done += 1
        return done

    def fresh(self, after_seq: int) -> list[Example]:
        """Referenced examples with ``seq > after_seq``, in seq order."""
        return self._select(" WHERE e.ref_logp IS NOT NULL AND e.seq > ? ORDER BY e.seq", (after_seq,))

    def referenced(self) -> list[Example]:
        """Every referenced example, oldest (first inserted) first; e.g. for a held-out split by hash."""
        return self._select(" WHERE e.ref_logp IS NOT NULL ORDER BY e.position", ())

    def index(self) -> list[ExampleRef]:
        """Every referenced example as a light ``ExampleRef``, oldest (first inserted) first.

        What an update plans with (held-out split, replay pool, per-user caps): no token ids are
        read or parsed, so it stays cheap as the buffer grows; ``load`` fetches the ones it picks."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT e.response_id, r.user, e.desirable, e.seq, e.source FROM examples e"
                    " JOIN responses r ON r.response_id = e.response_id WHERE e.ref_logp IS NOT NULL"
                    " ORDER BY e.position"
                )
                .fetchall()
            )
        return [ExampleRef(i, user, bool(desirable), seq, source) for i, user, desirable, seq, source in rows]

    def load(self, response_ids: Iterable[str]) -> list[Example]:
        """The examples of ``response_ids``, in that order; ids no longer in the buffer are left out."""
        ids = list(dict.fromkeys(response_ids))
        found: dict[str, Example] = {}
        for start in range(0, len(ids), 500):  # far below SQLite's limit on parameters
            chunk = ids[start : start + 500]
            found.update(
                (e.response_id, e)
                for e in self._select(f" WHERE e.response_id IN ({','.join('?' * len(chunk))})", chunk)
            )
        return [found[i] for i in ids if i in found]

    def max_seq(self) -> int:
        """The highest seq of a referenced example, dropped ones included (0 if none): ``fresh(max_seq())`` is empty."""
        with self._lock:
            return self._connection().execute(buffer_retention.MAX_SEQ).fetchone()[0]

    def mark_trained(self, response_ids: Iterable[str], version: str | None = None) -> None:
        """Add one to ``times_trained`` of each id (per occurrence); remember that ``version``
        was trained on them (what an erasure flags)."""
        ids = list(response_ids)
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                conn.executemany(
                    "UPDATE examples SET times_trained = times_trained + 1 WHERE response_id = ?", [(i,) for i in ids]
                )
                if version is not None:
                    conn.executemany(
                        "INSERT OR IGNORE INTO trained (response_id, version) VALUES (?, ?)",
                        [(i, version) for i in ids],
                    )

    def erasures_to_report(self) -> list[erasure.Erasure]:
        """Erasures applied here but not yet recorded in the registry, oldest first."""
        with self._lock:
            return erasure.to_report(self._connection())

    def erasure_reported(self, request_id: str) -> None:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                conn.execute("UPDATE erasures SET reported_at = ? WHERE request_id = ?", (time.time(), request_id))

    def get(self, response_id: str) -> Example | None:
        """One example, or None."""
        found = self._select(" WHERE e.response_id = ?", (response_id,))
        return found[0] if found else None

    def counts(self) -> dict[str, int]:
        """Totals for logs and metrics."""
        with self._lock:
            conn = self._connection()
            desirable, undesirable, unreferenced = conn.execute(
                "SELECT COALESCE(SUM(desirable), 0), COALESCE(SUM(1 - desirable), 0),"
                " COALESCE(SUM(ref_logp IS NULL), 0) FROM examples"
            ).fetchone()
            (pending,) = conn.execute("SELECT COUNT(*) FROM pending").fetchone()
            (unrated,) = conn.execute(
                "SELECT COUNT(*) FROM responses r WHERE rejected IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.response_id = r.response_id)"
                " AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.kl_partner = r.response_id)"
            ).fetchone()
            (outbox,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return {
            "desirable": desirable,
            "undesirable": undesirable,
            "pending": pending,
            "unreferenced": unreferenced,
            "unrated_responses": unrated,
            "dead_letters_queued": outbox,
        }

    def _select(self, where: str, args: Iterable[object]) -> list[Example]:
        with self._lock:
            rows = self._connection().execute(EXAMPLE_SQL + where, tuple(args)).fetchall()
        return [example_from_row(row) for row in rows]

    def close(self) -> None:
        """Close the file; idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the canary's counts (learner.canary) ----

    def rated_since(self, versions: Iterable[str | None], since: float) -> dict[str | None, tuple[int, int]]:
        """(rated, desirable) per adapter version (None = the base model) among responses created
        at or after ``since`` (unix seconds): each rated response once, with its current label."""
        counts: dict[str | None, tuple[int, int]] = {v: (0, 0) for v in versions}
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT r.adapter_version, COUNT(*), SUM(e.desirable) FROM examples e"
                    " JOIN responses r ON r.response_id = e.response_id WHERE r.created_at >= ?"
                    " GROUP BY r.adapter_version",
                    (since,),
                )
                .fetchall()
            )
        for version, rated, desirable in rows:
            if version in counts:
                counts[version] = (rated, desirable)
        return counts


__all__ = ["DeadLetter", "Example", "ExampleRef", "ReplayBuffer"]
