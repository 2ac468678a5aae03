"""The Redis ledger: the ``ResponseLedger`` shared by every serve replica, through redis-py.

URL: ``redis://[:password@]host:port/db[?prefix=kto:ledger:]`` or ``rediss://…`` (TLS); the
prefix namespaces the keys (see ``foundation.urls.redis_url``). A rating may reach a different
replica than the one that answered, so what feedback checks lives here rather than in a file.

Layout and rules (the same semantics as ``SqliteLedger``):

- One hash per response, ``<key_prefix><response_id>``, with fields ``created_at`` (always
  there, so the hash exists), ``user`` and ``version`` (absent for None), ``label`` and
  ``event_id`` (absent before the first vote).
- The TTL is Redis key expiry, set once when the response is recorded; votes do not extend it.
  Redis never returns an expired key (it checks expiry on access), so an entry is gone exactly
  when its TTL ran out, whatever its memory reclamation does later.
- ``record_response`` and ``set_vote`` are Lua scripts, so each is atomic on the server: two
  replicas voting on one response at once are serialised by Redis, and exactly one of them sees
  no previous label.
- Tallies: one hash ``<key_prefix>#tallies`` (``#`` never occurs in a served response id),
  fields ``responses:<version>``, ``desirable:<version>``, ``undesirable:<version>`` (version
  empty for the base model), changed inside the same scripts, so they never miss or double count.
- ``forget_user`` scans the prefix (an erasure is rare; an index per user would cost every chat a
  write) and deletes the user's hashes, each by a script that checks the owner again.
- A connection or timeout error raises ``LedgerUnavailable`` (after redis-py's few quick retries),
  which the server answers with 503 and Retry-After: nothing was changed, try again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from foundation.urls import quick_redis, redis_url
from serve.ledger import (
    DEFAULT_TTL_S,
    LABELS,
    LedgerEntry,
    LedgerUnavailable,
    NotResponseOwnerError,
    UnknownResponseError,
    VersionTally,
)

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "kto:ledger:"

# KEYS: the hash, the tallies. ARGV: ttl ms, created_at, version ('' = base), then field/value
# pairs. Returns 1 if recorded, 0 if live.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'responses:' .. ARGV[3], 1)
return 1
"""

# KEYS: the hash, the tallies. ARGV: user, label, event_id. Returns {status, previous label or nil}.
_SET_VOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if redis.call('HGET', KEYS[1], 'user') ~= ARGV[1] then return {'not_owner'} end
local previous = redis.call('HGET', KEYS[1], 'label')
if previous ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'label', ARGV[2], 'event_id', ARGV[3])
  local version = redis.call('HGET', KEYS[1], 'version') or ''
  redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':' .. version, 1)
  if previous then redis.call('HINCRBY', KEYS[2], previous .. ':' .. version, -1) end
end
return {'ok', previous}
"""

# KEYS[1] a response's hash; ARGV[1] the user. Deletes it only if it is still theirs.
_FORGET = """
if redis.call('HGET', KEYS[1], 'user') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLedger:
    """The shared ledger on a Redis server; see the module docstring. Thread-safe (a connection pool)."""

    def __init__(
        self, url: str, *, ttl_s: float = DEFAULT_TTL_S, key_prefix: str | None = None, timeout_s: float = 2.0
    ) -> None:
        """``ttl_s``: seconds after which a response can no longer be rated (Redis expires it).
        ``key_prefix``: prepended to every key, so that the ledger shares a Redis with others
        (default: the URL's ``prefix=``, else ``kto:ledger:``).
        ``timeout_s``: seconds to connect or to wait for one answer before ``LedgerUnavailable``.
        """
        import redis

        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        url, url_prefix, self._where = redis_url(url, DEFAULT_KEY_PREFIX)
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix or url_prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._redis: Any = quick_redis(url, timeout_s)  # a voter would rather get a quick 503
        self._record = self._redis.register_script(_RECORD)
        self._set_vote = self._redis.register_script(_SET_VOTE)
        self._forget = self._redis.register_script(_FORGET)
        self._tallies = self.key_prefix + "#tallies"
        self._errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        logger.info("Redis ledger on %s (prefix %r, TTL %.0f s)", self._where, self.key_prefix, ttl_s)

    def _key(self, response_id: str) -> str:
        return self.key_prefix + response_id

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise LedgerUnavailable(f"the ledger at {self._where} cannot {what}: {exc}") from exc

    def record_response(self, response_id: str, user: str | None, version: str | None = None) -> None:
        """Remember a served response; a live entry is kept, an expired one starts over."""
        if not response_id:
            raise ValueError("response_id must not be empty")
        fields: list[str] = []
        for name, value in (("user", user), ("version", version)):
            if value is not None:
                fields += [name, value]
        self._call(
            "record a response",
            self._record,
            keys=[self._key(response_id), self._tallies],
            args=[self._ttl_ms, repr(time.time()), version or "", *fields],
        )

    def lookup(self, response_id: str) -> LedgerEntry | None:
        """The live entry for ``response_id``, or None."""
        found = self._call("look up a response", self._redis.hgetall, self._key(response_id))
        if not found:
            return None
        return LedgerEntry(
            response_id, found.get("user"), found.get("version"), found.get("label"), found.get("event_id")
        )

    def set_vote(self, response_id: str, user: str, label: str, event_id: str) -> str | None:
        """Atomically record ``user``'s vote; return the previous label (None for a first vote)."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if not user or not event_id:
            raise ValueError("user and event_id must not be empty")
        reply = self._call(
            "record a vote", self._set_vote, keys=[self._key(response_id), self._tallies], args=[user, label, event_id]
        )
        if reply[0] == "unknown":
            raise UnknownResponseError(response_id)
        if reply[0] == "not_owner":  # an anonymous response (no user field) is nobody's to rate
            raise NotResponseOwnerError(f"response {response_id} was not served to {user!r}")
        return reply[1] if len(reply) > 1 else None

    def tally(self, version: str | None) -> VersionTally:
        fields = [f"{name}:{version or ''}" for name in ("responses", "desirable", "undesirable")]
        values = self._call("read a tally", self._redis.hmget, self._tallies, fields)
        return VersionTally(*(max(0, int(v or 0)) for v in values))

    def forget_user(self, user: str) -> int:
        if not user:
            raise ValueError("user must not be empty")

        def forget() -> int:
            forgotten = 0
            keys = (
                k
                for k in self._redis.scan_iter(match=_glob_escape(self.key_prefix) + "*", count=1000)
                if k != self._tallies
            )
            while batch := [k for _, k in zip(range(500), keys)]:
                pipe = self._redis.pipeline(transaction=False)
                for key in batch:
                    self._forget(keys=[key], args=[user], client=pipe)
                forgotten += sum(pipe.execute())
            return forgotten

        return self._call("forget a user", forget)

    def close(self) -> None:
        """Close the connections; idempotent."""
        self._redis.close()

    def __enter__(self) -> RedisLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern (SCAN MATCH)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
