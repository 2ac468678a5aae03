"""Child processes for the multi-process ingest tests (run as a script, not collected).

writer PATH TOPIC TAG COUNT BATCH GO_FILE
    wait for GO_FILE, then publish COUNT records "TAG-i" (COUNT 0: forever), BATCH at a time,
    pausing 1 ms between publishes so that concurrent writers interleave; after each publish
    returns, print "OFFSET i" per record: the parent's proof of acknowledgement.
voter PATH RESPONSE_ID USER COUNT SEED GO_FILE
    wait for GO_FILE, then cast COUNT random votes; print "PREVIOUS NEW" for each.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from pathlib import Path


def _wait_for(go_file: str) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            raise SystemExit("go file never appeared")
        time.sleep(0.005)


def writer(path: str, topic: str, tag: str, count: str, batch: str, go_file: str) -> None:
    from ingest.sqlite_bus import SqliteBus

    bus = SqliteBus(path)
    _wait_for(go_file)
    n, size = int(count), int(batch)
    i = 0
    while n == 0 or i < n:
        items = [(f"{tag}-{j}", f"{tag}-{j}".encode()) for j in range(i, i + size if n == 0 else min(i + size, n))]
        records = bus.publish_many(topic, items) if size > 1 else [bus.publish(topic, *items[0])]
        print("\n".join(f"{r.offset} {r.key.rsplit('-', 1)[1]}" for r in records), flush=True)
        i += len(items)
        time.sleep(0.001)
    bus.close()


def voter(path: str, response_id: str, user: str, count: str, seed: str, go_file: str) -> None:
    from ingest.ledger import SqliteLedger

    ledger = SqliteLedger(path)
    rng = random.Random(int(seed))
    _wait_for(go_file)
    for _ in range(int(count)):
        label = rng.choice(["desirable", "undesirable"])
        previous = ledger.set_vote(response_id, user, label, uuid.uuid4().hex)
        print(previous, label, flush=True)
    ledger.close()


if __name__ == "__main__":
    {"writer": writer, "voter": voter}[sys.argv[1]](*sys.argv[2:])
