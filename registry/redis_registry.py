"""The Redis registry: metadata, lineage, the active pointer and its history in Redis; adapter
files on a path all replicas share, laid out as the embedded registry lays them out
(registry.store.AdapterFiles) and published by the same protocol (registry.publishing).

URL and key layout: registry.redis_keys.

Rules:
- Only ready and rejected versions are visible; names are allocated and published by the Lua
  scripts of registry.redis_catalog.
- Every operation of registry.transitions (pointer changes, canary steps, rejections,
  erasures, pins and prunes; the canary is a field of the pointer hash) is one WATCH/MULTI/EXEC
  transaction over state, pointer, stack, erasures, pinned and pruned (`RedisTx`): it reads in
  immediate mode, its writes (states, flags, pointer, canary, stack, history, PUBLISH) are queued after MULTI and apply
  together, or not at all, and it runs again if a watched key moved meanwhile. The counter is
  the history's length, so `pointer()`, one HMGET, tells a poller whether it missed anything.
- Pub/sub is a hint and the pointer the truth (registry.redis_changes): a replica that misses a
  message still converges by polling.
- Every Redis error becomes RegistryUnavailable. Socket timeouts are short and a broken
  connection is retried once, at once, so a caller never hangs while Redis is away.
- Durability is Redis's: run it with `appendonly yes` so that a restart loses nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from registry import publishing, store
from registry.base import Registry
from registry.canary import Canary
from registry.errors import RegistryError, RegistryUnavailable
from registry.publishing import VISIBLE
from registry.redis_catalog import RedisCatalog
from registry.redis_changes import ChangeListener
from registry.redis_keys import SCHEMA_VERSION, RedisKeys, parse_url
from registry.versions import HistoryEntry, RuleSetVersion, VersionRecord

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class RedisRegistry(Registry):
    """The Redis Registry backend; safe across processes, hosts and threads."""

    def __init__(
        self, url: str, adapter_root: Path, *, socket_timeout_s: float = 3.0, connect_timeout_s: float = 2.0
    ) -> None:
        client_url, self.prefix, self.where = parse_url(url)
        self.adapter_root = Path(adapter_root)
        self._files = store.AdapterFiles(self.adapter_root)
        self._keys = RedisKeys(self.prefix)
        self._closed = threading.Event()
        self._client = redis.Redis.from_url(
            client_url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            # Once, at once, and only when the connection broke: after a Redis restart the
            # pooled sockets are dead, and a caller should not fail because of that.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._catalog = RedisCatalog(self)
        self._changes = ChangeListener(self._client, self._keys.changes, self.where)
        try:
            self._check_schema()
            publishing.sweep_if_idle(self._files, self._catalog)
        except BaseException:
            self.close()
            raise
        logger.info("registry opened at %s, prefix %r (adapters in %s)", self.where, self.prefix, self.adapter_root)

    # ---- connection plumbing -------------------------------------------------------------

    @contextmanager
    def _redis(self) -> Iterator[redis.Redis]:
        """The client; Redis errors leave as RegistryUnavailable."""
        if self._closed.is_set():
            raise RegistryError("registry is closed")
        try:
            yield self._client
        except redis.RedisError as e:
            raise RegistryUnavailable(f"registry Redis at {self.where}: {e}") from e

    def _transaction(self, operation: Callable[[RedisTx], _T]) -> _T:
        """One operation of registry.transitions in a WATCH/MULTI/EXEC transaction: its reads
        (immediate mode), then MULTI and its queued writes; a watched key that moved meanwhile
        runs it again from the start."""
        k = self._keys

        def run(pipe: Pipeline) -> _T:
            tx = RedisTx(pipe, k)
            result = operation(tx)
            pipe.multi()
            for write in tx.writes:
                write()
            return result

        with self._redis() as r:
            # redis-py types the callable as returning None; with value_from_callable it returns run's value
            watched = (k.state, k.pointer, k.stack, k.erasures, k.pinned, k.pruned)
            result = r.transaction(run, *watched, value_from_callable=True)  # type: ignore[arg-type]
        return cast(_T, result)

    def _check_schema(self) -> None:
        with self._redis() as r:
            pipe = r.pipeline()
            pipe.set(self._keys.schema, SCHEMA_VERSION, nx=True)
            pipe.get(self._keys.schema)
            found = int(pipe.execute()[1])
        if found > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.where} prefix {self.prefix!r} has schema {found}, newer than "
                f"this code's {SCHEMA_VERSION}"
            )
        if found < SCHEMA_VERSION:  # each step only added fields and keys: what is there reads as it is
            with self._redis() as r:
                r.set(self._keys.schema, SCHEMA_VERSION)

    # ---- versions ------------------------------------------------------------------------

    def _records(self, version: str | None) -> list[VersionRecord]:
        k = self._keys
        with self._redis() as r:
            pipe = r.pipeline()  # MULTI/EXEC: one consistent snapshot in one round trip
            for key in (k.state, k.meta, k.rejected, k.flags, k.pinned, k.pruned):
                pipe.hget(key, version) if version is not None else pipe.hgetall(key)
            found = pipe.execute()
        states, metas, reasons, flags, pins, pruned = found if version is None else ({version: v} for v in found)
        visible = sorted((v for v, s in states.items() if s in VISIBLE), key=lambda v: int(v[1:]))
        return [
            VersionRecord(
                version=v,
                state=states[v],
                **json.loads(metas[v]),
                rejected_reason=reasons.get(v),
                flags=json.loads(flags[v]) if flags.get(v) else [],
                pinned=bool(pins.get(v)),
                pruned_at=float(pruned[v]) if pruned.get(v) else None,
            )
            for v in visible
        ]

    # ---- the active pointer -----------------------------------------------------------------

    def pointer(self) -> tuple[int, str | None]:
        with self._redis() as r:
            counter, active = _texts(r.hmget(self._keys.pointer, "counter", "active"))
        return int(counter or 0), active or None

    def canary(self) -> Canary | None:
        with self._redis() as r:
            return Canary.loads(_text(r.hget(self._keys.pointer, "canary")))

    def wait_for_change(self, timeout_s: float) -> None:
        """Returns at a change notification, at timeout_s, or at once after close()."""
        if not self._closed.is_set():
            self._changes.wait(timeout_s)

    def history(self) -> list[HistoryEntry]:
        with self._redis() as r:
            entries = r.lrange(self._keys.history, 0, -1)
        return [HistoryEntry(**json.loads(e)) for e in entries]

    # ---- rule sets: a list of JSON entries; a version is its position, counted from 1 ----

    def _append_rule_set(self, rules_json: str, actor: str, reason: str, at: float) -> RuleSetVersion:
        entry = {"at": at, "actor": actor, "reason": reason, "rules": json.loads(rules_json)}
        with self._redis() as r:
            version = int(r.rpush(self._keys.rule_sets, json.dumps(entry)))
        return RuleSetVersion(version=version, **entry)

    def _rule_sets(self, latest: bool) -> list[RuleSetVersion]:
        with self._redis() as r:
            pipe = r.pipeline()  # MULTI/EXEC: the entries and the length they are counted from agree
            pipe.lrange(self._keys.rule_sets, -1 if latest else 0, -1)
            pipe.llen(self._keys.rule_sets)
            found, length = pipe.execute()
        entries = _texts(found)
        first = int(length) - len(entries) + 1
        return [RuleSetVersion(version=first + i, **json.loads(e or "{}")) for i, e in enumerate(entries)]

    # ---- lifecycle -------------------------------------------------------------------------

    def ping(self) -> None:
        with self._redis() as r:
            r.ping()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._changes.close()
        self._client.close()


class RedisTx:
    """registry.transitions.Tx on a WATCHing pipeline: reads go to Redis at once, writes wait
    in `writes` for MULTI."""

    def __init__(self, pipe: Pipeline, keys: RedisKeys) -> None:
        self.pipe, self.k = pipe, keys
        self.writes: list[Callable[[], object]] = []

    def pointer(self) -> tuple[int, str | None, Canary | None]:
        counter, active, canary = _texts(self.pipe.hmget(self.k.pointer, "counter", "active", "canary"))
        return int(counter or 0), active or None, Canary.loads(canary)

    def stack(self) -> list[str | None]:
        return [v or None for v in _texts(self.pipe.lrange(self.k.stack, 0, -1))]

    def state(self, version: str) -> str | None:
        return _text(self.pipe.hget(self.k.state, version))

    def rejected_reason(self, version: str) -> str | None:
        return _text(self.pipe.hget(self.k.rejected, version))

    def parent(self, version: str) -> str | None:
        meta = _text(self.pipe.hget(self.k.meta, version))
        return json.loads(meta)["parent"] if meta else None

    def flags(self, version: str) -> list[dict[str, Any]]:
        text = _text(self.pipe.hget(self.k.flags, version))
        return json.loads(text) if text else []

    def erasure(self, request_id: str) -> HistoryEntry | None:
        text = _text(self.pipe.hget(self.k.erasures, request_id))
        return HistoryEntry(**json.loads(text)) if text else None

    def pinned(self, version: str) -> bool:
        return bool(self.pipe.hget(self.k.pinned, version))

    def pruned_at(self, version: str) -> float | None:
        at = _text(self.pipe.hget(self.k.pruned, version))
        return float(at) if at else None

    def set_pinned(self, version: str, pinned: bool) -> None:
        pipe, key = self.pipe, self.k.pinned
        self.writes.append(lambda: pipe.hset(key, version, "1") if pinned else pipe.hdel(key, version))

    def set_pruned(self, version: str, at: float) -> None:
        self.writes.append(lambda: self.pipe.hset(self.k.pruned, version, repr(at)))

    def reject(self, version: str, reason: str) -> None:
        self.writes += [
            lambda: self.pipe.hset(self.k.state, version, "rejected"),
            lambda: self.pipe.hset(self.k.rejected, version, reason),
        ]

    def set_flags(self, version: str, flags: list[dict[str, Any]]) -> None:
        self.writes.append(lambda: self.pipe.hset(self.k.flags, version, json.dumps(flags)))

    def set_canary(self, canary: Canary | None) -> None:
        self.writes.append(lambda: self.pipe.hset(self.k.pointer, "canary", canary.dumps() if canary else ""))

    def append(
        self, entry: HistoryEntry, *, active: str | None, canary: Canary | None, stack: list[str | None] | None = None
    ) -> None:
        def write() -> None:
            k, text = self.k, json.dumps(entry.to_json())
            if stack is not None:
                self.pipe.delete(k.stack)
                if stack:
                    self.pipe.rpush(k.stack, *(v or "" for v in stack))
            self.pipe.hset(
                k.pointer,
                mapping={"counter": entry.seq, "active": active or "", "canary": canary.dumps() if canary else ""},
            )
            self.pipe.rpush(k.history, text)
            if entry.action == "erasure" and entry.evidence:  # a repeat of the request returns this entry
                self.pipe.hset(k.erasures, entry.evidence["request_id"], text)
            self.pipe.publish(k.changes, json.dumps({"counter": entry.seq, "active": active}))

        self.writes.append(write)


# The client is made with decode_responses=True: replies are str (None for a missing key), though
# redis-py's types say bytes | str.
def _text(reply: Any) -> str | None:
    return cast("str | None", reply)


def _texts(reply: Any) -> list[str | None]:
    return cast("list[str | None]", reply)
