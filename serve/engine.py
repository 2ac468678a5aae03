"""The generation engine: one scheduler thread steps every active sequence together.

Requests are admitted between steps (continuous batching): newcomers are prefilled as one
batch and merged into the running KV cache, then every row advances one token per step, so
streaming falls out naturally. Each sequence is pinned to the adapter version it was
submitted with; when rows use different versions the step passes PEFT `adapter_names`, and
when they share one the plain (faster) path runs.

All model access — forward passes, loading and deleting adapters — happens on the engine
thread, so a hot-swap never races a forward pass. Other threads talk to it through
`submit()`, `load_adapter()`, `retain()` and `log_ratios()`: the interface serve.generation
names, which the vLLM engine (serve.vllm_engine) implements too.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from foundation.models import LoadedModel, eos_token_ids, lora_target_names
from serve.batch import RunningBatch, left_pad
from serve.generation import Delta, Failed, Finished, GenerationRequest, Handle, Output, Pair
from serve.pins import VersionPins
from serve.sampling import sample_next
from serve.text import TextTracker

logger = logging.getLogger(__name__)

_PEFT_NO_ADAPTER = "__base__"  # PEFT's reserved name for "no adapter" in a mixed batch (the base model is None here)


@dataclass
class _Sequence:
    request: GenerationRequest
    emit: Callable[[Output], object]
    handle: Handle
    text: TextTracker
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    """The built-in engine (serve.generation.GenerationEngine)."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 16):
        self.loaded = loaded
        # Becomes a PeftModel when the first adapter arrives; the two share no type that has
        # both the plain forward and the adapter calls.
        self.model: Any = loaded.model
        self.max_batch = max_batch
        self.eos_ids = eos_token_ids(loaded)
        self.pad_id = loaded.tokenizer.pad_token_id
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._ops: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._running: list[_Sequence] = []
        self._batch: RunningBatch | None = None
        self._pins = VersionPins()
        # transformers 5.2x renamed past_key_values to cache; the vllm extra resolves an older one.
        forward = inspect.signature(loaded.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.lora_targets = frozenset(lora_target_names(loaded.model))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = itertools.count()
        self.on_step: Callable[[int, int], None] | None = None  # (running, waiting) for metrics

    # ---- API for other threads -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def loaded_versions(self) -> frozenset[str]:
        return self._pins.loaded

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: GenerationRequest, emit: Callable[[Output], object]) -> Handle:
        """Queue a request; `emit` is called from the engine thread with each output."""
        self._pins.pin(request.adapter)  # from now on its version cannot be unloaded under it
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(request.seed)
        handle = Handle()
        text = TextTracker(self.loaded.tokenizer, request.stop)
        self._waiting.put(_Sequence(request, emit, handle, text, generator))
        self._wake.set()
        return handle

    def load_adapter(self, version: str, path) -> Future:
        """Load a PEFT adapter under its immutable version name, on the engine thread.

        A loaded version is retained until the next `retain()` call leaves it out."""
        return self._call(lambda: self._load(version, path))

    def retain(self, versions: set[str]) -> Future:
        """Keep these versions loaded; others are unloaded once no request holds them."""
        return self._call(lambda: self._set_keep(versions))

    def log_ratios(self, version: str, pairs: list[Pair]) -> Future:
        """Computed on the engine thread between decoding steps: chat pauses for one short pass."""
        return self._call(lambda: self._log_ratios(version, pairs))

    # ---- engine thread ---------------------------------------------------------------------

    def _call(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self._ops.put((fn, future))
        self._wake.set()
        return future

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def step(self) -> bool:
        """One scheduling step on the calling thread: pending operations, then a prefill of
        waiting requests or one decoding step; False when there was nothing to generate.
        The engine thread calls it in a loop; a profiler may call it on a stopped engine."""
        self._run_ops()
        if not self._running and self._waiting.empty():
            return False
        try:
            with torch.inference_mode():
                if not self._admit():
                    self._decode()
        except Exception as exc:  # a failed step fails its requests, never the server
            logger.exception("generation step failed")
            for seq in self._running:
                self._finish(seq, Failed(f"generation failed: {exc}"))
            self._running, self._batch = [], None
        if self.on_step is not None:
            self.on_step(len(self._running), self._waiting.qsize())
        return True

    def _run_ops(self) -> None:
        while True:
            try:
                fn, future = self._ops.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up (e.g. shutdown cancelled a pending load)
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _admit(self) -> bool:
        """Prefill waiting requests into free slots; True when it ran a forward pass."""
        fresh: list[_Sequence] = []
        while len(self._running) + len(fresh) < self.max_batch:
            try:
                seq = self._waiting.get_nowait()
            except queue.Empty:
                break
            if seq.handle.cancelled:
                self._release(seq)
                continue
            fresh.append(seq)
        if not fresh:
            return False
        ids, mask = left_pad([s.request.prompt_ids for s in fresh], self.pad_id, self.loaded.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        batch = RunningBatch(self._new_cache(), mask)
        try:
            logits = self._forward([s.request.adapter for s in fresh], ids, mask, positions, batch.cache)
        except Exception as exc:  # fails the newcomers only; the running batch is untouched
            logger.exception("prefill failed")
            for seq in fresh:
                self._finish(seq, Failed(f"generation failed: {exc}"))
            return True
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self._running.extend(fresh)
        self._advance(fresh, logits[:, -1, :])
        return True

    def _decode(self) -> None:
        batch = self._batch
        if batch is None:  # every waiting request was cancelled before its prefill: nothing runs
            return
        last = torch.tensor([[s.tokens[-1]] for s in self._running], device=self.loaded.device)
        positions = batch.positions()
        mask = batch.extend()
        logits = self._forward([s.request.adapter for s in self._running], last, mask, positions, batch.cache)
        self._advance(self._running, logits[:, -1, :])

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample a token for each of `seqs` (the last rows of the batch), emit, retire the done."""
        tokens = sample_next(logits, [(s.request.temperature, s.request.top_p, s.generator) for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.tokens.append(token)
            finish = None
            if token in self.eos_ids:
                finish = "stop"
            else:
                delta, hit_stop = seq.text.push(seq.tokens)
                if delta:
                    self._emit(seq, Delta(delta))
                if hit_stop:
                    finish = "stop"
            if finish is None and len(seq.tokens) >= seq.request.max_tokens:
                finish = "length"
            if finish is None and seq.handle.cancelled:
                finish = "cancelled"
            if finish is not None:
                tail = seq.text.flush()
                if tail and finish != "cancelled":
                    self._emit(seq, Delta(tail))
                self._finish(seq, Finished(finish, seq.text.text, list(seq.tokens), len(seq.request.prompt_ids)))
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            if keep:
                assert self._batch is not None  # the rows just sampled are the batch's
                self._batch.keep(keep)
            else:
                self._batch = None
            self._collect()

    def _finish(self, seq: _Sequence, output: Output) -> None:
        seq.done = True
        self._emit(seq, output)
        self._release(seq)

    @staticmethod
    def _emit(seq: _Sequence, output: Output) -> None:
        try:
            seq.emit(output)
        except Exception:  # a consumer that went away must not fail the batch
            logger.debug("dropping output for a consumer that is gone", exc_info=True)
            seq.handle.cancel()

    def _release(self, seq: _Sequence) -> None:
        self._pins.release(seq.request.adapter)

    def _forward(self, versions, ids, mask, positions, cache) -> torch.Tensor:
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        kwargs[self._cache_arg] = cache
        if not self._pins.loaded:
            return self.model(**kwargs).logits
        distinct = set(versions)
        if distinct == {None}:
            with self.model.disable_adapter():
                return self.model(**kwargs).logits
        if len(distinct) == 1:
            self.model.set_adapter(versions[0])
            return self.model(**kwargs).logits
        return self.model(**kwargs, adapter_names=[v or _PEFT_NO_ADAPTER for v in versions]).logits

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    # ---- adapters (engine thread) ----------------------------------------------------------

    def _load(self, version: str, path) -> float:
        started = time.perf_counter()
        if version in self._pins.loaded:
            return 0.0
        if not hasattr(self.model, "peft_config"):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version)
        else:
            self.model.load_adapter(str(path), adapter_name=version)
        self.model.eval()
        self._pins.add(version)
        elapsed = time.perf_counter() - started
        logger.info("loaded adapter %s in %.0f ms", version, elapsed * 1000)
        return elapsed

    def _set_keep(self, versions: set[str]) -> None:
        self._pins.keep(versions)
        self._collect()

    def _collect(self) -> None:
        """Unload versions that are neither kept nor held by a request."""
        for version in self._pins.collect(self.model.delete_adapter, keep_one=True):
            logger.info("unloaded adapter %s", version)

    @torch.inference_mode()
    def _log_ratios(self, version: str, pairs: list[Pair]) -> list[float] | None:
        if version not in self._pins.loaded:
            return None
        length = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), length), self.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for i, (prompt, completion) in enumerate(pairs):  # right-padded: positions count from 0
            ids[i, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[i, : len(prompt) + len(completion)] = 1
            answer[i, len(prompt) : len(prompt) + len(completion)] = True
        ids, mask, answer = ids.to(self.loaded.device), mask.to(self.loaded.device), answer.to(self.loaded.device)
        self.model.set_adapter(version)
        policy = _logps(self.model(input_ids=ids, attention_mask=mask).logits, ids, answer)
        with self.model.disable_adapter():
            reference = _logps(self.model(input_ids=ids, attention_mask=mask).logits, ids, answer)
        return (policy - reference).tolist()


def _logps(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Σ log p of the answer tokens; the logits at t predict the token at t + 1."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * answer[:, 1:]).sum(-1)
