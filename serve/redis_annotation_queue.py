"""The annotation queue on Redis, shared by replicas; the rules are serve.annotation_queue's.

Keys, under the prefix (default ``kto:annotations:``; a URL's ``prefix=`` overrides):
- ``i:<id>``: the item (a hash: user, version, created_at, required, annotated, body);
- ``open`` / ``all``: sorted sets of item ids by time, those wanting annotations / every one;
- ``annotated``: the ids of items with at least one annotation;
- ``a:<id>``: annotator → their annotation (JSON); ``l:<id>``: annotator → lease expiry;
- ``s:<annotator>``: the ids they skipped; ``u:<user>``: the user's item ids (for erasure);
- ``config``: what an operator set.

Taking a lease, annotating and skipping are Lua scripts, so each check-and-write is atomic
across replicas. Expired items are purged lazily by whichever replica adds one.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import redis

from foundation.urls import quick_redis, redis_url
from serve.annotation_queue import Annotation, Candidate, ItemGone, NotAssigned, QueueItem, QueueUnavailable

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "kto:annotations:"
_PURGE_EVERY_S = 60.0

# KEYS: item, annotations, leases, held, skips; ARGV: annotator, now, expires_at, id, lease_ms
_ASSIGN = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 1 then return 0 end
local taken = tonumber(redis.call('HGET', KEYS[1], 'annotated'))
local leases = redis.call('HGETALL', KEYS[3])
for i = 1, #leases, 2 do
  if leases[i] ~= ARGV[1] and tonumber(leases[i + 1]) > tonumber(ARGV[2]) then taken = taken + 1 end
end
if taken >= tonumber(redis.call('HGET', KEYS[1], 'required')) then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5])
return 1
"""

# Whether ARGV[1] holds a lease on the item at ARGV[2]: a live one, or one that ran out while
# nobody else took its slot. KEYS: item, annotations, leases.
_HOLDS = """
local function holds()
  local expires = redis.call('HGET', KEYS[3], ARGV[1])
  if not expires then return false end
  if tonumber(expires) > tonumber(ARGV[2]) then return true end
  local taken = tonumber(redis.call('HGET', KEYS[1], 'annotated'))
  local leases = redis.call('HGETALL', KEYS[3])
  for i = 1, #leases, 2 do
    if leases[i] ~= ARGV[1] and tonumber(leases[i + 1]) > tonumber(ARGV[2]) then taken = taken + 1 end
  end
  return taken < tonumber(redis.call('HGET', KEYS[1], 'required'))
end
"""

# KEYS: item, annotations, leases; ARGV: annotator, now → {'gone'} | {'not_assigned'} | {'ok', previous or ''}
_CHECK = (
    _HOLDS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local previous = redis.call('HGET', KEYS[2], ARGV[1])
if previous then return {'ok', previous} end
if not holds() then return {'not_assigned'} end
return {'ok', ''}
"""
)

# KEYS: item, annotations, leases, held, open, annotated; ARGV: annotator, now, annotation JSON, id
_ANNOTATE = (
    _HOLDS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local previous = redis.call('HGET', KEYS[2], ARGV[1])
if not previous and not holds() then return {'not_assigned'} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
if previous then return {'ok', previous} end
redis.call('SADD', KEYS[6], ARGV[4])
if redis.call('HINCRBY', KEYS[1], 'annotated', 1) >= tonumber(redis.call('HGET', KEYS[1], 'required')) then
  redis.call('ZREM', KEYS[5], ARGV[4])
end
return {'ok', ''}
"""
)

# KEYS: leases, skips, held; ARGV: annotator, now, id, ttl_ms
_SKIP = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


