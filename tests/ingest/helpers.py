"""Helpers for the bus contract tests, which run on the embedded bus and on Kafka alike.

Kafka delivers asynchronously (a new member first joins its group, fetches arrive in the
background), so the helpers poll until the expected records are there, with a deadline, and
then check that nothing more comes. On the embedded bus the same helpers return at once.

All Kafka tests share one broker, so each test's bus is a ``NamespacedBus``: its topic and group
names get a per-test prefix on the way in and lose it on the way out, so the tests read the
same on both backends and never see each other's records.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from ingest.bus import Bus, Consumer, Record, TopicPartition

WAIT_S = 60.0  # generous: a rebalance on a loaded 2-core box can take tens of seconds
"""Seconds a helper waits for records before the test fails."""
QUIET_S = 0.3
"""Seconds of polling that must bring nothing, to show that no more records come."""


def values(records: list[Record]) -> list[bytes]:
    return [r.value for r in records]


def nums(*ints: int) -> list[bytes]:
    return [str(i).encode() for i in ints]


def fill(bus: Bus, topic: str, n: int, start: int = 0) -> None:
    bus.publish_many(topic, [(f"k{i}", str(i).encode()) for i in range(start, start + n)])


def take(consumer: Consumer, n: int, max_records: int = 500, wait_s: float = WAIT_S) -> list[Record]:
    """Poll until ``n`` records came (all in one list); fail at the deadline with what came."""
    got: list[Record] = []
    deadline = time.monotonic() + wait_s
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} records within {wait_s} s: {values(got)}"
        got.extend(consumer.poll(timeout_s=min(left, 0.5), max_records=min(max_records, n - len(got))))
    return got


def batches(consumer: Consumer, n: int, max_records: int) -> list[list[Record]]:
    """The non-empty poll results until ``n`` records came."""
    out: list[list[Record]] = []
    deadline = time.monotonic() + WAIT_S
    while sum(map(len, out)) < n:
        assert time.monotonic() < deadline, f"only {sum(map(len, out))} of {n} records"
        if batch := consumer.poll(timeout_s=0.5, max_records=max_records):
            out.append(batch)
    return out


def quiet(consumer: Consumer, wait_s: float = QUIET_S) -> list[Record]:
    """Whatever arrives within ``wait_s`` (the tests expect ``[]``)."""
    if not isinstance(consumer, NamespacedConsumer):
        return consumer.poll(timeout_s=0)  # the embedded bus has nothing in flight: one look says it all
    got: list[Record] = []
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        got.extend(consumer.poll(timeout_s=min(left, 0.1)))
    return got


def drain(bus: Bus, consumer: Consumer, topics: list[str], max_records: int = 500) -> list[Record]:
    """Everything from the consumer's position up to the topics' current end, then nothing more.

    The count comes from ``end_offsets`` minus the group's commit (or 0), which holds when the
    consumer starts where the group left off; tests that seek count for themselves with ``take``.
    """
    ends = bus.end_offsets(topics)
    want = sum(end - (consumer.committed(*tp) or 0) for tp, end in ends.items())
    got = take(consumer, want, max_records=max_records) if want > 0 else []
    assert quiet(consumer) == []
    return got


def read_all(bus: Bus, topics: list[str], group: str = "reader") -> list[Record]:
    """Every record of ``topics``, read by a fresh member of ``group`` that then leaves."""
    consumer = bus.consumer(group, topics)
    try:
        return drain(bus, consumer, topics)
    finally:
        consumer.close()


_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class NamespacedBus:
    """A bus whose topic and group names carry ``prefix``; see the module docstring.

    Invalid names pass through unchanged, so the real bus still rejects them.
    """

    def __init__(self, bus: Any, prefix: str) -> None:
        self.inner = bus
        self.prefix = prefix
        self.consumers: list[NamespacedConsumer] = []  # closed by the fixture

    def real(self, name: Any) -> Any:
        valid = isinstance(name, str) and _NAME.match(name) and name not in (".", "..")
        return f"{self.prefix}.{name}" if valid else name

    def plain(self, record: Record) -> Record:
        return dataclasses.replace(record, topic=record.topic.removeprefix(f"{self.prefix}."))

    def _tp(self, tp: TopicPartition) -> TopicPartition:
        return self.real(tp[0]), tp[1]

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        self.inner.create_topics([self.real(t) for t in topics], partitions)

    def publish(self, topic: str, key: str | None, value: bytes) -> Record:
        return self.plain(self.inner.publish(self.real(topic), key, value))

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        return [self.plain(r) for r in self.inner.publish_many(self.real(topic), items)]

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        return [self.plain(r) for r in self.inner.publish_batch([(self.real(t), k, v) for t, k, v in items])]

    def consumer(self, group_id: str, topics: list[str]) -> NamespacedConsumer:
        real_topics = topics if isinstance(topics, str) else [self.real(t) for t in topics]
        self.consumers.append(NamespacedConsumer(self, self.inner.consumer(self.real(group_id), real_topics)))
        return self.consumers[-1]

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        ends = self.inner.end_offsets([self.real(t) for t in topics])
        return {(t.removeprefix(f"{self.prefix}."), p): end for (t, p), end in ends.items()}

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()


class NamespacedConsumer:
    def __init__(self, bus: NamespacedBus, inner: Any) -> None:
        self.bus = bus
        self.inner = inner

    @property
    def assignment(self) -> set[TopicPartition]:
        return {(t.removeprefix(f"{self.bus.prefix}."), p) for t, p in self.inner.assignment}

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        return [self.bus.plain(r) for r in self.inner.poll(timeout_s, max_records)]

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        self.inner.commit(None if offsets is None else {self.bus._tp(tp): o for tp, o in offsets.items()})

    def committed(self, topic: str, partition: int = 0) -> int | None:
        return self.inner.committed(self.bus.real(topic), partition)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.inner.seek(self.bus.real(topic), partition, offset)

    def close(self) -> None:
        self.inner.close()
