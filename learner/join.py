"""Joining feedback to responses inside the replay buffer's transaction.

``apply_batch`` turns one polled batch of bus records into buffer rows, all within the write
transaction that ``ReplayBuffer.apply`` holds, so a batch is applied wholly or not at all.

The rules, record by record, in poll order:

- an event whose ``event_id`` was seen before is a duplicate: counted, nothing else;
- a response is stored (unlabeled) and resolves any feedback parked for it;
- a feedback whose response is stored becomes an example, or relabels it when its
  ``(created_at, event_id)`` is newer than the current label's; an older one changes nothing;
- except that a label from a higher rank replaces one from a lower rank whatever their times,
  and never the other way round. The ranks, highest first: the user's own thumb (``human``: they
  saw the answer and said what they think), an annotator's verdict (a person's explicit
  judgment), an implicit signal (``ingest.signals``: the user's act, a noisier verdict), then
  rules and judges (they only guess at what a person would think);
- a feedback whose response is not stored yet is parked, with its raw bytes and bus position;
- a feedback from another user than the response's (an anonymous response included), or on a
  response that was rejected, is dead-lettered;
- erasure events are applied first (``learner.erasure``); then any response or feedback of an
  erased user created up to the erasure is dropped (counted as ``erased``), in this batch or later;
- a record the consumer rejected (undecodable, or a decoded event it found unusable) is
  dead-lettered; a rejected response leaves a tombstone so that its feedback is dead-lettered
  with the reason rather than parked until the TTL (a valid response with that id, replayed
  later, replaces the tombstone).

Dead letters are rows of the ``outbox`` table, published by the consumer after the commit. A
dead-lettered event's event_id is forgotten in the same step, so that replaying it from the
dead-letter topic (once its response arrived, or the reader was fixed) is processed anew rather
than dropped as a duplicate.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from ingest.bus import Record
from ingest.events import ErasureEvent, FeedbackEvent, ResponseEvent, source_kind
from learner import erasure

logger = logging.getLogger(__name__)

Polled = tuple[Record, ResponseEvent | FeedbackEvent | ErasureEvent | None, str | None]
"""One polled record: (record, its event or None if undecodable, why to reject it or None)."""


@dataclass
class ApplyResult:
    """What a batch did, for logs and metrics. ``resolved`` feedback is also counted in its outcome."""

    records: int = 0
    """Records in the batch."""
    responses: int = 0
    """Responses stored."""
    new_examples: int = 0
    """Feedback that labeled a response for the first time."""
    relabeled: int = 0
    """Feedback that changed an example's label (a changed vote)."""
    stale: int = 0
    """Feedback that changed nothing: older than the current vote, or the same label again."""
    duplicates: int = 0
    """Events whose event_id was seen before (re-delivery, or a producer's retry)."""
    parked: int = 0
    """Feedback waiting for its response."""
    resolved: int = 0
    """Parked feedback whose response arrived in this batch."""
    dead_lettered: int = 0
    """Records queued for the dead-letter topic."""
    expired: int = 0
    """Parked feedback whose response never came (set by the consumer, not by ``apply``)."""
    erasures: int = 0
    """Erasure requests applied."""
    erased: int = 0
    """Events dropped because their user's data was erased."""

    def __add__(self, other: ApplyResult) -> ApplyResult:
        return ApplyResult(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_ids = json.JSONEncoder(separators=(",", ":")).encode
"""Token ids as compact JSON; one encoder for all (``json.dumps`` with options builds one per call)."""


def next_counter(conn: sqlite3.Connection, name: str) -> int:
    """The next value of a monotonic counter; never reused, even when rows are deleted."""
    return conn.execute("UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (name,)).fetchone()[0]


def queue_dead_letter(
    conn: sqlite3.Connection,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    key: str | None,
    raw: bytes,
    now: float,
) -> bool:
    """Add a dead letter to the outbox; False if that bus record is already queued there."""
    # OR IGNORE: a record re-delivered before its dead letter went out is queued once.
    queued = conn.execute(
        "INSERT OR IGNORE INTO outbox (reason, topic, part, record_offset, key, raw, queued_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (reason, topic, partition, offset, key, raw, now),
    ).rowcount
    if queued:
        logger.warning("dead letter for %s[%d]@%d: %s", topic, partition, offset, reason)
    return bool(queued)


def dead_letter_event(
    conn: sqlite3.Connection,
    event_id: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    key: str | None,
    raw: bytes,
    now: float,
) -> bool:
    """Queue a decoded event's dead letter and forget its event_id, so that a replay counts anew."""
    conn.execute("DELETE FROM seen WHERE event_id = ?", (event_id,))
    return queue_dead_letter(conn, reason, topic, partition, offset, key, raw, now)


class _Vote(NamedTuple):
    """A feedback event as the join needs it, whether fresh from the bus or parked."""

    event_id: str
    response_id: str
    user: str
    desirable: bool
    created_at: float
    topic: str
    partition: int
    offset: int
    key: str | None
    raw: bytes
    source: str
    """The labeler (`FeedbackEvent.labeler`): the source, with an implicit label's signal."""
    weight: float

    @classmethod
    def of(cls, record: Record, event: FeedbackEvent) -> _Vote:
        return cls(
            event.event_id,
            event.response_id,
            event.user,
            event.label == "desirable",
            event.created_at,
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            event.labeler,
            event.weight,
        )


_RANKS = {"human": 3, "annotator": 2, "implicit": 1}


def _rank(source: str) -> int:
    """How much a label's source outranks others' (module docstring); rules and judges are 0."""
    return _RANKS.get(source_kind(source), 0)


_IN_CHUNK = 500  # ids per IN (...) list, far below SQLite's limit on parameters


def _present(conn: sqlite3.Connection, sql: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` ``sql`` (ending in ``IN``) finds, in chunks."""
    found: set[str] = set()
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start : start + _IN_CHUNK]
        found.update(row[0] for row in conn.execute(f"{sql} ({','.join('?' * len(chunk))})", chunk))
    return found


def apply_batch(conn: sqlite3.Connection, batch: list[Polled], now: float) -> ApplyResult:
    """Apply ``batch`` (see the module docstring); the caller holds the write transaction."""
    for _, event, _ in batch:
        if isinstance(event, ErasureEvent):
            erasure.erase(conn, event)
    join = _Join(conn, batch, now)
    join.result.erasures = sum(isinstance(event, ErasureEvent) for _, event, _ in batch)
    erased = erasure.tombstones(conn)
    for record, event, reject in batch:
        if isinstance(event, ErasureEvent):
            continue
        if erased and event is not None and erasure.is_erased(erased, event.user, event.created_at):
            join.result.erased += 1
            continue
        if event is None:
            join.result.dead_lettered += queue_dead_letter(
                conn,
                reject or "undecodable",
                record.topic,
                record.partition,
                record.offset,
                record.key,
                record.value,
                now,
            )
            continue
        if not join.first_sight(event.event_id):
            join.result.duplicates += 1
            continue
        if isinstance(event, ResponseEvent):
            join.store_response(record, event, reject)
        elif reject is not None:
            join.dead_letter(
                event.event_id, reject, record.topic, record.partition, record.offset, record.key, record.value
            )
        else:
            join.vote(_Vote.of(record, event))
    join.finish()
    return join.result


class _Join:
    """One batch being applied, record by record, in poll order (the rules are in the module docstring).

    The same rules as statement-per-step SQL, in fewer statements: what a batch reads again and
    again is read once at the start and then kept here as the batch changes it (which event_ids
    were seen, which responses have parked feedback, the counters, the latest example), and
    written back by ``finish``. It all happens inside the caller's one write transaction, which
    nothing else writes to meanwhile.
    """

    def __init__(self, conn: sqlite3.Connection, batch: list[Polled], now: float) -> None:
        self.conn, self.now = conn, now
        self.result = ApplyResult(records=len(batch))
        events = [event for _, event, _ in batch if event is not None]
        self.seen = _present(conn, "SELECT event_id FROM seen WHERE event_id IN", [e.event_id for e in events])
        self.new_seen: dict[str, None] = {}  # first seen in this batch, in order: inserted by finish
        self.parked = _present(
            conn,
            "SELECT DISTINCT response_id FROM pending WHERE response_id IN",
            [e.response_id for e in events if isinstance(e, ResponseEvent)],
        )
        self.counters: dict[str, int] = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        self.counted: set[str] = set()
        # (response_id, kl_partner) of the example inserted last, whose partner may still be missing.
        self.latest: tuple[str, str | None] | None = conn.execute(
            "SELECT response_id, kl_partner FROM examples ORDER BY position DESC LIMIT 1"
        ).fetchone()

    def first_sight(self, event_id: str) -> bool:
        """Record ``event_id`` as seen; False if it was seen before (a duplicate)."""
        if event_id in self.seen:
            return False
        self.seen.add(event_id)
        self.new_seen[event_id] = None
        return True

    def next(self, name: str) -> int:
        """The next value of a counter (see ``next_counter``); written back by ``finish``."""
        self.counters[name] += 1
        self.counted.add(name)
        return self.counters[name]

    def dead_letter(
        self, event_id: str, reason: str, topic: str, partition: int, offset: int, key: str | None, raw: bytes
    ) -> None:
        """Queue a decoded event's dead letter and forget its event_id (see ``dead_letter_event``)."""
        self.seen.discard(event_id)
        if self.new_seen.pop(event_id, False) is False:  # seen in an earlier batch (a parked vote)
            self.conn.execute("DELETE FROM seen WHERE event_id = ?", (event_id,))
        self.result.dead_lettered += queue_dead_letter(self.conn, reason, topic, partition, offset, key, raw, self.now)

    def finish(self) -> None:
        """Write back what the batch kept in memory."""
        if self.new_seen:
            self.conn.executemany(
                "INSERT OR IGNORE INTO seen (event_id, seen_at) VALUES (?, ?)",
                [(event_id, self.now) for event_id in self.new_seen],
            )
        if self.counted:
            self.conn.executemany(
                "UPDATE counters SET value = ? WHERE name = ?",
                [(self.counters[name], name) for name in sorted(self.counted)],
            )

    def store_response(self, record: Record, event: ResponseEvent, reject: str | None) -> None:
        conn, result = self.conn, self.result
        # A stored response is never replaced (its tokens are what was served and rated), except a
        # tombstone by a usable response: a dead letter replayed once it was fixed.
        stored = conn.execute(
            "INSERT INTO responses (response_id, event_id, user, adapter_version, prompt_ids,"
            " completion_ids, created_at, stored_at, rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (response_id) DO UPDATE SET event_id = excluded.event_id, user = excluded.user,"
            " adapter_version = excluded.adapter_version, prompt_ids = excluded.prompt_ids,"
            " completion_ids = excluded.completion_ids, created_at = excluded.created_at,"
            " stored_at = excluded.stored_at, rejected = NULL"
            " WHERE responses.rejected IS NOT NULL AND excluded.rejected IS NULL",
            (
                event.response_id,
                event.event_id,
                event.user,
                event.adapter_version,
                _ids(event.prompt_token_ids),
                _ids(event.completion_token_ids),
                event.created_at,
                self.now,
                reject,
            ),
        ).rowcount
        if not stored:
            # Same response_id under a new event_id: the first one stays (its tokens were served).
            logger.warning(
                "response %s arrived again as event %s; keeping the first", event.response_id, event.event_id
            )
            result.duplicates += 1
            return
        if reject is not None:
            self.dead_letter(
                event.event_id, reject, record.topic, record.partition, record.offset, record.key, record.value
            )
        else:
            result.responses += 1
        if event.response_id not in self.parked:
            return
        self.parked.discard(event.response_id)
        parked = conn.execute(
            "SELECT event_id, response_id, user, desirable, created_at, topic, part, record_offset, key, raw, source,"
            " weight FROM pending WHERE response_id = ? ORDER BY created_at, event_id",
            (event.response_id,),
        ).fetchall()
        conn.execute("DELETE FROM pending WHERE response_id = ?", (event.response_id,))
        for event_id, response_id, user, desirable, created_at, topic, part, offset, key, raw, source, weight in parked:
            result.resolved += 1
            # Oldest vote first, so the newest one ends up as the label, as if they had come in order.
            self.vote(
                _Vote(
                    event_id,
                    response_id,
                    user,
                    bool(desirable),
                    created_at,
                    topic,
                    part,
                    offset,
                    key,
                    raw,
                    source,
                    weight,
                )
            )

    def vote(self, vote: _Vote) -> None:
        conn, result = self.conn, self.result
        found = conn.execute(
            "SELECT r.user, r.rejected, e.desirable, e.labeled_at, e.feedback_event_id, e.source"
            " FROM responses r LEFT JOIN examples e ON e.response_id = r.response_id WHERE r.response_id = ?",
            (vote.response_id,),
        ).fetchone()
        if found is None:
            conn.execute(
                "INSERT OR IGNORE INTO pending (event_id, response_id, user, desirable, created_at, parked_at,"
                " topic, part, record_offset, key, raw, source, weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    vote.event_id,
                    vote.response_id,
                    vote.user,
                    vote.desirable,
                    vote.created_at,
                    self.now,
                    vote.topic,
                    vote.partition,
                    vote.offset,
                    vote.key,
                    vote.raw,
                    vote.source,
                    vote.weight,
                ),
            )
            self.parked.add(vote.response_id)
            result.parked += 1
            return
        owner, rejected, desirable, labeled_at, event_id, source = found
        reason = None
        if rejected is not None:
            reason = f"feedback {vote.event_id} on response {vote.response_id}: the response was rejected ({rejected})"
        elif owner != vote.user:
            # The server refuses such votes; this guards against a bug or a forged event.
            reason = (
                f"feedback {vote.event_id} on response {vote.response_id} was rated by someone who did not "
                f"receive it (rated by {vote.user!r}, served to {owner!r})"
            )
        if reason is not None:
            self.dead_letter(vote.event_id, reason, vote.topic, vote.partition, vote.offset, vote.key, vote.raw)
            return

        if desirable is None:  # no example yet (its label is never NULL)
            self.insert_example(vote)
            result.new_examples += 1
            return
        # A higher rank wins (see the module docstring); within a rank the latest vote wins,
        # event_id breaking ties so that every replica and every replay agrees.
        rank, held = _rank(vote.source), _rank(source)
        if rank < held or (rank == held and (vote.created_at, vote.event_id) <= (labeled_at, event_id)):
            result.stale += 1
            return
        if bool(desirable) == vote.desirable:
            # Newer but the same label: record which event holds it, but it is nothing new to train on.
            conn.execute(
                "UPDATE examples SET feedback_event_id = ?, labeled_at = ?, source = ?, weight = ?"
                " WHERE response_id = ?",
                (vote.event_id, vote.created_at, vote.source, vote.weight, vote.response_id),
            )
            result.stale += 1
            return
        conn.execute(
            "UPDATE examples SET desirable = ?, feedback_event_id = ?, labeled_at = ?, seq = ?, source = ?, weight = ?"
            " WHERE response_id = ?",
            (
                vote.desirable,
                vote.event_id,
                vote.created_at,
                self.next("seq"),
                vote.source,
                vote.weight,
                vote.response_id,
            ),
        )
        result.relabeled += 1

    def insert_example(self, vote: _Vote) -> None:
        position = self.next("position")
        # The KL partner is fixed at insertion (its reference log-prob is computed once): the previous
        # example. The very first example has none, so it takes the second as soon as that arrives.
        previous = self.latest
        self.conn.execute(
            "INSERT INTO examples (response_id, desirable, feedback_event_id, labeled_at, seq, position, kl_partner,"
            " source, weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                vote.response_id,
                vote.desirable,
                vote.event_id,
                vote.created_at,
                self.next("seq"),
                position,
                None if previous is None else previous[0],
                vote.source,
                vote.weight,
            ),
        )
        if previous is not None and previous[1] is None:  # only the first example ever lacks a partner
            self.conn.execute(
                "UPDATE examples SET kl_partner = ? WHERE response_id = ? AND kl_partner IS NULL",
                (vote.response_id, previous[0]),
            )
        self.latest = (vote.response_id, None if previous is None else previous[0])
