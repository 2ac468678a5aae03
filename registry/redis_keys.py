"""Where the Redis registry keeps what: its URL and its key layout.

URL: `redis://[user:password@]host:port/db[?prefix=kto:registry:]` (`rediss://` for TLS). The
prefix (default `kto:registry:`) lets several registries share one database; every other query
parameter goes to redis-py (e.g. `socket_timeout=5`). Keys, all under the prefix:

    schema        "6": the layout of these keys (a newer layout is refused, not misread; 1 had
                  no canary and no evidence, 2 no erasures, 3 no canary `versions`, 5 no
                  pinned and pruned; older ones
                  are upgraded in place on open: the new keys and fields start empty)
    next_version  INCR counter behind the names v0001, v0002, … (so never reused)
    state         hash version → pending | ready | rejected | abandoned
    meta          hash version → JSON parent, created_at, base_model, sha256, files, metrics,
                  lineage: written once, with the move out of pending, never changed
    rejected      hash version → why it was rejected
    pointer       hash counter, active ("" = the base model), canary (JSON of the running
                  registry.canary.Canary, "" when none runs)
    stack         list, the rollback stack oldest first ("" = the base model)
    history       list of JSON HistoryEntry, oldest first, append-only (entries written under
                  layout 1 lack "evidence": read as None)
    changes       the pub/sub channel: one message per pointer change
    flags         hash version → JSON list of its flags (registry.erasure)
    erasures      hash erasure request id → JSON of its history entry (a repeat returns it)
    rule_sets     list of JSON rule-set versions (at, actor, reason, rules), oldest first: the
                  version of an entry is its position counted from 1 (layout 5)
    pinned        hash version → "1" while an operator pins it (registry.retention)
    pruned        hash version → unix seconds when retention deleted its files
"""

from __future__ import annotations

from foundation.urls import redis_url

DEFAULT_PREFIX = "kto:registry:"
SCHEMA_VERSION = 6


def parse_url(url: str) -> tuple[str, str, str]:
    """(URL for redis-py, key prefix, `scheme://host:port/db` for messages: no credentials)."""
    return redis_url(url, DEFAULT_PREFIX)


class RedisKeys:
    """The full key names for one prefix (see the table above)."""

    def __init__(self, prefix: str) -> None:
        self.schema = prefix + "schema"
        self.next_version = prefix + "next_version"
        self.state = prefix + "state"
        self.meta = prefix + "meta"
        self.rejected = prefix + "rejected"
        self.pointer = prefix + "pointer"
        self.stack = prefix + "stack"
        self.history = prefix + "history"
        self.changes = prefix + "changes"
        self.flags = prefix + "flags"
        self.erasures = prefix + "erasures"
        self.rule_sets = prefix + "rule_sets"
        self.pinned = prefix + "pinned"
        self.pruned = prefix + "pruned"
