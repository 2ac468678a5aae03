"""The Redis key store: API key hashes shared by every replica (see serve.credentials).

Layout, under the prefix (default `kto:keys:`):
- `<prefix>hash:<sha256>`: the key's record as JSON; what a request's lookup reads (one GET).
- `<prefix>user:<user>`: a hash from key id to its sha256, for listing and revoking.
Both change in one MULTI/EXEC, so a key is never findable without being listed, or the reverse.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from foundation.urls import redis_url
from serve.credentials import ApiKey, KeysUnavailable, UnknownKey

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "kto:keys:"


class RedisKeyStore:
    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        import redis

        client_url, self.prefix, self._where = redis_url(url, DEFAULT_KEY_PREFIX)
        self._redis: Any = redis.Redis.from_url(
            client_url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        logger.info("API keys in Redis on %s (prefix %r)", self._where, self.prefix)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise KeysUnavailable(f"the key store at {self._where}: {exc}") from exc

    def _by_hash(self, key_hash: str) -> str:
        return f"{self.prefix}hash:{key_hash}"

    def _of_user(self, user: str) -> str:
        return f"{self.prefix}user:{user}"

    def add(self, key: ApiKey, key_hash: str) -> None:
        def write() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._by_hash(key_hash), json.dumps(key.to_json()))
                pipe.hset(self._of_user(key.user), key.id, key_hash)
                pipe.execute()

        self._call(write)

    def find(self, key_hash: str) -> ApiKey | None:
        raw = self._call(self._redis.get, self._by_hash(key_hash))
        return ApiKey(**json.loads(raw)) if raw else None

    def list(self, user: str) -> list[ApiKey]:
        hashes = self._call(self._redis.hvals, self._of_user(user))
        raws = self._call(self._redis.mget, [self._by_hash(h) for h in hashes]) if hashes else []
        keys = [ApiKey(**json.loads(raw)) for raw in raws if raw]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    def revoke(self, user: str, key_id: str) -> ApiKey:
        key_hash = self._call(self._redis.hget, self._of_user(user), key_id)
        raw = key_hash and self._call(self._redis.get, self._by_hash(key_hash))
        if not key_hash:
            raise UnknownKey(key_id)

        def delete() -> int:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._by_hash(key_hash))
                pipe.hdel(self._of_user(user), key_id)
                return pipe.execute()[1]

        if not self._call(delete):  # revoked by someone else in between
            raise UnknownKey(key_id)
        if raw:
            return ApiKey(**json.loads(raw))
        return ApiKey(key_id, user, "user", "", 0.0, "")

    def forget_user(self, user: str) -> int:
        hashes = self._call(self._redis.hvals, self._of_user(user))
        self._call(self._redis.delete, self._of_user(user), *(self._by_hash(h) for h in hashes))
        return len(hashes)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()
