"""vLLM as the serving engine on NVIDIA GPUs (`KTO_ENGINE=vllm`; `auto` picks it where vLLM is
installed and a GPU is present): paged attention, CUDA graphs and per-request LoRA, behind the
same interface as the built-in engine (serve.generation), so hot-swap, the canary's routing,
the events and the API stay as they are.

- Each adapter version is added to vLLM once, as a LoRARequest named by its immutable version
  and an integer id never reused (vLLM caches adapters by that id: a reused id could serve an
  older version's weights). Requests carry the LoRARequest of the version they were pinned to.
- Unloading follows serve.pins, as in the built-in engine: `remove_lora` only once no running
  request holds the version and hot-swap no longer keeps it.
- vLLM stops on the same end-of-answer ids (`stop_token_ids`) and stop strings; its output
  token ids (the stop token included) and finish reasons go into the response events unchanged.
- Log-ratios for the annotation queue come from vLLM's prompt log-probs of prompt + answer,
  with the version's adapter and without.

vLLM runs its own asyncio loop on a thread of its own here, as the built-in engine runs its
scheduler thread: `submit` and the rest are called from any thread.

Installed with `uv sync --extra vllm --no-dev` (vLLM pins its own torch; pyproject.toml keeps that
resolution apart from the default one). The parts below the line are tested on CPU without vLLM
(tests/serve/test_vllm_engine.py); the engine itself only where vLLM and a GPU are
(tests/serve/test_engine_contract.py runs against it there).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from foundation.models import LoadedModel, eos_token_ids, lora_target_names
from serve.generation import Delta, Failed, Finished, GenerationRequest, Handle, Output, Pair
from serve.pins import VersionPins

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    """vLLM is installed and an NVIDIA GPU is visible: what `KTO_ENGINE=auto` asks."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# ---- pure parts: request mapping, output assembly, adapter ids -------------------------------


def sampling_kwargs(request: GenerationRequest, end_ids: set[int]) -> dict[str, Any]:
    """vLLM SamplingParams' arguments for `request`, sampling as the built-in engine does: stop on
    every end-of-answer id and stop string, the stop string left out of the text, special tokens
    left out of the text (the ids keep them), one answer."""
    return {
        "n": 1,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,  # 0: greedy, as in serve.sampling
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop),
        "stop_token_ids": sorted(end_ids),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }


_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


@dataclass
class Assembler:
    """Turns one request's vLLM outputs (delta text and token ids, finish reason) into the
    engine interface's Deltas and one Finished or Failed."""

    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    def push(self, text: str, token_ids: list[int], finish_reason: str | None) -> list[Output]:
        self.text += text
        self.token_ids += token_ids
        out: list[Output] = [Delta(text)] if text else []
        if finish_reason is None:
            return out
        if finish_reason not in _FINISH:
            return [*out, Failed(f"generation failed: vLLM finished with {finish_reason!r}")]
        return [*out, Finished(_FINISH[finish_reason], self.text, list(self.token_ids), self.prompt_tokens)]


class LoraIds:
    """Integer ids for vLLM's LoRARequests: one per version, from 1, never reused."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._next = itertools.count(1)

    def assign(self, version: str) -> int:
        if version not in self._ids:
            self._ids[version] = next(self._next)
        return self._ids[version]

    def get(self, version: str) -> int:
        return self._ids[version]

    def forget(self, version: str) -> int:
        return self._ids.pop(version)


def answer_logprob(prompt_logprobs: list[dict[int, Any] | None], ids: list[int], prompt_len: int) -> float:
    """Σ log p of the answer tokens, from vLLM's prompt log-probs of prompt + answer (entry t:
    the log-probs at position t, the token's own among them; None at t = 0)."""
    total = 0.0
    for t in range(prompt_len, len(ids)):
        entry = prompt_logprobs[t]
        if entry is None:
            raise ValueError(f"no prompt log-prob at position {t}: an answer needs a prompt")
        logprob = entry[ids[t]]
        total += float(logprob.logprob if hasattr(logprob, "logprob") else logprob)
    return total


# ---- the engine (needs vLLM and a GPU) -------------------------------------------------------


