"""What serve asks of a generation engine, whichever runs: the built-in one (serve.engine, the
default, CPU and GPU) or vLLM (serve.vllm_engine, on NVIDIA GPUs). Chosen by `KTO_ENGINE`.

The contract, held by tests/serve/test_engine_contract.py against every engine available:

- `submit` pins a request to the adapter version it names (None: the base model) until it
  finishes; a version no request holds and `retain` leaves out is unloaded, never one in use;
- `emit` receives `Delta`s whose texts add up to the final text, then one `Finished` (or one
  `Failed`), whose `token_ids` are exactly the tokens generated, the end-of-answer token included,
  so that the response event carries what the learner trains on;
- versions are loaded once under their immutable names; loading a loaded one is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from foundation.models import LoadedModel, ModelRefused, load_model, load_shape

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None  # the pinned version; None = the base model


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    text: str
    token_ids: list[int]  # exactly as generated, including the EOS or stop-string tokens
    prompt_tokens: int


@dataclass
class Failed:
    error: str


Output = Delta | Finished | Failed
Pair = tuple[list[int], list[int]]  # (prompt ids, answer ids) as served


class Handle:
    """What `submit` returns: lets the caller cancel (e.g. the client went away)."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class GenerationEngine(Protocol):
    loaded: LoadedModel
    """The tokenizer, and the model where the engine runs it in this process."""

    lora_targets: frozenset[str]
    """Short names of the layers an adapter may adapt here (q_proj, …): what hot-swap checks."""

    on_step: Callable[[int, int], None] | None
    """Called with (running, waiting) after each scheduling step, for metrics."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def loaded_versions(self) -> frozenset[str]: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def submit(self, request: GenerationRequest, emit: Callable[[Output], object]) -> Handle:
        """Queue a request (KeyError: its version is not loaded); `emit` is called, from any
        thread, with each output."""
        ...

    def load_adapter(self, version: str, path) -> Future:
        """Load a PEFT adapter under its immutable version name; the future's result is the
        seconds it took (0 when it was loaded already)."""
        ...

    def retain(self, versions: set[str]) -> Future:
        """Keep these versions loaded; others are unloaded once no request holds them."""
        ...

    def log_ratios(self, version: str, pairs: list[Pair]) -> Future:
        """log π(answer | prompt) − log π_ref(answer | prompt) per pair under `version` (the base
        model is π_ref); the future's result is None when the version is not loaded here."""
        ...


def check_engine(engine: str) -> None:
    """ModelRefused when the engine `KTO_ENGINE` asks for cannot run here."""
    from serve.vllm_engine import vllm_available

    if engine == "vllm" and not vllm_available():
        raise ModelRefused(
            "KTO_ENGINE=vllm needs vLLM and an NVIDIA GPU: install it on a GPU host with "
            "`uv sync --extra vllm --no-dev`, or set KTO_ENGINE=builtin"
        )


def open_engine(engine: str, model: str, *, model_id: str, max_batch: int, max_lora_rank: int):
    """(the model as serve sees it, the engine) for `KTO_ENGINE`'s value; ModelRefused when the
    engine asked for cannot run here."""
    from serve.engine import Engine
    from serve.vllm_engine import VllmEngine, vllm_available

    check_engine(engine)
    if engine == "vllm" or (engine == "auto" and vllm_available()):
        loaded = load_shape(model, model_id=model_id)
        chosen: GenerationEngine = VllmEngine(model, loaded, max_batch=max_batch, max_lora_rank=max_lora_rank)
    else:
        loaded = load_model(model, model_id=model_id)
        chosen = Engine(loaded, max_batch=max_batch)
    logger.info(
        "generating with %s (KTO_ENGINE=%s)",
        "vLLM" if isinstance(chosen, VllmEngine) else "the built-in engine",
        engine,
    )
    return loaded, chosen
