"""Publishing through the spool: events reach a remote bus in order, also across its outages.

``SpooledBus`` wraps a remote bus (Kafka) and a ``Spool`` (``ingest.spool``). The server uses it
so that chat and feedback keep working while the broker is unreachable. The embedded SQLite bus
needs none: it already is a durable log on the local disk, and a spool in front of it would
only write every event twice.

Delivery rules:

- ``publish`` / ``publish_many`` append to the spool and return: when they return, the events
  are durable on the local disk (fsync'd). The caller never waits for the bus, so a healthy
  broker costs a request one local commit (about a millisecond; publishes from many request
  threads at once share one, see "Group commit" in ``ingest.spool``) and a dead one costs
  nothing more (never Kafka's connect and delivery timeouts).
- One forwarder thread sends the spool to the bus in spool order: the oldest ``batch`` records
  (any topics) go as one ``publish_batch``, and the next batch is sent only once every record of
  this one was acknowledged. Kafka keeps order within a partition, and one producer keeps its
  records of a partition in send order, so the records of one response_id (its response, then
  its ratings, on the same partition of each topic) reach the bus in the order they were spooled;
  across topics there is no order on Kafka, and the learner needs none (it parks a rating whose
  response is not there yet). Every record takes this path (no direct publish overtakes a
  spooled one). With a healthy broker a record is on the bus a few milliseconds after it was
  spooled, and a backlog goes out a whole batch per round trip.
- A record leaves the spool only after the bus acknowledged it. A crash between the acknowledgement
  and the deletion, or a ``publish_many`` that failed half way (Kafka's is not atomic), sends
  records again, so delivery is at least once and consumers dedupe by ``event_id``. A failed
  send may have stored the head of its run, which the resend then duplicates; the first copies
  keep their order. (One exception: a send that timed out on a live but slow broker may still
  land after its resend, so two copies can straddle later records. The learner orders votes by
  ``created_at`` and parks a rating whose response is not there yet, so that costs nothing.)
- While the bus is down the forwarder retries from the oldest record, with exponential backoff
  from ``min_backoff_s`` to ``max_backoff_s``. Whatever is spooled when the server stops is sent
  by the next server started on the same spool file.
- A full spool refuses new records (``SpoolFull``, a ``BusUnavailable``): nothing is dropped, and
  the server answers 503. ``check_room`` lets a caller refuse work it could not record.
- ``create_topics`` is remembered and done by the forwarder once the bus answers, so a server
  starts while the broker is down. Reading (``consumer``, ``end_offsets``) goes to the bus.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ingest.bus import Bus, BusUnavailable, Consumer, Record, TopicPartition
from ingest.spool import Spool, SpoolFull

logger = logging.getLogger(__name__)

SPOOLED = -1
"""The partition and offset of a ``Record`` returned by ``SpooledBus.publish``: not on the bus yet."""


@dataclass(frozen=True)
class SpoolStatus:
    """What the spool and its forwarder are doing, for metrics and readiness."""

    depth: int
    """Records waiting for the bus."""
    max_events: int
    """The spool's bound (records)."""
    oldest_age_s: float
    """Seconds the oldest waiting record has waited (0 when none waits)."""
    sent: int
    """Records the bus acknowledged since start."""
    rejected: int
    """Records refused because the spool was full, since start."""
    bus_up: bool | None
    """Whether the last send or health check reached the bus (None: not tried yet)."""
    last_error: str | None
    """The last failure to reach the bus, while it is down."""


