"""Sending records to Kafka through librdkafka (confluent-kafka), for ``ingest.kafka_bus``.

Every chat answer and every rating is sent from here, so the send path's CPU is serve's: with
kafka-python's pure-Python producer a record cost 26 µs of CPU (under the GIL that request
threads need); librdkafka builds and checksums batches in C, at about 4 µs (measured on this
project's broker, 600-byte records, acks=all).

Rules (the bus's publishing rules in ``ingest.kafka_bus`` rest on them):

- Idempotent (``enable.idempotence``, hence ``acks=all``): the broker drops the duplicates of the
  producer's own retries and keeps one producer's records of a partition in send order.
- ``send`` returns once every record of the call is acknowledged, or raises ``BusUnavailable``
  within ``timeout_s`` (``message.timeout.ms``: librdkafka stops retrying a record then) plus a
  second of slack; some records of a failed call may be stored (consumers dedupe by event_id).
- Keyed records go where Java's (and kafka-python's) default partitioner puts them
  (``murmur2_random``), so a response and its feedback share a partition whichever client sent them.
- Several threads may send at once: each waits for its own records' delivery reports, serving
  the reports of the others while it polls.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ingest.bus import BusUnavailable

logger = logging.getLogger(__name__)

_METADATA_MAX_AGE_S = 5.0  # how soon a new partition is seen


class KafkaSender:
    """One idempotent librdkafka producer; see the module docstring. Thread-safe."""

    def __init__(self, servers: list[str], *, client_id: str, timeout_s: float, batch_bytes: int) -> None:
        from confluent_kafka import Producer

        self.servers = servers
        self._timeout_s = timeout_s
        ms = int(timeout_s * 1000)
        self._producer = Producer(
            {
                "bootstrap.servers": ",".join(servers),
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                "message.timeout.ms": ms,
                "socket.timeout.ms": ms,
                "partitioner": "murmur2_random",
                # Big batches: a backlog (the spool's forwarder sends hundreds of records per call)
                # goes in a few produce requests. Below the broker's message.max.bytes (1 MiB).
                "batch.size": batch_bytes,
                "logger": logger,
            }
        )
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._lock = threading.Lock()

    def partitions(self, topic: str) -> list[int]:
        """The topic's partition ids (cached for a few seconds); BusUnavailable if unknown."""
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is not None and now - cached[0] < _METADATA_MAX_AGE_S:
            return cached[1]
        from confluent_kafka import KafkaException

        try:
            found = self._producer.list_topics(topic, timeout=self._timeout_s).topics.get(topic)
        except KafkaException as exc:
            raise BusUnavailable(f"cannot reach Kafka at {','.join(self.servers)}: {exc}") from exc
        if found is None or found.error is not None or not found.partitions:
            raise BusUnavailable(f"no partitions for topic {topic} ({found.error if found else 'unknown'})")
        partitions = sorted(found.partitions)
        with self._lock:
            self._partitions[topic] = (now, partitions)
        return partitions

    def send(self, records: list[tuple[str, int | None, str | None, bytes]]) -> list[tuple[int, int, float]]:
        """Send (topic, partition or None, key, value) records and wait for every acknowledgement;
        (partition, offset, broker timestamp in unix seconds) of each, in order."""
        from confluent_kafka import KafkaException

        results: list[Any] = [None] * len(records)  # each slot set once, by its record's report

        def delivered(i: int):
            def report(err: Any, msg: Any) -> None:
                results[i] = err if err is not None else (msg.partition(), msg.offset(), msg.timestamp()[1] / 1000.0)

            return report

        deadline = time.monotonic() + self._timeout_s + 1.0
        try:
            for i, (topic, partition, key, value) in enumerate(records):
                self._produce(topic, partition, key, value, delivered(i), deadline)
            while None in results and time.monotonic() < deadline:
                self._producer.poll(0.05)
        except KafkaException as exc:
            raise BusUnavailable(f"cannot publish: {exc}") from exc
        failed = [r for r in results if r is None or not isinstance(r, tuple)]
        if failed:
            reason = failed[0] if failed[0] is not None else f"no acknowledgement within {self._timeout_s:g} s"
            raise BusUnavailable(f"cannot publish {len(failed)} of {len(records)} records: {reason}")
        return results

    def _produce(
        self, topic: str, partition: int | None, key: str | None, value: bytes, report: Any, deadline: float
    ) -> None:
        options: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=None if key is None else key.encode("utf-8"), on_delivery=report, **options
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                if time.monotonic() >= deadline:
                    raise BusUnavailable("the Kafka producer's queue stayed full") from None
                self._producer.poll(0.05)

    def close(self, timeout_s: float = 0.0) -> None:
        """Deliver what is queued within ``timeout_s``, then drop the rest."""
        left = self._producer.flush(timeout_s)
        if left:
            self._producer.purge()
            self._producer.flush(0)
            logger.warning("dropped %d unsent Kafka records at close (their callers were told)", left)
