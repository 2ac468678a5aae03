"""Log-ratios of served answers under the version that serves: log π(y|x) − log π_ref(y|x).

What the ``uncertain`` annotation strategy orders by (serve.annotation_strategies). Computed on
the engine thread between decoding steps (``Engine.call``), on the token ids exactly as served,
a few answers at a time, so it costs chat one short pause. Cached per (answer, version): a
version's adapter never changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import torch

from serve.engine import Engine

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]
_CACHE_SIZE = 10_000


class Scorer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def log_ratios(self, version: str | None, answers: dict[str, Pair]) -> dict[str, float]:
        """Per answer id; every ratio is 0 under the base model (π is π_ref)."""
        if version is None:
            return dict.fromkeys(answers, 0.0)
        found = {rid: self._cache[(rid, version)] for rid in answers if (rid, version) in self._cache}
        missing = [rid for rid in answers if rid not in found]
        if missing:
            future = self.engine.call(lambda: _log_ratios(self.engine, version, [answers[r] for r in missing]))
            ratios = await asyncio.wrap_future(future)
            if ratios is None:  # the version is no longer loaded here
                return found
            for rid, ratio in zip(missing, ratios):
                found[rid] = self._cache[(rid, version)] = ratio
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return found


@torch.inference_mode()
def _log_ratios(engine: Engine, version: str, pairs: list[Pair]) -> list[float] | None:
    if version not in engine.loaded_versions:
        return None
    loaded, model = engine.loaded, engine.model
    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), engine.pad_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(pairs):
        ids[i, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        mask[i, : len(prompt) + len(completion)] = 1
        answer[i, len(prompt) : len(prompt) + len(completion)] = True
    ids, mask, answer = ids.to(loaded.device), mask.to(loaded.device), answer.to(loaded.device)
    model.set_adapter(version)
    policy = _logps(model(input_ids=ids, attention_mask=mask).logits, ids, answer)
    with model.disable_adapter():
        reference = _logps(model(input_ids=ids, attention_mask=mask).logits, ids, answer)
    return (policy - reference).tolist()


def _logps(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Σ log p of the answer tokens; the logits at t predict the token at t + 1."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * answer[:, 1:]).sum(-1)
