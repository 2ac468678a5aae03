"""Hot-swap: follow the registry's active pointer without dropping a request.

The pointer is the truth; it is read every `registry_poll_s` (one cheap query), and at once
when the registry signals a change (`wait_for_change`: Redis pub/sub; a missed signal only
costs one poll period). When it moves, the new version is verified (checksum, then
compatibility with the loaded base model) off the event loop, loaded on the engine thread under
its immutable name, and only then do new requests use it. Requests already running keep the
version they were pinned to; the previous version stays loaded for an instant rollback; older
ones are unloaded once no request holds them. A version that fails verification is marked
rejected with its reason, and the pointer is rolled back by the registry; one whose files
retention deleted meanwhile (registry.retention) is only skipped.

The canary (registry.canary) is followed the same way: every canary step bumps the pointer's
counter, its candidate is verified and loaded like an active version, and only then are the
users in its share routed to it (`route`); when the canary advances, they stay on its previous
candidate until the new one is loaded. A candidate that fails verification is rejected, which
ends its canary. A canary whose candidate is not loaded here routes nobody to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from registry import Canary, Registry, VerificationError, in_canary
from serve.compat import check_adapter
from serve.generation import GenerationEngine
from serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)


class HotSwap:
    def __init__(
        self,
        engine: GenerationEngine,
        registry: Registry,
        metrics: ServeMetrics,
        *,
        base_model: str,
        max_rank: int,
        poll_s: float,
        replica: str,
    ):
        self.engine, self.registry, self.metrics = engine, registry, metrics
        self.base_model, self.max_rank, self.poll_s, self.replica = base_model, max_rank, poll_s, replica
        self.serving: str | None = None  # what new requests get
        self.previous: str | None = None
        self.canary: Canary | None = None
        """The running canary as routed here: set once its candidate is loaded, else None."""
        self._seen: int | None = None
        self._lock = asyncio.Lock()  # the poll loop and the admin API may both call sync()

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # the registry may be away for a moment: keep serving, keep polling
                logger.exception("could not follow the active pointer")
            await asyncio.to_thread(self.registry.wait_for_change, self.poll_s)

    @property
    def ready(self) -> bool:
        """True once the pointer has been read and acted on at least once."""
        return self._seen is not None

    async def sync(self) -> None:
        """Read the pointer once; switch when it moved."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        seq, active = await asyncio.to_thread(self.registry.pointer)
        if seq == self._seen:
            return
        canary = await asyncio.to_thread(self.registry.canary)
        started = time.perf_counter()
        swapped = active != self.serving
        if swapped:
            if active is not None and not await self._load(active):
                self._seen = seq
                return
            self.previous, self.serving = self.serving, active
        if canary is not None and (canary.version == self.serving or not await self._load(canary.version)):
            canary = None  # what everyone gets already, or refused (its rejection ended the canary)
        if (canary and canary.version) != (self.canary and self.canary.version):
            if canary is not None:  # its ratings counted from the first (increase() needs a zero)
                self.metrics.track_version(canary.version)
            logger.info("canary: %s", f"{canary.version} for {canary.share:.0%} of users" if canary else "none")
        self.canary = canary
        keep = {v for v in (self.serving, self.previous, canary.version if canary else None) if v is not None}
        await asyncio.wrap_future(self.engine.retain(keep))
        if swapped:
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(time.perf_counter() - started)
            self.metrics.set_active(active, self.base_model)
            logger.info("now serving %s (previous %s)", active or "the base model", self.previous or "base")
        self._seen = seq

    def route(self, user: str | None) -> str | None:
        """The version a new request of `user` gets: the canary's candidate for the users in its
        share (sticky: a hash of user and the canary's first candidate, so the same users follow
        it as it advances), unless it is paused; the active version for everyone else,
        anonymous requests included."""
        canary = self.canary
        if canary is not None and not canary.paused and user and in_canary(user, canary.cohort, canary.share):
            return canary.version
        return self.serving

    def check(self, version: str) -> list[str]:
        """Reasons this replica cannot serve `version` (empty when it can). Blocking I/O."""
        try:
            self.registry.verify_files(version)
        except VerificationError as exc:
            return [exc.reason]
        return check_adapter(
            self.registry.adapter_path(version),
            base_model=self.base_model,
            allowed_target_modules=set(self.engine.lora_targets),
            max_rank=self.max_rank,
        )

    async def _load(self, version: str) -> bool:
        if version in self.engine.loaded_versions:
            return True
        reasons = await asyncio.to_thread(self.check, version)
        if reasons:
            if await asyncio.to_thread(self._pruned, version):
                logger.info("not loading %s: retention deleted its files since the pointer named it", version)
                return False
            reason = "; ".join(reasons)
            logger.error("refusing adapter %s: %s; staying on %s", version, reason, self.serving or "base")
            self.metrics.swap_failures.labels(reason="verification").inc()
            await asyncio.to_thread(self._refuse, version, reason)
            return False
        path: Path = self.registry.adapter_path(version)
        try:
            seconds = await asyncio.wrap_future(self.engine.load_adapter(version, path))
        except Exception as exc:
            logger.exception("loading adapter %s failed", version)
            self.metrics.swap_failures.labels(reason="load").inc()
            await asyncio.to_thread(self._refuse, version, f"load failed: {exc}")
            return False
        self.metrics.adapter_load_seconds.observe(seconds)
        return True

    def _pruned(self, version: str) -> bool:
        # A prune may land between reading the pointer and loading: missing files are then not
        # a broken version, and rejecting it would write a false reason into the history.
        return self.registry.get(version).pruned_at is not None

    def _refuse(self, version: str, reason: str) -> None:
        # If it is the active version, the registry rolls the pointer back in the same transaction.
        self.registry.reject(version, reason, actor=f"serve:{self.replica}")
