"""The learner's consumer: response and feedback events from the bus into the replay buffer.

``EventJoiner`` reads the response, feedback and erasure topics as one member of a consumer group and joins them by
response_id in the buffer (the rules are in ``learner.join``).

Delivery rules:

- Order of one ``poll_once``: poll; decode and check every record; apply the whole batch to the
  buffer in ONE transaction (durable, fsync'd, when it returns); publish queued dead letters;
  only THEN commit the batch's offsets. So a committed offset always stands for an effect that
  is already on disk.
- Reprocessing is safe because the buffer is idempotent: it records every event_id it applied,
  in the same transaction as the effect, and drops an event it has seen. A response is stored
  once per response_id; a vote only replaces the label when its (created_at, event_id) is newer,
  so the latest vote wins whatever the order of delivery. Each rating therefore counts exactly
  once, although delivery is at least once.
- A crash after the buffer commit but before the offset commit re-delivers the batch to the
  next member; every event in it is then a duplicate and changes nothing.
- If applying the batch fails (the buffer raised), the consumer is rewound to the batch's first
  offsets, so the next poll reads it again rather than committing past it.
- Dead letters go through the buffer's outbox: queued in the same transaction as the batch (or
  as the expiry of a parked rating), published to ``Topics.dead_letters`` before the offset
  commit, and removed from the outbox once the bus acknowledged them. They are at least once: a
  crash between publishing and that removal, or between publishing and the offset commit (for
  undecodable records, which have no event_id to dedupe), sends one again. The envelope carries
  the source topic, partition and offset, so a duplicate is recognisable. The outbox is also
  drained at every poll, so letters queued before a crash go out after the restart.
- A rating parked without its response goes to dead letters once it has waited ``pending_ttl_s``
  AND the group has read the responses topic up to where it ended after the rating was parked.
  The server publishes a response before it accepts a vote on it, so by then the response would
  have been seen: a learner catching up on a backlog never dead-letters a rating whose response
  is merely further down the responses topic.

One learner reads a group: the buffer is a local file, so members on other hosts would each see
only their partitions' half of the join.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ingest.bus import Bus, Record, TopicPartition
from ingest.events import AnyEvent, EventDecodeError, ResponseEvent, Topics, dead_letter, decode_event
from learner.buffer import ReplayBuffer
from learner.join import ApplyResult, Polled

logger = logging.getLogger(__name__)

_DEAD_LETTERS_PER_PUBLISH = 100


def check(record: Record) -> Polled:
    """Decode ``record`` and say why it cannot be trained on, if it cannot."""
    try:
        event = decode_event(record.value)
    except EventDecodeError as exc:
        return record, None, exc.reason
    return record, event, unusable(event)


def unusable(event: AnyEvent) -> str | None:
    """Why a well-formed event still cannot become (part of) an example, or None."""
    if event.type == "erasure":
        return None
    if isinstance(event, ResponseEvent):
        if not event.completion_token_ids:
            return f"response {event.response_id} has no completion token ids"
        if not event.prompt_token_ids:
            # The first completion token cannot be scored without at least one token before it.
            return f"response {event.response_id} has no prompt token ids"
        return None
    if event.label not in ("desirable", "undesirable"):
        return f"feedback {event.event_id} has an unusable label {event.label!r}"
    if not event.user.strip():
        return f"feedback {event.event_id} has an unusable user id {event.user!r}"
    return None


def _next_offsets(records: list[Record]) -> dict[TopicPartition, int]:
    ends: dict[TopicPartition, int] = {}
    for r in records:
        ends[(r.topic, r.partition)] = max(ends.get((r.topic, r.partition), 0), r.offset + 1)
    return ends


class EventJoiner:
    """Consumes response and feedback events into a ``ReplayBuffer``; see the module docstring.

    It owns its consumer, not the bus or the buffer: ``close`` leaves those open.
    """

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        buffer: ReplayBuffer,
        *,
        group_id: str = "kto-learner",
        pending_ttl_s: float = 600.0,
        max_records: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``pending_ttl_s``: seconds a rating waits for its response before it is dead-lettered.
        ``max_records``: most records per poll, hence per buffer transaction (records). A poll takes
        what has arrived, up to this; a big bound lets a backlog share one fsync and one offset commit
        among thousands of records, and lets the bus fetch the next records while these are applied.
        ``clock``: unix seconds, for parking and expiry (tests pass a fake one).
        """
        if pending_ttl_s <= 0:
            raise ValueError(f"pending_ttl_s must be > 0, got {pending_ttl_s}")
        self._bus = bus
        self._topics = topics
        self._buffer = buffer
        self._ttl = pending_ttl_s
        self._max_records = max_records
        self._clock = clock
        self._consumer = bus.consumer(group_id, [topics.responses, topics.feedback, topics.erasures])
        # Expiry checks cost an end-offsets query, so they run at most this often (seconds).
        self._expiry_check_s = min(5.0, pending_ttl_s / 10)
        self._last_expiry_check = float("-inf")
        self._snapshot: tuple[float, dict[TopicPartition, int]] | None = None

    def poll_once(self, timeout_s: float = 1.0) -> ApplyResult:
        """Poll once, apply to the buffer, send dead letters, then commit; see the module docstring."""
        records = self._consumer.poll(timeout_s=timeout_s, max_records=self._max_records)
        now = self._clock()
        result = ApplyResult()
        if records:
            batch = [check(record) for record in records]
            try:
                result = self._buffer.apply(batch, now=now)
            except BaseException:
                self._rewind(records)
                raise
        result.expired = self._expire(now)
        self._send_dead_letters()
        if records:
            self._consumer.commit(_next_offsets(records))
        if result.dead_lettered or result.expired or result.relabeled or result.erasures:
            logger.info("joined %s", result.as_dict())
        elif records:
            logger.debug("joined %s", result.as_dict())
        return result

    def _rewind(self, records: list[Record]) -> None:
        # The position moved past these records at poll time; without this the next commit would skip them.
        firsts: dict[TopicPartition, int] = {}
        for r in records:
            firsts[(r.topic, r.partition)] = min(firsts.get((r.topic, r.partition), r.offset), r.offset)
        for (topic, partition), offset in firsts.items():
            self._consumer.seek(topic, partition, offset)
        logger.error("could not apply %d records to the buffer; they will be read again", len(records))

    def _expire(self, now: float) -> int:
        """Dead-letter ratings parked too long, once the responses topic was read past them."""
        if now - self._last_expiry_check < self._expiry_check_s:
            return 0
        self._last_expiry_check = now
        expired = 0
        if self._snapshot is not None:
            taken_at, ends = self._snapshot
            if not all((self._consumer.committed(t, p) or 0) >= end for (t, p), end in ends.items()):
                return 0  # still reading responses that were on the bus when the snapshot was taken
            # Only ratings parked before the snapshot: their response, if sent, was below `ends`.
            expired = len(self._buffer.expire_pending(min(now, taken_at + self._ttl), self._ttl))
        # Time first, then offsets: anything parked by `now` had its response below these ends.
        self._snapshot = (now, self._bus.end_offsets([self._topics.responses]))
        return expired

    def _send_dead_letters(self) -> None:
        while letters := self._buffer.dead_letters_to_send(_DEAD_LETTERS_PER_PUBLISH):
            self._bus.publish_many(
                self._topics.dead_letters,
                [(d.key, dead_letter(d.reason, d.topic, d.partition, d.offset, d.raw)) for d in letters],
            )
            self._buffer.dead_letters_sent(d.id for d in letters)

    def lag(self) -> int:
        """Records on the topics it reads that the group has not committed yet (for metrics)."""
        ends = self._bus.end_offsets([self._topics.responses, self._topics.feedback, self._topics.erasures])
        return sum(max(0, end - (self._consumer.committed(t, p) or 0)) for (t, p), end in ends.items())

    def close(self) -> None:
        """Leave the group (commits nothing: everything applied was committed by ``poll_once``)."""
        self._consumer.close()

    def __enter__(self) -> EventJoiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