def _reachable(method):
    """Redis away is ``QueueUnavailable`` (a 503 with Retry-After), not an unexpected error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise QueueUnavailable(f"the annotation queue at {self._where} is unavailable: {exc}") from exc

    return wrapper


class RedisAnnotationQueue:
    """See the module docstring. Thread-safe (a connection pool)."""

    def __init__(self, url: str, *, ttl_s: float, max_items: int, timeout_s: float = 2.0) -> None:
        url, self.prefix, self._where = redis_url(url, DEFAULT_KEY_PREFIX)
        self.ttl_s, self.max_items = ttl_s, max_items
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._redis: Any = quick_redis(url, timeout_s)  # an annotator would rather get a quick 503
        self._assign = self._redis.register_script(_ASSIGN)
        self._check = self._redis.register_script(_CHECK)
        self._annotate = self._redis.register_script(_ANNOTATE)
        self._skip = self._redis.register_script(_SKIP)
        self._last_purge = float("-inf")
        logger.info("Redis annotation queue on %s (prefix %r)", self._where, self.prefix)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _item_keys(self, response_id: str) -> list[str]:
        return [self._k("i", response_id), self._k("a", response_id), self._k("l", response_id)]

    @_reachable
    def add(self, item: QueueItem) -> None:
        key = self._k("i", item.response_id)
        fields = {
            "user": item.user,
            "version": item.version or "",
            "created_at": repr(item.created_at),
            "required": item.required,
            "annotated": 0,
            "body": item.body(),
        }
        if not self._redis.hsetnx(key, "user", item.user):
            return  # queued before
        pipe = self._redis.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, self._ttl_ms)
        pipe.zadd(self._k("open"), {item.response_id: item.created_at})
        pipe.zadd(self._k("all"), {item.response_id: item.created_at})
        pipe.sadd(self._k("u", item.user), item.response_id)
        pipe.pexpire(self._k("u", item.user), self._ttl_ms)
        pipe.execute()
        now = time.time()
        if now - self._last_purge >= _PURGE_EVERY_S:
            self._last_purge = now
            self.purge(now)

    @_reachable
    def purge(self, now: float) -> int:
        old = self._redis.zrangebyscore(self._k("all"), "-inf", now - self.ttl_s)
        excess = self._redis.zcard(self._k("all")) - len(old) - self.max_items
        if excess > 0:  # the oldest items nobody annotated leave first
            oldest = self._redis.zrangebyscore(self._k("all"), now - self.ttl_s, "+inf", start=0, num=2 * excess + 100)
            annotated = self._redis.smismember(self._k("annotated"), oldest) if oldest else []
            old += [rid for rid, labeled in zip(oldest, annotated) if not labeled][:excess]
        self._delete(old)
        if old:
            logger.info(
                "annotation queue: %d items left (older than %.0f s, or over %d)", len(old), self.ttl_s, self.max_items
            )
        return len(old)

    def _delete(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe = self._redis.pipeline()
            for rid in chunk:
                pipe.delete(*self._item_keys(rid))
            pipe.zrem(self._k("open"), *chunk)
            pipe.zrem(self._k("all"), *chunk)
            pipe.srem(self._k("annotated"), *chunk)
            pipe.execute()

    @_reachable
    def item(self, response_id: str) -> QueueItem | None:
        found = self._redis.hgetall(self._k("i", response_id))
        if not found or "body" not in found:
            return None
        return QueueItem.of(
            response_id,
            found["user"],
            found["version"],
            float(found["created_at"]),
            int(found["required"]),
            found["body"],
        )

    @_reachable
    def held(self, annotator: str, now: float) -> tuple[str, float] | None:
        rid = self._redis.get(self._k("h", annotator))
        if rid is None or not self._redis.exists(self._k("i", rid)):
            return None
        expires = self._redis.hget(self._k("l", rid), annotator)
        return (rid, float(expires)) if expires is not None and float(expires) > now else None

    @_reachable
    def candidates(self, annotator: str, now: float, *, newest: bool, limit: int) -> list[Candidate]:
        # Four times as many ids as wanted: some are taken, skipped or annotated by this annotator.
        if newest:
            ids = self._redis.zrevrange(self._k("open"), 0, 4 * limit - 1)
        else:
            ids = self._redis.zrandmember(self._k("open"), 4 * limit) or []
        if not ids:
            return []
        skipped = self._redis.smembers(self._k("s", annotator))
        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(self._k("i", rid), "version", "created_at", "required", "annotated")
            pipe.hexists(self._k("a", rid), annotator)
            pipe.hgetall(self._k("l", rid))
        replies = pipe.execute()
        found: list[Candidate] = []
        for n, rid in enumerate(ids):
            (version, created_at, required, annotated), mine, leases = replies[3 * n : 3 * n + 3]
            if created_at is None or mine or rid in skipped:
                continue
            live = {who for who, expires in leases.items() if float(expires) > now}
            if int(annotated) + len(live - {annotator}) < int(required):
                found.append(Candidate(rid, version or None, float(created_at), int(annotated)))
            if len(found) >= limit:
                break
        return found

    @_reachable
    def assign(self, response_id: str, annotator: str, now: float, lease_s: float) -> bool:
        keys = [*self._item_keys(response_id), self._k("h", annotator), self._k("s", annotator)]
        args: list[Any] = [annotator, repr(now), repr(now + lease_s), response_id, max(1, round(lease_s * 1000))]
        return bool(self._assign(keys=keys, args=args))

    @_reachable
    def annotation(self, response_id: str, annotator: str, now: float) -> Annotation | None:
        return _previous(
            self._check(keys=self._item_keys(response_id), args=[annotator, repr(now)]), response_id, annotator
        )

    @_reachable
    def annotate(self, annotation: Annotation) -> Annotation | None:
        a = annotation
        record = json.dumps({"label": a.label, "event_id": a.event_id, "annotated_at": a.annotated_at})
        reply = self._annotate(
            keys=[*self._item_keys(a.response_id), self._k("h", a.annotator), self._k("open"), self._k("annotated")],
            args=[a.annotator, repr(a.annotated_at), record, a.response_id],
        )
        return _previous(reply, a.response_id, a.annotator)

    @_reachable
    def skip(self, response_id: str, annotator: str, now: float) -> None:
        keys = [self._k("l", response_id), self._k("s", annotator), self._k("h", annotator)]
        if not self._skip(keys=keys, args=[annotator, repr(now), response_id, self._ttl_ms]):
            raise NotAssigned(f"{response_id} is not assigned to {annotator!r}")

    @_reachable
    def annotations(self) -> list[Annotation]:
        ids = sorted(self._redis.smembers(self._k("annotated")))
        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(self._k("a", rid))
        found = []
        for rid, by in zip(ids, pipe.execute()):
            for annotator, record in by.items():
                r = json.loads(record)
                found.append(Annotation(rid, annotator, r["label"], r["event_id"], r["annotated_at"]))
        return found

    @_reachable
    def open_items(self) -> int:
        return self._redis.zcard(self._k("open"))

    @_reachable
    def forget_user(self, user: str) -> int:
        ids = list(self._redis.smembers(self._k("u", user)))
        self._delete(ids)
        self._redis.delete(self._k("u", user))
        return len(ids)

    @_reachable
    def config(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._redis.hgetall(self._k("config")).items()}

    @_reachable
    def set_config(self, values: dict[str, Any]) -> None:
        self._redis.hset(self._k("config"), mapping={key: json.dumps(value) for key, value in values.items()})

    def close(self) -> None:
        self._redis.close()


def _previous(reply: list[str], response_id: str, annotator: str) -> Annotation | None:
    if reply[0] == "gone":
        raise ItemGone(response_id)
    if reply[0] == "not_assigned":
        raise NotAssigned(f"{response_id} is not assigned to {annotator!r}")
    if not reply[1]:
        return None
    r = json.loads(reply[1])
    return Annotation(response_id, annotator, r["label"], r["event_id"], r["annotated_at"])
