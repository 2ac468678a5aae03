"""The Kafka bus: the ``Bus`` protocol on Apache Kafka: sending through librdkafka
(``ingest.kafka_producer``), reading and topic administration through kafka-python (both
imported lazily).

URL: ``kafka://host:port[,host:port]``, the bootstrap servers.

Publishing rules:

- One idempotent producer per bus (``acks=all``, ``enable.idempotence``; ``ingest.kafka_producer``):
  the broker drops the duplicates that the producer's own retries would create, and keeps one
  producer's records of a partition in send order.
- Records are keyed by the key the caller gives (the response_id), so the partitioner (murmur2,
  as Java clients hash keys) puts a response and its feedback on the same partition. Keyless
  records go round-robin over the partitions, as on the embedded bus.
- ``publish`` returns once every in-sync replica has the record. That is Kafka's durability:
  replication, not fsync. On a one-node broker (tests, ``make services``) an acknowledged record
  can be lost to a power cut; in production give the cluster ``default.replication.factor=3``
  and ``min.insync.replicas=2`` (topics are created with the broker's default replication).
- Failures raise ``BusUnavailable`` within a bound: up to ``timeout_s`` waiting for metadata,
  then up to ``timeout_s`` more for the acknowledgement. A record whose wait timed out may still
  be stored afterwards, so a retry can duplicate it (consumers dedupe by event_id).
- ``publish_many`` sends every record, then waits for all acknowledgements. Unlike the embedded
  bus it is not atomic: if it raises, some of the records may be stored (same dedupe remedy).
  The records of a call go to the broker in batches of up to ``batch_bytes`` per partition, so a
  backlog costs a few produce requests rather than one per 16 KiB.
- Publishing to a topic that does not exist creates it with one partition, as the embedded bus
  does; the broker's own auto-creation stays off, so a typo in a consumer never makes a topic.
- Records are kept as long as the topic's retention says (the broker's default: 7 days).
- A bus survives broker restarts. Admin requests (topics, end offsets, ping) that fail with a
  retriable error (``NodeNotReadyError`` right after a restart, while every known node is in
  reconnect backoff) are retried within ``timeout_s``; a client whose request still failed is
  closed and a fresh one is made on the next call. The producer is likewise replaced after a
  failed publish, so a producer left in a bad state by the restart never stays in use.

Reading (consumer groups, commits, rebalances) is in ``ingest.kafka_consumer``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from ingest.bus import BusUnavailable, Record, TopicPartition, check_records, check_subscription, check_topic_name
from ingest.kafka_consumer import KafkaGroupConsumer
from ingest.kafka_producer import KafkaSender

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36  # Kafka's error code


def bootstrap_servers(url: str) -> list[str]:
    """The ``host:port`` list of a ``kafka://host:port[,host:port]`` URL; ValueError saying what is wrong."""
    prefix = "kafka://"
    if not url.startswith(prefix):
        raise ValueError(f"{url!r} is not a kafka://host:port URL")
    rest = url[len(prefix) :].rstrip("/")
    if not rest or any(c in rest for c in "/?#@"):
        raise ValueError(f"Kafka URL {url!r} must be kafka://host:port[,host:port] (no path, query or user)")
    servers = []
    for server in rest.split(","):
        host, colon, port = server.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Kafka URL {url!r}: {server!r} is not host:port")
        servers.append(f"{host}:{int(port)}")
    return servers


