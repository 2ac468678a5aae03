"""The event bus: one small protocol, Kafka-shaped, with the backends chosen by URL.

The shapes are Kafka's so that both backends mean the same thing: named topics split into
partitions; each record has a key, a byte value, and a dense per-partition offset; consumers
read in consumer groups, and a group's committed offset is the NEXT offset it will read.

Backends:
- ``sqlite:///path/bus.sqlite3`` — the embedded durable log (``ingest.sqlite_bus``);
- ``kafka://host:port[,host:port]`` — Apache Kafka (``ingest.kafka_bus``).

Retention differs: Kafka's is the broker's (``retention.ms`` and ``retention.bytes`` on each
topic, or the broker's ``log.retention.*`` defaults) and deletes whatever a group has read or
not; the embedded log's (``SqliteBus.enforce_retention``, run by the learner) deletes by the same
two limits but never a record some consumer group has not committed past.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, Self

from foundation.urls import backend_of

logger = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
"""(topic, partition)."""


@dataclass(frozen=True)
class Record:
    """One record as stored on the bus."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp: float
    """Unix seconds at which the bus appended it."""


_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def check_topic_name(topic: object) -> str:
    """Return ``topic`` if it is a legal topic name (Kafka's rules), else raise ``ValueError``."""
    if not isinstance(topic, str) or not _TOPIC_NAME.match(topic) or topic in (".", ".."):
        raise ValueError(f"invalid topic name {topic!r}: use 1-249 of [A-Za-z0-9._-]")
    return topic


def check_subscription(group_id: object, topics: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``group_id`` is a name and ``topics`` a non-empty
    list of topic names."""
    if isinstance(topics, str):
        raise TypeError("topics must be a list of topic names, not a string")
    if not group_id:
        raise ValueError("group_id must not be empty")
    if not topics:
        raise ValueError("a consumer needs at least one topic")
    if not isinstance(topics, Iterable):
        raise TypeError("topics must be a list of topic names")
    for topic in topics:
        check_topic_name(topic)


def check_records(items: list[tuple[str | None, bytes]]) -> None:
    """Raise ``TypeError`` unless every item is a (str-or-None key, bytes value) pair."""
    for key, value in items:
        if key is not None and not isinstance(key, str):
            raise TypeError(f"record key must be str or None, got {type(key).__name__}")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"record value must be bytes, got {type(value).__name__}")


class BusUnavailable(Exception):
    """The bus cannot be reached or cannot take the write; nothing was acknowledged.

    After a rare I/O failure mid-commit the record may still have been stored, so a retry can
    duplicate it; consumers dedupe by ``event_id``.
    """


class Consumer(Protocol):
    """A member of a consumer group reading some topics.

    Delivery is at-least-once: after a crash, records are re-delivered from the group's last
    commit, so whoever consumes must be idempotent (events carry an ``event_id`` for that).
    """

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        """Records after this consumer's position, in offset order per partition.

        The position starts at the group's committed offset, or at the earliest record when there
        is none (or when retention deleted the records there).
        Waits up to ``timeout_s`` for something new; returns ``[]`` if nothing arrived.
        """
        ...

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Store the group's next offset to read per (topic, partition).

        ``None`` commits the current position of everything this consumer has polled.
        """
        ...

    def committed(self, topic: str, partition: int = 0) -> int | None:
        """The group's committed offset for a partition, or None if it never committed."""
        ...

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Make the next poll of this partition start at ``offset`` (commits nothing)."""
        ...

    def close(self) -> None:
        """Leave the group (commits nothing); another member may take over the partitions."""
        ...


class Bus(Protocol):
    """A durable, ordered, partitioned log of records."""

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        """Create the topics that do not exist yet; existing ones are left as they are."""
        ...

    def publish(self, topic: str, key: str | None, value: bytes) -> Record:
        """Append one record; when this returns, the record is durably stored.

        Raises ``BusUnavailable`` if the record cannot be stored.
        """
        ...

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        """Append several (key, value) records at once, durably.

        The embedded bus stores all or none; on Kafka a failure may leave some stored.
        """
        ...

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        """Append (topic, key, value) records for any topics at once, durably; the records in input order.

        Order is kept within each partition (records of one key stay in order); as with
        ``publish_many``, the embedded bus stores all or none, Kafka may store some on failure.
        """
        ...

    def consumer(self, group_id: str, topics: list[str]) -> Consumer:
        """A new member of ``group_id`` subscribed to ``topics``."""
        ...

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        """The offset the next record of each partition will get (for lag); unknown topics are left out."""
        ...

    def ping(self) -> None:
        """Return if the bus is usable; raise ``BusUnavailable`` otherwise."""
        ...

    def close(self) -> None:
        """Release connections; records already published stay."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None:
        """``close()``."""
        ...


def open_bus(url: str, *, timeout_s: float | None = None) -> Bus:
    """The bus backend for ``url``.

    - ``sqlite:///PATH`` (see ``foundation.urls``): the embedded log
      (parent directories are created);
    - ``kafka://host:port[,host:port]``: Apache Kafka (the bootstrap servers); ``timeout_s``: seconds
      one request may take (``KafkaBus``'s default when None).
    """
    if backend_of(url, allowed=("sqlite", "kafka"), what="bus") == "sqlite":
        # Imported here so that each backend costs only when chosen.
        from foundation.sqlite import path_from_url
        from ingest.sqlite_bus import SqliteBus

        return SqliteBus(path_from_url(url))
    from ingest.kafka_bus import KafkaBus

    return KafkaBus.from_url(url) if timeout_s is None else KafkaBus.from_url(url, timeout_s=timeout_s)
