"""The Redis registry's side of registry.publishing, through two Lua scripts: RESERVE allocates
a name and marks it pending in one step; FINISH moves a pending name (and only a pending one) to
its final state, so a publish swept as abandoned can never be revived."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from registry import publishing, store
from registry.errors import RegistryError

if TYPE_CHECKING:
    from registry.redis_registry import RedisRegistry

# KEYS: next_version, state. Returns the new name.
_RESERVE = """
local version = string.format('v%04d', redis.call('INCR', KEYS[1]))
redis.call('HSET', KEYS[2], version, 'pending')
return version
"""
# KEYS: state, meta, rejected. ARGV: version, new state, meta JSON or '', reason or ''.
_FINISH = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'pending' then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class RedisCatalog:
    """The Redis side of registry.publishing, through the RESERVE and FINISH scripts."""

    def __init__(self, registry: RedisRegistry) -> None:
        self._registry = registry
        self._keys = registry._keys
        self._reserve_script = registry._client.register_script(_RESERVE)
        self._finish_script = registry._client.register_script(_FINISH)

    def reserve(self) -> str:
        with self._registry._redis():
            return self._reserve_script(keys=[self._keys.next_version, self._keys.state])

    def commit(self, version: str, new: publishing.NewVersion, files: dict[str, str]) -> None:
        meta = {
            "parent": new.parent,
            "created_at": time.time(),
            "base_model": new.base_model,
            "sha256": files[store.WEIGHTS_FILE],
            "files": files,
            "metrics": json.loads(new.metrics_json),
            "lineage": json.loads(new.lineage_json),
        }
        if not self._finish(version, new.status, json.dumps(meta), new.rejected_reason or ""):
            raise RegistryError(f"{version} is no longer pending; its publish cannot finish")

    def abandon(self, version: str) -> bool:
        return self._finish(version, "abandoned", "", "")

    def pending(self) -> list[str]:
        with self._registry._redis() as r:
            states: dict[str, str] = r.hgetall(self._keys.state)  # type: ignore[assignment]  # decode_responses
        return [version for version, state in states.items() if state == "pending"]

    def _finish(self, version: str, state: str, meta: str, reason: str) -> bool:
        k = self._keys
        with self._registry._redis():
            return bool(self._finish_script(keys=[k.state, k.meta, k.rejected], args=[version, state, meta, reason]))
