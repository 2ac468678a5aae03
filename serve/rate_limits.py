"""Rate limits per user and per client address, with the `limits` library's moving window.

Scopes: `chat`, `feedback`, `admin` (each per user, or per admin credential, and per address)
and `auth_failures` (per address: past it, no credential from there is even checked, so keys
and tokens cannot be guessed). The windows are `KTO_RATE_LIMIT_*` (serve.settings).

Counters live in Redis when the registry does (every replica counts against one limit) and in
this process's memory on the embedded default. An anonymous caller has only its address limit;
a trusted proxy's own address has none (it speaks for many clients, each of whom is limited).

If Redis cannot be reached, requests pass uncounted (logged, and counted in
`kto_rate_limit_errors_total`): a limiter outage must not become a chat outage, and chat needs
no Redis otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from foundation import urls
from foundation.urls import redis_url
from serve.auth import Caller
from serve.metrics import ServeMetrics
from serve.settings import ServeSettings

logger = logging.getLogger(__name__)

SCOPES = ("chat", "feedback", "admin")
KEY_PREFIX = "kto:limits:"


@dataclass(frozen=True)
class Exceeded:
    """A limit that refused the request: which, and when to try again."""

    scope: str
    by: str
    """"user" or "address"."""
    limit: str
    retry_after_s: int


class RateLimits:
    def __init__(self, settings: ServeSettings, metrics: ServeMetrics):
        self._metrics = metrics
        self._per: dict[tuple[str, str], list[RateLimitItem]] = {}
        for scope in SCOPES:
            self._per[scope, "user"] = _parse(getattr(settings, f"rate_limit_{scope}"))
            self._per[scope, "address"] = _parse(getattr(settings, f"rate_limit_{scope}_address"))
        self._per["auth_failures", "address"] = _parse(settings.rate_limit_auth_failures)
        self.storage, self._pool = _storage(settings.resolved_rate_limit_url())
        self._limiter = MovingWindowRateLimiter(self.storage)
        self._last_error_log = float("-inf")

    async def hit(self, scope: str, caller: Caller) -> Exceeded | None:
        """Count one request of `caller` in `scope`; the first limit it exceeds, if any (then the
        request is not counted against the others)."""
        keys = []
        if caller.user is not None or caller.role == "admin":
            keys.append(("user", caller.user or caller.name))
        if not caller.proxy:
            keys.append(("address", caller.address))
        for by, key in keys:
            for item in self._per.get((scope, by), ()):
                exceeded = await self._hit(scope, by, item, key)
                if exceeded:
                    return exceeded
        return None

    async def failures_exceeded(self, address: str) -> Exceeded | None:
        """Whether `address` used up its failed authentications (counts nothing)."""
        for item in self._per["auth_failures", "address"]:
            try:
                if not await self._limiter.test(item, "auth_failures", address):
                    return await self._exceeded("auth_failures", "address", item, ("auth_failures", address))
            except StorageError as exc:
                self._storage_failed(exc)
        return None

    async def failed(self, address: str) -> None:
        """Count a failed authentication from `address`."""
        for item in self._per["auth_failures", "address"]:
            try:
                await self._limiter.hit(item, "auth_failures", address)
            except StorageError as exc:
                self._storage_failed(exc)

    async def _hit(self, scope: str, by: str, item: RateLimitItem, key: str) -> Exceeded | None:
        try:
            if await self._limiter.hit(item, scope, by, key):
                return None
            return await self._exceeded(scope, by, item, (scope, by, key))
        except StorageError as exc:
            self._storage_failed(exc)
            return None

    async def _exceeded(self, scope: str, by: str, item: RateLimitItem, ids: tuple[str, ...]) -> Exceeded:
        stats = await self._limiter.get_window_stats(item, *ids)
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        self._metrics.rate_limited.labels(scope=scope, by=by).inc()
        return Exceeded(scope, by, str(item), retry)

    def _storage_failed(self, exc: Exception) -> None:
        self._metrics.rate_limit_errors.inc()
        now = time.monotonic()
        if now - self._last_error_log > 10:  # once per 10 s, not once per request
            self._last_error_log = now
            logger.warning("rate limits not applied: their storage failed (%s)", exc)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


def _parse(text: str) -> list[RateLimitItem]:
    return parse_many(text) if text else []


def _storage(url: str) -> tuple[Storage, Any]:
    """The counters' storage, and the Redis connection pool to close (ours, so that we can)."""
    if url == "memory://":
        return MemoryStorage(wrap_exceptions=True), None
    urls.backend_of(url, allowed=("redis",), what="rate limit storage")
    from redis.asyncio import ConnectionPool

    client_url, prefix, _ = redis_url(url, KEY_PREFIX)
    # Short timeouts: a request waits on its limit check, and an unreachable Redis lets it pass.
    pool = ConnectionPool.from_url(client_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    options: dict[str, Any] = {"connection_pool": pool}  # documented by limits, missing from its type hints
    storage = RedisStorage(
        "async+" + client_url, wrap_exceptions=True, implementation="redispy", key_prefix=prefix, **options
    )
    return storage, pool
