"""Consumers of the Kafka bus (``ingest.kafka_bus``) and their delivery rules.

- Each consumer is one member of a classic Kafka consumer group, subscribed to its topics; the
  group coordinator spreads the partitions over the members (one member per partition).
- Offsets are committed only by ``commit``: auto-commit is off, and nothing is committed on a
  rebalance or on ``close``. ``commit`` stores the NEXT offset to read; ``None`` commits the
  current positions. A new group starts at the earliest record.
- Delivery is at least once: whatever a member polled but did not commit is delivered again
  to the partition's next owner after a crash, a ``close`` or a rebalance. That is safe because
  whoever consumes is idempotent by ``event_id`` and commits only once the records' effects are
  durable (the learner's ``EventJoiner`` commits after its buffer transaction). Committing on
  revocation instead would mark records done that the caller had polled but not yet stored.
- A commit the group refuses because it rebalanced meanwhile (``CommitFailedError``), or one
  for a partition this member no longer owns, is skipped with a warning: the new owner reads
  those records again from the last commit. Other failures raise ``BusUnavailable``.
- A member that does not poll for ``max_poll_interval_s`` leaves the group; a member whose
  process died is dropped after ``session_timeout_s``. Rebalance listeners run on kafka-python's
  IO thread, so ours only log and apply pending seeks.
- A poll that leaves this member's join of the group in flight waits for it to finish, however
  short its ``timeout_s`` (at most the rebalance timeout, ``max_poll_interval_s``, within which
  the broker always answers). kafka-python 3.0.12 drops a join that completes between two polls
  and sends another, which starts the next rebalance: members that poll briefly and work in
  between (the learner does) would rebalance for ever (seen in tests: one run in twelve).
- ``seek`` on a partition not assigned yet takes effect when it is assigned.
- Different groups read independently.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from ingest.bus import BusUnavailable, Record, TopicPartition, check_topic_name

logger = logging.getLogger(__name__)

_JOIN_POLL_MS = 50


@functools.cache
def _listener_type() -> type:
    # Built on first use: the base class lives in kafka-python, which is imported lazily.
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def __init__(self, member: KafkaGroupConsumer) -> None:
            self.member = member

        def on_partitions_revoked(self, revoked: Any) -> None:
            self.member._revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            self.member._assigned(assigned)

    return Listener


class KafkaGroupConsumer:
    """One member of a consumer group on Kafka; see the module docstring for its rules.

    Drive it from one thread at a time (kafka-python's consumer is not thread-safe).
    """

    def __init__(self, config: dict[str, Any], group_id: str, topics: list[str]) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        self.group_id = group_id
        self.topics = list(dict.fromkeys(topics))
        self._timeout_ms = config["request_timeout_ms"]
        self._rebalance_wait_ms = config["max_poll_interval_ms"] + config["request_timeout_ms"]
        self._lock = threading.Lock()  # the listener runs on kafka-python's IO thread
        self._pending_seeks: dict[TopicPartition, int] = {}
        try:
            self._consumer: Any = KafkaConsumer(
                **config,
                group_id=group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                allow_auto_create_topics=False,
            )
            # Know every topic's partitions before joining: a group leader that assigns while its
            # metadata lacks a topic hands out nothing, and kafka-python 3 did not rejoin on the
            # later metadata refresh (seen: a group never settled). Existing topics answer at once.
            deadline = time.monotonic() + self._timeout_ms / 1000
            for topic in self.topics:
                while self._consumer.partitions_for_topic(topic) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            self._consumer.subscribe(self.topics, listener=_listener_type()(self))
        except KafkaError as exc:
            raise BusUnavailable(f"cannot join group {group_id}: {exc}") from exc
        self._closed = False

    def _live(self) -> Any:
        if self._closed:
            raise BusUnavailable("this consumer is closed")
        return self._consumer

    @property
    def assignment(self) -> set[TopicPartition]:
        """The partitions the group assigned to this member."""
        return {(tp.topic, tp.partition) for tp in self._live().assignment()}

    def _revoked(self, revoked: Any) -> None:
        # Nothing is committed here: see the module docstring.
        if revoked:
            logger.info(
                "group %s: partitions revoked %s (uncommitted records go to the next owner)",
                self.group_id,
                sorted((tp.topic, tp.partition) for tp in revoked),
            )

    def _assigned(self, assigned: Any) -> None:
        with self._lock:
            for tp in assigned:
                offset = self._pending_seeks.pop((tp.topic, tp.partition), None)
                if offset is not None:
                    self._consumer.seek(tp, offset)
        logger.info(
            "group %s: partitions assigned %s", self.group_id, sorted((tp.topic, tp.partition) for tp in assigned)
        )

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        """Records after this member's positions, in offset order per partition; ``[]`` after ``timeout_s``.

        Joining the group (and any rebalance) happens inside poll, so the first polls of a new
        member may return nothing, and a poll during a rebalance may take longer than
        ``timeout_s`` (see the module docstring). Drive one member from one thread.
        """
        from kafka.errors import KafkaError

        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        consumer = self._live()
        try:
            batches = consumer.poll(timeout_ms=int(max(timeout_s, 0.0) * 1000), max_records=max_records)
            # Back to back, so that the join cannot complete between two polls (module docstring).
            deadline = time.monotonic() + self._rebalance_wait_ms / 1000
            while not batches and self._joining() and time.monotonic() < deadline:
                batches = consumer.poll(timeout_ms=_JOIN_POLL_MS, max_records=max_records)
        except KafkaError as exc:
            raise BusUnavailable(f"cannot poll: {exc}") from exc
        return [
            Record(
                r.topic,
                r.partition,
                r.offset,
                None if r.key is None else r.key.decode("utf-8", errors="replace"),
                b"" if r.value is None else bytes(r.value),
                r.timestamp / 1000.0,
            )
            for records in batches.values()
            for r in records
        ]

    def _joining(self) -> bool:
        # kafka-python has no public way to ask; its coordinator keeps the join it awaits here.
        task = getattr(getattr(self._consumer, "_coordinator", None), "_join_task", None)
        return task is not None and not task.is_done

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Store the group's next offset per partition; ``None`` commits our current positions."""
        from kafka import OffsetAndMetadata
        from kafka import TopicPartition as KafkaTopicPartition
        from kafka.errors import CommitFailedError, KafkaError

        consumer = self._live()
        wanted = None
        if offsets is not None:
            for (topic, partition), offset in offsets.items():
                check_topic_name(topic)
                if not isinstance(offset, int) or offset < 0 or not isinstance(partition, int) or partition < 0:
                    raise ValueError(f"invalid commit {topic}[{partition}] -> {offset!r}")
            owned = consumer.assignment()
            wanted = {}
            for (topic, partition), offset in offsets.items():
                tp = KafkaTopicPartition(topic, partition)
                if tp in owned:
                    wanted[tp] = OffsetAndMetadata(offset, "", -1)
                else:
                    logger.warning(
                        "group %s: not committing %s[%d], not assigned to this member "
                        "(its records will be re-delivered to the owner)",
                        self.group_id,
                        topic,
                        partition,
                    )
            if not wanted:
                return
        try:
            consumer.commit(wanted, timeout_ms=self._timeout_ms)
        except CommitFailedError as exc:
            logger.warning(
                "group %s rebalanced before the commit; not committed, the records will be "
                "re-delivered to the partitions' owners: %s",
                self.group_id,
                exc,
            )
        except KafkaError as exc:
            raise BusUnavailable(f"cannot commit: {exc}") from exc

    def committed(self, topic: str, partition: int = 0) -> int | None:
        """The group's committed next offset for the partition, or None (asks the coordinator)."""
        from kafka import TopicPartition as KafkaTopicPartition
        from kafka.errors import KafkaError

        consumer = self._live()
        try:
            return consumer.committed(KafkaTopicPartition(topic, partition), timeout_ms=self._timeout_ms)
        except KafkaError as exc:
            raise BusUnavailable(f"cannot read committed offset: {exc}") from exc

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Make the next poll of the partition start at ``offset`` (now, or once assigned); commits nothing."""
        from kafka import TopicPartition as KafkaTopicPartition

        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        consumer = self._live()
        tp = KafkaTopicPartition(topic, partition)
        with self._lock:
            if tp in consumer.assignment():
                consumer.seek(tp, offset)
            else:
                self._pending_seeks[(topic, partition)] = offset

    def close(self) -> None:
        """Leave the group so that the others take over at once; idempotent. Commits nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
        except Exception as exc:
            logger.warning("consumer of group %s did not leave cleanly: %s", self.group_id, exc)

    def __enter__(self) -> KafkaGroupConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
