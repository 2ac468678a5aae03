"""The Redis registry: metadata, lineage, the active pointer and its history in Redis; adapter
files on a path all replicas share, laid out as the embedded registry lays them out
(registry.store.AdapterFiles) and published by the same protocol (registry.publishing).

URL and key layout: registry.redis_keys.

Rules:
- Only ready and rejected versions are visible; names are allocated and published by the Lua
  scripts of registry.redis_catalog.
- Every pointer change (activate, rollback, reject of the active version) and every canary step
  (registry.canary; the canary is a field of the pointer hash) is one WATCH/MULTI/EXEC
  transaction over state, pointer and stack: the stack and canary rules run here on what was
  read, and the writes (pointer, canary, stack, history, PUBLISH) apply together, or not at all
  and are retried if a watched key moved meanwhile. The counter is the history's length, so
  `pointer()`, one HMGET, tells a poller whether it missed anything.
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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from registry import canary as canary_rules
from registry import publishing, store
from registry import rollback as stack_rules
from registry.canary import Canary
from registry.erasure import RedisErasures
from registry.errors import RegistryError, RegistryUnavailable, UnknownVersion, VersionRejected
from registry.publishing import VISIBLE
from registry.redis_canary import RedisCanarySteps
from registry.redis_catalog import RedisCatalog
from registry.redis_changes import ChangeListener
from registry.redis_keys import SCHEMA_VERSION, RedisKeys, parse_url
from registry.versions import BASE, HistoryAction, HistoryEntry, VersionInfo

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

class RedisRegistry(RedisCanarySteps, RedisErasures, publishing.Publishing):
    """The Redis Registry backend; safe across processes, hosts and threads."""

    def __init__(
        self,
        url: str,
        adapter_root: Path,
        *,
        socket_timeout_s: float = 3.0,
        connect_timeout_s: float = 2.0,
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
        logger.info(
            "registry opened at %s, prefix %r (adapters in %s)", self.where, self.prefix,
            self.adapter_root,
        )

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

    def _transact(self, plan: Callable[[Pipeline], _T]) -> _T:
        """Run `plan` in a WATCH/MULTI/EXEC transaction over state, pointer and stack: it reads
        (immediate mode), calls pipe.multi(), queues its writes; a watched key that moved
        meanwhile reruns it from the start."""
        k = self._keys
        with self._redis() as r:
            return r.transaction(plan, k.state, k.pointer, k.stack, value_from_callable=True)

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

    def get(self, version: str) -> VersionInfo:
        k = self._keys
        with self._redis() as r:
            pipe = r.pipeline()  # MULTI/EXEC: one consistent snapshot in one round trip
            pipe.hget(k.state, version)
            pipe.hget(k.meta, version)
            pipe.hget(k.rejected, version)
            state, meta, reason = pipe.execute()
        if state not in VISIBLE:
            raise UnknownVersion(version)
        return self._with_flags([self._info(version, state, meta, reason)])[0]

    def list_versions(self) -> list[VersionInfo]:
        k = self._keys
        with self._redis() as r:
            pipe = r.pipeline()
            pipe.hgetall(k.state)
            pipe.hgetall(k.meta)
            pipe.hgetall(k.rejected)
            states, metas, reasons = pipe.execute()
        visible = sorted((v for v, s in states.items() if s in VISIBLE), key=lambda v: int(v[1:]))
        return self._with_flags([self._info(v, states[v], metas[v], reasons.get(v)) for v in visible])

    def adapter_path(self, version: str) -> Path:
        return self.get(version).path

    def _info(self, version: str, state: str, meta: str, reason: str | None) -> VersionInfo:
        m = json.loads(meta)
        return VersionInfo(
            version=version,
            status=state,  # type: ignore[arg-type]
            parent=m["parent"],
            created_at=m["created_at"],
            base_model=m["base_model"],
            sha256=m["sha256"],
            path=self._files.path(version),
            metrics=m["metrics"],
            lineage=m["lineage"],
            rejected_reason=reason,
        )

    def reject(self, version: str, reason: str, *, actor: str = "registry") -> None:
        """Idempotent (the first reason stays). Rejecting the active version rolls back from it
        in the same transaction, so that every replica that finds it broken agrees on one step."""
        k = self._keys

        def plan(pipe: Pipeline) -> bool:
            state = pipe.hget(k.state, version)
            if state not in VISIBLE:
                raise UnknownVersion(version)
            if state == "rejected":
                return False
            counter, active, running = self._pointer_in(pipe)
            if active == version:
                target, stack = stack_rules.pop_for_rollback(
                    self._stack_in(pipe), active, lambda v: self._unservable_in(pipe, v)
                )
            pipe.multi()
            pipe.hset(k.state, version, "rejected")
            pipe.hset(k.rejected, version, reason)
            why = f"{version} rejected: {reason}"
            if active == version:
                self._queue_move(pipe, counter, active, running, "rollback", target, stack, actor,
                                 why)
            elif running is not None and running.version == version:  # never the active one
                self._queue_note(pipe, counter, active, None, "canary_rollback", version, actor,
                                 why)
            return True

        if self._transact(plan):
            logger.warning("rejected %s: %s", version, reason)

    def verify_files(self, version: str) -> None:
        with self._redis() as r:
            pipe = r.pipeline()
            pipe.hget(self._keys.state, version)
            pipe.hget(self._keys.meta, version)
            state, meta = pipe.execute()
        if state not in VISIBLE:
            raise UnknownVersion(version)
        self._files.verify(version, json.loads(meta)["files"])

    # ---- the active pointer -----------------------------------------------------------------

    def active(self) -> str | None:
        return self.pointer()[1]

    def pointer(self) -> tuple[int, str | None]:
        with self._redis() as r:
            counter, active = r.hmget(self._keys.pointer, "counter", "active")
        return int(counter or 0), active or None

    def canary(self) -> Canary | None:
        with self._redis() as r:
            return Canary.loads(r.hget(self._keys.pointer, "canary"))

    def wait_for_change(self, timeout_s: float) -> None:
        """Returns at a change notification, at timeout_s, or at once after close()."""
        if not self._closed.is_set():
            self._changes.wait(timeout_s)

    def activate(self, version: str | None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Activating the version already active still records an entry (an audit of the
        request) and bumps the counter, but pushes nothing on the rollback stack."""
        version = None if version == BASE else version

        def plan(pipe: Pipeline) -> tuple[HistoryEntry, str | None]:
            self._check_servable_in(pipe, version)
            counter, previous, running = self._pointer_in(pipe)
            stack = stack_rules.push_on_activate(self._stack_in(pipe), previous, version)
            pipe.multi()
            entry = self._queue_move(pipe, counter, previous, running, "activate", version, stack,
                                     actor, reason)
            return entry, previous

        entry, previous = self._transact(plan)
        logger.info("%s activated %s (was %s)", actor, version or "base", previous or "base")
        return entry

    def rollback(self, to: str | None = None, *, actor: str, reason: str = "") -> HistoryEntry:
        """Without `to`, the stack rule (registry.rollback); `to=BASE` rolls back to the base."""

        def plan(pipe: Pipeline) -> HistoryEntry:
            counter, previous, running = self._pointer_in(pipe)
            target, stack = stack_rules.plan_rollback(
                self._stack_in(pipe), previous, to,
                is_rejected=lambda v: self._unservable_in(pipe, v),
                check_servable=lambda v: self._check_servable_in(pipe, v))
            pipe.multi()
            return self._queue_move(pipe, counter, previous, running, "rollback", target, stack,
                                    actor, reason)

        entry = self._transact(plan)
        logger.info(
            "%s rolled back from %s to %s", actor, entry.previous or "base", entry.version or "base"
        )
        return entry

    def history(self) -> list[HistoryEntry]:
        with self._redis() as r:
            entries = r.lrange(self._keys.history, 0, -1)
        return [HistoryEntry(**json.loads(e)) for e in entries]

    # Helpers run inside _transact: reads before pipe.multi(), _queue_move after it.

    def _pointer_in(self, pipe: Pipeline) -> tuple[int, str | None, Canary | None]:
        counter, active, running = pipe.hmget(self._keys.pointer, "counter", "active", "canary")
        return int(counter or 0), active or None, Canary.loads(running)

    def _stack_in(self, pipe: Pipeline) -> list[str | None]:
        return [v or None for v in pipe.lrange(self._keys.stack, 0, -1)]

    def _unservable_in(self, pipe: Pipeline, version: str) -> bool:
        return pipe.hget(self._keys.state, version) != "ready"

    def _check_servable_in(self, pipe: Pipeline, version: str | None) -> None:
        if version is None:
            return
        state = pipe.hget(self._keys.state, version)
        if state not in VISIBLE:
            raise UnknownVersion(version)
        if state == "rejected":
            raise VersionRejected(version, pipe.hget(self._keys.rejected, version))

    def _queue_move(
        self,
        pipe: Pipeline,
        counter: int,
        previous: str | None,
        running: Canary | None,
        action: HistoryAction,
        version: str | None,
        stack: list[str | None],
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """Queue the pointer swap (the canary follows: registry.canary.after_move), the new stack,
        the history entry and the notification."""
        k = self._keys
        running = canary_rules.after_move(running, version, now=time.time())
        pipe.delete(k.stack)
        if stack:
            pipe.rpush(k.stack, *(v or "" for v in stack))
        return self._queue_entry(pipe, counter, action, version, previous, version, running, actor,
                                 reason, evidence)

    def _queue_note(
        self,
        pipe: Pipeline,
        counter: int,
        active: str | None,
        running: Canary | None,
        action: HistoryAction,
        candidate: str,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """Queue a canary step that leaves the pointer where it is."""
        return self._queue_entry(pipe, counter, action, candidate, active, active, running, actor,
                                 reason, evidence)

    def _queue_entry(
        self, pipe: Pipeline, counter: int, action: HistoryAction, version: str | None,
        previous: str | None, active: str | None, running: Canary | None, actor: str, reason: str,
        evidence: dict[str, Any] | None,
    ) -> HistoryEntry:
        text = canary_rules.evidence_json(evidence)
        entry = HistoryEntry(counter + 1, time.time(), action, version, previous, actor, reason,
                             text and json.loads(text))
        k = self._keys
        pipe.hset(k.pointer, mapping={"counter": entry.seq, "active": active or "",
                                      "canary": running.dumps() if running else ""})
        pipe.rpush(k.history, json.dumps(entry.to_json()))
        pipe.publish(k.changes, json.dumps({"counter": entry.seq, "active": active}))
        return entry

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

    def __enter__(self) -> RedisRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
