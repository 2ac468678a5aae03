"""A child process for the ledger's multi-process test (run as a script, not collected).

ledger_voter.py LEDGER_URL KEY_PREFIX RESPONSE_ID USER COUNT SEED GO_FILE
    open the ledger (sqlite:///… or redis://…, the Redis keys under KEY_PREFIX), say "ready", wait
    for GO_FILE, then cast COUNT random votes; print "PREVIOUS NEW" for each.
"""

from __future__ import annotations

import random
import sys
import uuid
from pathlib import Path

from testkit.waiting import wait_for


def voter(url: str, key_prefix: str, response_id: str, user: str, count: str, seed: str, go_file: str) -> None:
    from serve.ledger import open_ledger
    from serve.redis_ledger import RedisLedger

    ledger = RedisLedger(url, key_prefix=key_prefix) if url.startswith("redis") else open_ledger(url)
    rng = random.Random(int(seed))
    print("ready", flush=True)  # voters started apart start together, at the parent's go
    wait_for(Path(go_file).exists, what="the go file", timeout_s=30, interval_s=0.005)
    for _ in range(int(count)):
        label = rng.choice(["desirable", "undesirable"])
        previous = ledger.set_vote(response_id, user, label, uuid.uuid4().hex)
        print(previous, label, flush=True)
    ledger.close()


if __name__ == "__main__":
    voter(*sys.argv[1:])
