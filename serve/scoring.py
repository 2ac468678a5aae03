"""Log-ratios of served answers under the version that serves: log π(y|x) − log π_ref(y|x).

What the ``uncertain`` annotation strategy orders by (serve.annotation_strategies). Computed on
the engine between decoding steps (``GenerationEngine.log_ratios``), on the token ids exactly as served,
a few answers at a time, so it costs chat one short pause. Cached per (answer, version): a
version's adapter never changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from serve.generation import GenerationEngine, Pair

logger = logging.getLogger(__name__)

_CACHE_SIZE = 10_000


class Scorer:
    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def log_ratios(self, version: str | None, answers: dict[str, Pair]) -> dict[str, float]:
        """Per answer id; every ratio is 0 under the base model (π is π_ref)."""
        if version is None:
            return dict.fromkeys(answers, 0.0)
        found = {rid: self._cache[(rid, version)] for rid in answers if (rid, version) in self._cache}
        missing = [rid for rid in answers if rid not in found]
        if missing:
            ratios = await asyncio.wrap_future(self.engine.log_ratios(version, [answers[r] for r in missing]))
            if ratios is None:  # the version is no longer loaded here
                return found
            for rid, ratio in zip(missing, ratios):
                found[rid] = self._cache[(rid, version)] = ratio
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return found
