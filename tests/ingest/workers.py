"""Child processes for the multi-process ingest tests (run as a script, not collected).

writer BUS_URL TOPIC TAG COUNT BATCH GO_FILE
    open the bus at BUS_URL (sqlite:///… or kafka://…), wait for GO_FILE, then publish COUNT
    records "TAG-i" (COUNT 0: forever), BATCH at a time, pausing 1 ms between publishes so that
    concurrent writers interleave; after each publish returns, print "OFFSET i" per record: the
    parent's proof of acknowledgement.
spooler SPOOL_PATH BUS_URL TOPIC
    publish "0", "1", … forever through a SpooledBus on the spool file SPOOL_PATH, sending to the
    bus at BUS_URL ("down": a bus that is never reachable); after each publish returns, print
    its number: the parent's proof that it is durable.
member KAFKA_URL GROUP TOPIC COMMIT_AT
    join GROUP on Kafka (3 s session timeout), poll until it has read offsets 0..COMMIT_AT-1 of
    partition 0, commit COMMIT_AT, print "committed COMMIT_AT", then keep polling (and reading,
    without committing) until killed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from testkit.waiting import wait_for


def _wait_for(go_file: str) -> None:
    """Say "ready", then wait for the parent's go (the file): writers started apart start together."""
    print("ready", flush=True)
    wait_for(Path(go_file).exists, what="the go file", timeout_s=30, interval_s=0.005)


def writer(url: str, topic: str, tag: str, count: str, batch: str, go_file: str) -> None:
    from ingest.bus import open_bus

    bus = open_bus(url)
    _wait_for(go_file)
    n, size = int(count), int(batch)
    i = 0
    while n == 0 or i < n:
        items: list[tuple[str | None, bytes]] = [
            (f"{tag}-{j}", f"{tag}-{j}".encode()) for j in range(i, i + size if n == 0 else min(i + size, n))
        ]
        records = bus.publish_many(topic, items) if size > 1 else [bus.publish(topic, *items[0])]
        lines = []
        for r in records:
            assert r.key is not None  # every record was published with a key
            lines.append(f"{r.offset} {r.key.rsplit('-', 1)[1]}")
        print("\n".join(lines), flush=True)
        i += len(items)
        time.sleep(0.001)
    bus.close()


def spooler(spool_path: str, url: str, topic: str) -> None:
    from ingest.bus import BusUnavailable, open_bus
    from ingest.spool import Spool
    from ingest.spooled_bus import SpooledBus

    class DownBus:
        def __getattr__(self, name: str):
            def unavailable(*args: object, **kwargs: object) -> None:
                raise BusUnavailable("down")

            return unavailable

    spooled = SpooledBus(DownBus() if url == "down" else open_bus(url), Spool(spool_path), min_backoff_s=0.01)
    i = 0
    while True:
        spooled.publish(topic, f"k{i}", str(i).encode())
        print(i, flush=True)
        i += 1


def member(url: str, group: str, topic: str, commit_at: str) -> None:
    from ingest.kafka_bus import KafkaBus

    bus = KafkaBus.from_url(url, session_timeout_s=3.0, heartbeat_interval_s=0.5)
    consumer = bus.consumer(group, [topic])
    seen = 0
    while seen < int(commit_at):
        seen += len(consumer.poll(timeout_s=0.5, max_records=int(commit_at) - seen))
    consumer.commit({(topic, 0): int(commit_at)})
    print("committed", commit_at, flush=True)
    while True:  # a live member that holds the partition and reads on, committing nothing
        consumer.poll(timeout_s=0.5)


if __name__ == "__main__":
    commands: dict[str, Callable[..., None]] = {"writer": writer, "spooler": spooler, "member": member}
    commands[sys.argv[1]](*sys.argv[2:])
