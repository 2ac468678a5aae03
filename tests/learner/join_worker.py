"""Child process for the learner's SIGKILL test (run as a script, not collected).

join_worker.py BUS_PATH BUFFER_PATH TOPIC_PREFIX MAX_RECORDS PAUSE_S
    join events into the buffer (holding partitions on a 1 s lease), MAX_RECORDS per poll,
    pausing PAUSE_S between polls; after each poll print "EXAMPLES" (examples now in the
    buffer). Runs until killed, or for 120 s at most.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(bus_path: str, buffer_path: str, prefix: str, max_records: str, pause_s: str) -> None:
    from ingest.events import Topics
    from ingest.sqlite_bus import SqliteBus
    from learner.buffer import ReplayBuffer
    from learner.consumer import EventJoiner

    bus = SqliteBus(bus_path, lease_s=1.0)  # so that the parent takes over soon after the kill
    buffer = ReplayBuffer(Path(buffer_path))
    joiner = EventJoiner(bus, Topics(prefix), buffer, max_records=int(max_records))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        joiner.poll_once(timeout_s=0.05)
        counts = buffer.counts()
        print(counts["desirable"] + counts["undesirable"], flush=True)
        time.sleep(float(pause_s))


if __name__ == "__main__":
    main(*sys.argv[1:])