class KafkaBus:
    """The bus on a Kafka cluster; see the module docstring for its rules.

    Thread-safe. The producer and admin clients are made on first use, so a bus opened while the
    cluster is down works once it is back (and see the module docstring for broker restarts).
    """

    def __init__(
        self,
        servers: list[str],
        *,
        client_id: str = "kto-loop",
        timeout_s: float = 10.0,
        session_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 3.0,
        max_poll_interval_s: float = 300.0,
        metadata_max_age_s: float = 5.0,
        batch_bytes: int = 512 * 1024,
    ) -> None:
        """``timeout_s``: seconds any one request (connect, metadata, send, commit) may take.
        ``session_timeout_s``: seconds without a heartbeat before the group drops a member (a crashed consumer).
        ``heartbeat_interval_s``: seconds between heartbeats; also how soon a member notices a rebalance.
        ``max_poll_interval_s``: seconds a member may spend between polls before it leaves the group.
        ``metadata_max_age_s``: seconds before metadata is refreshed (new topics and partitions are seen).
        ``batch_bytes``: most bytes of records the producer puts in one batch for a partition (bytes);
        keep it under the broker's ``message.max.bytes``.
        """
        if not servers:
            raise ValueError("KafkaBus needs at least one bootstrap server")
        self.servers = list(servers)
        self._timeout_s = timeout_s
        self._batch_bytes = batch_bytes
        ms = int(timeout_s * 1000)
        self._client_config: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": client_id,
            "request_timeout_ms": ms,
            "bootstrap_timeout_ms": ms,
        }
        self._consumer_config: dict[str, Any] = {
            **self._client_config,
            "session_timeout_ms": int(session_timeout_s * 1000),
            "heartbeat_interval_ms": int(heartbeat_interval_s * 1000),
            "max_poll_interval_ms": int(max_poll_interval_s * 1000),
            "metadata_max_age_ms": int(metadata_max_age_s * 1000),
        }
        self._lock = threading.Lock()
        # kafka-python's admin client refuses (rather than queues) requests beyond its in-flight
        # limit, so admin calls from the server's threads take turns; they are rare and short.
        self._admin_lock = threading.RLock()
        self._producer: Any = None
        self._admin: Any = None
        self._closed = False
        self._known_topics: set[str] = set()
        self._round_robin = itertools.count()
        logger.info("Kafka bus on %s", ",".join(self.servers))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaBus:
        """A bus on the servers of a ``kafka://host:port[,host:port]`` URL."""
        return cls(bootstrap_servers(url), **options)

    def _admin_client(self) -> Any:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        with self._lock:
            if self._closed:
                raise BusUnavailable("the Kafka bus is closed")
            if self._admin is None:
                try:
                    self._admin = KafkaAdminClient(**self._client_config)
                except KafkaError as exc:
                    raise BusUnavailable(f"cannot reach Kafka at {','.join(self.servers)}: {exc}") from exc
            return self._admin

    def _producer_client(self) -> KafkaSender:
        with self._lock:
            if self._closed:
                raise BusUnavailable("the Kafka bus is closed")
            if self._producer is None:
                self._producer = KafkaSender(
                    self.servers,
                    client_id=self._client_config["client_id"],
                    timeout_s=self._timeout_s,
                    batch_bytes=self._batch_bytes,
                )
            return self._producer

    def _drop_admin(self, admin: Any) -> None:
        with self._lock:
            if self._admin is admin:
                self._admin = None
        _close_quietly(admin)

    def _admin_call(self, what: str, call: Any) -> Any:
        """``call(admin)`` under the admin lock, retrying retriable errors within the timeout; a
        client whose request failed for good is dropped (see the module docstring)."""
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self._timeout_s
        pause = 0.05
        while True:
            admin = self._admin_client()
            try:
                with self._admin_lock:
                    return call(admin)
            except KafkaError as exc:
                if exc.retriable and time.monotonic() + pause < deadline:
                    logger.debug("%s: %s; retrying", what, exc)
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                self._drop_admin(admin)
                raise BusUnavailable(f"cannot {what}: {exc}") from exc

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        """Create missing topics with ``partitions`` partitions and wait until they have leaders.

        Existing topics are kept as they are (a different partition count is logged).
        """
        for topic in topics:
            check_topic_name(topic)
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if not topics:
            return
        ms = self._client_config["request_timeout_ms"]
        self._admin_call(
            f"create topics {topics}", lambda admin: self._create_topics(admin, list(topics), partitions, ms)
        )
        with self._lock:
            self._known_topics.update(topics)

    @staticmethod
    def _create_topics(admin: Any, topics: list[str], partitions: int, ms: int) -> None:
        # replication_factor -1: the broker's default.replication.factor.
        response = admin.create_topics(
            {t: {"num_partitions": partitions, "replication_factor": -1} for t in topics},
            timeout_ms=ms,
            raise_errors=False,
        )
        existing = []
        for result in response["topics"]:
            if result["error_code"] == _TOPIC_ALREADY_EXISTS:
                existing.append(result["name"])
            elif result["error_code"]:
                raise BusUnavailable(
                    f"cannot create topic {result['name']}: error {result['error_code']} {result['error_message']}"
                )
            else:
                logger.info("created topic %s with %d partition(s)", result["name"], partitions)
        admin.wait_for_topics(topics, timeout_ms=ms)
        if existing:
            for described in admin.describe_topics(existing):
                if len(described["partitions"]) != partitions:
                    logger.warning(
                        "topic %s exists with %d partitions, not %d; keeping it",
                        described["name"],
                        len(described["partitions"]),
                        partitions,
                    )

    def publish(self, topic: str, key: str | None, value: bytes) -> Record:
        """Append one record; returns once all in-sync replicas have it."""
        return self.publish_many(topic, [(key, value)])[0]

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        """Send (key, value) records, then wait for every acknowledgement (not atomic; see the module docstring)."""
        return self.publish_batch([(topic, key, value) for key, value in items])

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        """Send (topic, key, value) records, then wait for every acknowledgement (not atomic).

        One producer keeps each partition's records in send order, also across its retries."""
        topics = list(dict.fromkeys(check_topic_name(topic) for topic, _, _ in items))
        check_records([(key, value) for _, key, value in items])
        if not items:
            return []
        producer = self._producer_client()
        for topic in topics:
            if topic not in self._known_topics:
                with self._admin_lock:  # one thread creates it, the others then find it known
                    if topic not in self._known_topics:
                        self.create_topics([topic], 1)
        try:
            partitions = {topic: producer.partitions(topic) for topic in topics}
            sent = producer.send(
                [(topic, self._partition(partitions[topic], key), key, bytes(value)) for topic, key, value in items]
            )
        except BusUnavailable:
            self._drop_producer(producer)
            raise
        return [
            Record(topic, partition, offset, key, bytes(value), at)
            for (partition, offset, at), (topic, key, value) in zip(sent, items)
        ]

    def _drop_producer(self, producer: Any) -> None:
        # The next publish makes a fresh producer; whatever this one still held was reported failed.
        with self._lock:
            if self._producer is producer:
                self._producer = None
        _close_quietly(producer, timeout_s=0)

    def _partition(self, partitions: list[int], key: str | None) -> int | None:
        """The partition to send to, or None for the default partitioner (murmur2 of the key)."""
        if len(partitions) == 1:
            return partitions[0]  # what any partitioner picks; hashing the key in Python is not free
        if key is None:
            # Kafka's sticky partitioner would put a burst of keyless records on one partition.
            return partitions[next(self._round_robin) % len(partitions)]
        return None

    def consumer(self, group_id: str, topics: list[str]) -> KafkaGroupConsumer:
        """A new member of ``group_id`` subscribed to ``topics`` (see ``ingest.kafka_consumer``)."""
        check_subscription(group_id, topics)
        with self._lock:
            if self._closed:
                raise BusUnavailable("the Kafka bus is closed")
        return KafkaGroupConsumer(dict(self._consumer_config), group_id, list(topics))

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        """The high watermark of each partition of the existing topics; unknown topics are left out."""
        from kafka import TopicPartition as KafkaTopicPartition
        from kafka.admin import OffsetSpec

        if not topics:
            return {}

        def call(admin: Any) -> dict[Any, Any]:
            wanted = {
                KafkaTopicPartition(t["name"], p["partition_index"]): OffsetSpec.LATEST
                for t in admin.describe_topics(list(topics))
                if t["error_code"] == 0
                for p in t["partitions"]
            }
            if not wanted:
                return {}
            return admin.list_partition_offsets(wanted, timeout_ms=self._client_config["request_timeout_ms"])

        offsets = self._admin_call("read end offsets", call)
        return {(tp.topic, tp.partition): found.offset for tp, found in offsets.items()}

    def ping(self) -> None:
        """Raise BusUnavailable unless a metadata request to the cluster succeeds."""
        cluster = self._admin_call(f"reach Kafka at {','.join(self.servers)}", lambda admin: admin.describe_cluster())
        if not cluster.get("brokers"):
            raise BusUnavailable(f"Kafka at {','.join(self.servers)} reports no brokers")

    def close(self) -> None:
        """Flush and close the clients; idempotent. Consumers made by this bus stay open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, admin = self._producer, self._admin
            self._producer = self._admin = None
        if producer is not None:
            producer.close(timeout_s=self._timeout_s)
        if admin is not None:
            admin.close()

    def __enter__(self) -> KafkaBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(client: Any, **kwargs: Any) -> None:
    try:
        client.close(**kwargs)
    except Exception:  # a client that failed may fail to close too; it is being dropped either way
        logger.debug("closing a failed Kafka client", exc_info=True)