class SpooledBus:
    """A ``Bus`` whose publishes go through a durable local spool; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        spool: Spool,
        *,
        batch: int = 500,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        health_check_s: float = 5.0,
    ) -> None:
        """``batch``: most records per forwarding round (records).
        ``min_backoff_s`` / ``max_backoff_s``: first and longest wait between retries while the bus is down (seconds).
        ``health_check_s``: when idle, seconds between pings of the bus (for ``status``).
        It owns both: ``close`` closes the bus and the spool.
        """
        self.bus = bus
        self.spool = spool
        self._batch = batch
        self._min_backoff_s, self._max_backoff_s = min_backoff_s, max_backoff_s
        self._health_check_s = health_check_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._progress = threading.Condition()  # notified whenever records leave the spool
        self._topics: dict[str, int] = {}  # to create on the bus, with their partition counts
        self._counts = threading.Lock()
        self._sent = self._rejected = 0
        self._bus_up: bool | None = None
        self._last_error: str | None = None
        self._closed = False
        self._forwarder = threading.Thread(target=self._forward, name="spool-forwarder", daemon=True)
        self._forwarder.start()

    # -- publishing (request threads) ------------------------------------------------------------

    def publish(self, topic: str, key: str | None, value: bytes) -> Record:
        """Spool one record durably; the returned Record's partition and offset are ``SPOOLED``."""
        return self.publish_many(topic, [(key, value)])[0]

    def publish_many(self, topic: str, items: list[tuple[str | None, bytes]]) -> list[Record]:
        """Spool (key, value) records durably, all or none; ``SpoolFull`` if they do not fit."""
        return self.publish_batch([(topic, key, value) for key, value in items])

    def publish_batch(self, items: list[tuple[str, str | None, bytes]]) -> list[Record]:
        """Spool (topic, key, value) records durably, all or none; ``SpoolFull`` if they do not fit."""
        if self._closed:
            raise BusUnavailable("the spooled bus is closed")
        try:
            self.spool.append_records(items)
        except SpoolFull:
            with self._counts:
                self._rejected += len(items)
            raise
        self._wake.set()
        now = time.time()
        return [Record(topic, SPOOLED, SPOOLED, key, bytes(value), now) for topic, key, value in items]

    def check_room(self, n: int = 1) -> None:
        """Raise ``SpoolFull`` unless ``n`` more records fit now."""
        self.spool.check_room(n)

    def create_topics(self, topics: list[str], partitions: int = 1) -> None:
        """Have the forwarder create these topics before it sends anything (the bus may be down now)."""
        for topic in topics:
            self._topics.setdefault(topic, partitions)
        self._wake.set()

    # -- reading and health (passed to the bus) --------------------------------------------------

    def consumer(self, group_id: str, topics: list[str]) -> Consumer:
        return self.bus.consumer(group_id, topics)

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        return self.bus.end_offsets(topics)

    def ping(self) -> None:
        """Raise ``BusUnavailable`` unless events can be published now (the spool is open and has room).

        A down broker is not a failure here: events wait in the spool. ``status`` tells about it.
        """
        if self._closed or not self.spool.path.exists():
            raise BusUnavailable(f"the spool at {self.spool.path} is gone")
        self.check_room()

    def status(self) -> SpoolStatus:
        depth = self.spool.depth
        oldest = self.spool.oldest_at() if depth and not self._closed else None
        return SpoolStatus(
            depth=depth,
            max_events=self.spool.max_events,
            oldest_age_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
            sent=self._sent,
            rejected=self._rejected,
            bus_up=self._bus_up,
            last_error=None if self._bus_up else self._last_error,
        )

    def flush(self, timeout_s: float) -> bool:
        """Wait until the spool is empty; False if ``timeout_s`` seconds passed first."""
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while self.spool.depth:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, 0.5))
        return True

    # -- the forwarder thread --------------------------------------------------------------------

    def _forward(self) -> None:
        backoff = self._min_backoff_s
        last_contact = time.monotonic()
        while not self._stopping.is_set():
            self._wake.clear()  # before peeking: an append after the peek wakes the wait below
            try:
                batch = self.spool.peek(self._batch) if not self._closed else []
                if not batch and not self._topics:
                    if not self._wake.wait(max(0.0, last_contact + self._health_check_s - time.monotonic())):
                        self.bus.ping()  # idle for a while: is the bus still there?
                        self._reached()
                        last_contact = time.monotonic()
                    continue
                self._ensure_topics()
                if batch:
                    self.bus.publish_batch([(s.topic, s.key, s.value) for s in batch])
                    self.spool.remove_through(batch[-1].seq)
                    with self._counts:
                        self._sent += len(batch)
                    with self._progress:
                        self._progress.notify_all()
                self._reached()
                last_contact = time.monotonic()
                backoff = self._min_backoff_s
            except Exception as exc:  # BusUnavailable mostly; anything else must not kill the thread
                if self._stopping.is_set():
                    break
                self._unreachable(exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                last_contact = time.monotonic()

    def _ensure_topics(self) -> None:
        for topic, partitions in list(self._topics.items()):
            self.bus.create_topics([topic], partitions)
            del self._topics[topic]

    def _reached(self) -> None:
        if self._bus_up is not True:
            logger.info("the bus is reachable; %d events waiting in the spool", self.spool.depth)
        self._bus_up, self._last_error = True, None

    def _unreachable(self, exc: Exception, backoff: float) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._bus_up is not False:
            log = logger.warning if isinstance(exc, BusUnavailable) else logger.exception
            log("cannot send the spool to the bus (%s); %d events wait, retrying", exc, self.spool.depth)
        else:
            logger.debug("bus still unreachable (%s); next try in %.2f s", exc, backoff)
        self._bus_up = False

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Send what the spool holds for up to ``drain_timeout_s`` while the bus is up, then stop the
        forwarder and close the bus and the spool; idempotent. Unsent records stay in the spool file."""
        if self._closed:
            return
        if self._bus_up and drain_timeout_s > 0:
            self.flush(drain_timeout_s)
        self._stopping.set()
        self._wake.set()
        self._closed = True
        # The forwarder may be inside a send that waits for the bus's own timeout; closing the bus
        # ends that, and whatever it was sending is still in the spool.
        self._forwarder.join(timeout=1.0)
        self.bus.close()
        self._forwarder.join(timeout=30.0)
        if self._forwarder.is_alive():
            logger.warning("the spool forwarder did not stop; unsent events stay in %s", self.spool.path)
        self.spool.close()
        depth = self.spool.depth
        if depth:
            logger.warning("%d events stay in the spool %s until the next start", depth, self.spool.path)

    def __enter__(self) -> SpooledBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