class VllmEngine:
    """serve.generation.GenerationEngine on vLLM's AsyncLLM."""

    def __init__(self, model: str, loaded: LoadedModel, *, max_batch: int, max_lora_rank: int, max_loras: int = 4):
        self.loaded = loaded  # the tokenizer and the model's shape (no weights: vLLM holds them)
        self.lora_targets = frozenset(lora_target_names(loaded.model))
        self.on_step: Callable[[int, int], None] | None = None
        self._model, self._max_batch, self._max_rank, self._max_loras = model, max_batch, max_lora_rank, max_loras
        self._end_ids = eos_token_ids(loaded)
        self._pins, self._ids = VersionPins(), LoraIds()
        self._paths: dict[str, str] = {}
        self._running = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm", daemon=True)
        self._llm: Any = None

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self._model,
            enable_lora=True,
            max_lora_rank=self._max_rank,
            max_loras=self._max_loras,  # adapters in one batch; more stay loaded on the CPU side
            max_num_seqs=self._max_batch,
        )
        self._thread.start()
        self._llm = self._run(self._create(AsyncLLM, args)).result()

    @staticmethod
    async def _create(cls, args):
        return cls.from_engine_args(args)

    def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._llm is not None and not self._llm.errored

    @property
    def loaded_versions(self) -> frozenset[str]:
        return self._pins.loaded

    @property
    def waiting(self) -> int:
        return 0  # vLLM's scheduler queues internally; it reports its own queue in its metrics

    @property
    def running(self) -> int:
        return self._running

    def submit(self, request: GenerationRequest, emit: Callable[[Output], object]) -> Handle:
        self._pins.pin(request.adapter)
        handle = Handle()
        self._run(self._generate(request, emit, handle))
        return handle

    def load_adapter(self, version: str, path) -> Future:
        return self._run(self._load(version, str(path)))

    def retain(self, versions: set[str]) -> Future:
        self._pins.keep(versions)
        return self._run(self._collect())

    def log_ratios(self, version: str, pairs: list[Pair]) -> Future:
        return self._run(self._log_ratios(version, pairs))

    # ---- on vLLM's loop ----------------------------------------------------------------------

    def _run(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _lora(self, version: str | None):
        from vllm.lora.request import LoRARequest

        if version is None:
            return None
        return LoRARequest(version, self._ids.get(version), self._paths[version])

    async def _generate(self, request: GenerationRequest, emit, handle: Handle) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**sampling_kwargs(request, self._end_ids), output_kind=RequestOutputKind.DELTA)
        assembler = Assembler(len(request.prompt_ids))
        request_id = uuid.uuid4().hex
        self._running += 1
        try:
            stream = self._llm.generate(
                {"prompt_token_ids": request.prompt_ids}, params, request_id, lora_request=self._lora(request.adapter)
            )
            async for result in stream:
                if handle.cancelled:
                    await self._llm.abort(request_id)
                    emit(Finished("cancelled", assembler.text, list(assembler.token_ids), len(request.prompt_ids)))
                    return
                answer = result.outputs[0]
                for out in assembler.push(answer.text, list(answer.token_ids), answer.finish_reason):
                    emit(out)
        except Exception as exc:  # a failed request fails alone, as in the built-in engine
            logger.exception("vLLM generation failed")
            emit(Failed(f"generation failed: {exc}"))
        finally:
            self._running -= 1
            self._pins.release(request.adapter)
            await self._collect()

    async def _load(self, version: str, path: str) -> float:
        started = time.perf_counter()
        if version in self._pins.loaded:
            return 0.0
        self._paths[version] = path
        self._ids.assign(version)
        if not await self._llm.add_lora(self._lora(version)):
            raise RuntimeError(f"vLLM refused adapter {version} at {path}")
        self._pins.add(version)
        return time.perf_counter() - started

    async def _collect(self) -> None:
        gone = self._pins.collect(lambda version: None)  # remove_lora is async: after the lock
        for version in gone:
            await self._llm.remove_lora(self._ids.forget(version))
            self._paths.pop(version, None)
            logger.info("unloaded adapter %s", version)

    async def _log_ratios(self, version: str, pairs: list[Pair]) -> list[float] | None:
        if version not in self._pins.loaded:
            return None
        return [await self._ratio(version, prompt, answer) for prompt, answer in pairs]

    async def _ratio(self, version: str, prompt: list[int], answer: list[int]) -> float:
        from vllm import SamplingParams

        ids = prompt + answer
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        totals = []
        for lora in (self._lora(version), None):
            stream = self._llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex, lora_request=lora)
            last = [out async for out in stream][-1]
            totals.append(answer_logprob(last.prompt_logprobs, ids, len(prompt)))
        return totals[0] - totals[1]
