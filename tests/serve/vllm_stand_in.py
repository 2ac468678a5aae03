"""A stand-in for the few vLLM names serve.vllm_engine uses, installed in sys.modules, so that the
engine's own logic (pinning, unloading, cancelling, failing, assembling) runs on CPU. It is not
vLLM: the real one runs the contract tests (test_engine_contract.py) where it and a GPU are.

Each request yields one output per answer token (text "t<id>", in DELTA mode), the last with
finish reason "stop". A request whose prompt ends with HOLD waits after its first token until
`release()`; one whose prompt ends with FAIL raises. Prompt log-probs are -1 per token with an
adapter and -2 without.
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field
from typing import Any

HOLD, FAIL = 9001, 9002
ANSWER = [5, 6, 2]  # 2: the end-of-answer id


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    outputs: list[Completion]
    prompt_logprobs: list[Any] | None = None


@dataclass
class Logprob:
    logprob: float


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@dataclass
class AsyncLLM:
    args: Any
    added: list[LoRARequest] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    errored: bool = False
    gate: asyncio.Event | None = None

    @classmethod
    def from_engine_args(cls, args: Any) -> AsyncLLM:
        llm = cls(args)
        llm.gate = asyncio.Event()
        STARTED.append(llm)
        return llm

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str, lora_request=None):
        self.params.append(params)
        ids = prompt["prompt_token_ids"]
        if params.kwargs.get("prompt_logprobs") == 0:
            each = -1.0 if lora_request is not None else -2.0
            yield RequestOutput([Completion("", [7], "length")], [None] + [{t: Logprob(each)} for t in ids[1:]])
            return
        if ids[-1] == FAIL:
            raise RuntimeError("the stand-in failed this request")
        for i, token in enumerate(ANSWER):
            if i == 1 and ids[-1] == HOLD:
                assert self.gate is not None
                await self.gate.wait()
            yield RequestOutput([Completion(f"t{token}", [token], "stop" if i == len(ANSWER) - 1 else None)])

    async def add_lora(self, request: LoRARequest) -> bool:
        self.added.append(request)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


STARTED: list[AsyncLLM] = []


def install(monkeypatch) -> None:
    """Put the stand-in where `import vllm...` looks, for one test."""
    modules: dict[str, dict[str, Any]] = {
        "vllm": dict(AsyncEngineArgs=lambda **kwargs: kwargs, SamplingParams=SamplingParams),
        "vllm.sampling_params": dict(RequestOutputKind=types.SimpleNamespace(DELTA="delta")),
        "vllm.lora": {},
        "vllm.lora.request": dict(LoRARequest=LoRARequest),
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": dict(AsyncLLM=AsyncLLM),
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)


def release(llm: AsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    """Let held requests go on (from the test's thread)."""
    assert llm.gate is not None
    loop.call_soon_threadsafe(llm.gate.set)
