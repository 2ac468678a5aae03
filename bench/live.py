"""A live server for benchmarks, the model it serves, adapters to swap in, and HTTP clients.

The server is the real app (`create_app(ServeSettings(...))`) under uvicorn on a free port, in a
thread of the benchmark process, the same pattern as tests/serve/conftest.py. Clients are httpx
threads in the same process, so they share the GIL with the server; on a small CPU box that
costs the server a little, and the numbers are the worse for it, never the better.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from testkit.background_server import BackgroundServer

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "bench-demo"
ADMIN_TOKEN = "bench-admin-token"


def as_someone() -> dict[str, str]:
    """A new user for each request: many people, as a public server has, each within the per-user
    rate limits (one user sending back to back would be refused with 429 within a minute)."""
    return {"X-User-Id": f"bench-{uuid.uuid4().hex[:16]}"}


PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and the sea."}]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_demo_model(path: Path) -> Path:
    """The demo-sized random Llama (hidden 128, 4 layers, vocabulary 512); nothing downloaded."""
    from foundation.models import build_tiny_model

    return build_tiny_model(path, vocab_size=512, hidden_size=128, num_layers=4, num_heads=4)


def bench_model(options, tmp: Path) -> tuple[Path, str]:
    """(directory, served name) of the model a suite runs: `--model`, or the demo-sized one built
    in `tmp`."""
    if options.model:
        return Path(options.model), options.model_id or Path(options.model).name
    logger.info("building the demo-sized model (random weights) in %s", tmp / "model")
    return build_demo_model(tmp / "model"), options.model_id or DEMO_MODEL_ID


def make_adapters(
    model_path: Path, out_dir: Path, count: int, *, base_model: str, r: int = 16, seed: int = 1000
) -> list[Path]:
    """`count` PEFT LoRA adapters (rank r on q/k/v/o) with random A and B, one per seed.

    The base is loaded once on the CPU and wrapped once; each adapter re-draws the LoRA weights
    (nn.Linear's default init, which is what `init_lora_weights=False` leaves) and is saved with
    `base_model_name_or_path` set to the served model id, as the learner would publish it."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from foundation.models import load_model

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = load_model(model_path, device="cpu", dtype=dtype).model
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    model = get_peft_model(base, config)
    paths = []
    for i in range(count):
        torch.manual_seed(seed + i)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for linear in (module.lora_A["default"], module.lora_B["default"]):
                    assert isinstance(linear, torch.nn.Linear)  # LoRA's A and B on a Linear target
                    linear.reset_parameters()
        path = out_dir / f"adapter-{i:03d}"
        model.save_pretrained(str(path))
        config_path = path / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(adapter_config))
        paths.append(path)
    return paths


class LiveServer(BackgroundServer):
    """The server in this process, plus a reader for its metrics."""

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of the server's Prometheus metrics, read through GET /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        reply = httpx.get(f"{self.url}/metrics", timeout=30)
        reply.raise_for_status()
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                if sample.name == name and (
                    labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
                ):
                    return float(sample.value)
        return 0.0


# ---- one request -----------------------------------------------------------------------------


@dataclass
class Reply:
    """One completion as the client saw it."""

    started: float  # perf_counter() when the request was sent
    seconds: float  # until the last byte
    tokens: int  # usage.completion_tokens
    model: str
    ttft: float | None = None  # streaming only: until the first chunk with generated content
    text: str = ""
    finish_reason: str | None = None
    response_id: str = ""  # the chat completion's id, which a rating names


def complete(
    client: httpx.Client,
    url: str,
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None = None,
    model: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A non-streaming chat completion, as `headers`' user (default: a new one, `as_someone`)."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if model:
        body["model"] = model
    started = time.perf_counter()
    reply = client.post(f"{url}/v1/chat/completions", json=body, headers=headers or as_someone())
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    data = reply.json()
    choice = data["choices"][0]
    return Reply(
        started,
        seconds,
        data["usage"]["completion_tokens"],
        data["model"],
        text=choice["message"]["content"],
        finish_reason=choice["finish_reason"],
        response_id=data["id"],
    )


def stream(client: httpx.Client, url: str, *, max_tokens: int, temperature: float, seed: int | None = None) -> Reply:
    """A streaming (SSE) chat completion with usage in its last chunk; measures time to first token.

    The first chunk only carries the assistant role and is sent before generation starts, so the
    first token is the first chunk with content or a finish_reason."""
    body = {
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens, model, finish = None, 0, "", None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=as_someone()) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            model = chunk.get("model", model)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if ttft is None and (choice["delta"].get("content") or choice.get("finish_reason")):
                    ttft = time.perf_counter() - started
    return Reply(started, time.perf_counter() - started, tokens, model, ttft=ttft, finish_reason=finish)


class Clients:
    """`n` threads each sending requests back to back (`send(client, seed)`) until stopped.

    Every reply is kept; errors are counted and logged, never raised."""

    def __init__(self, n: int, send, *, seed_base: int = 0):
        self.send, self.seed_base = send, seed_base
        self.replies: list[Reply] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"client-{i}", daemon=True) for i in range(n)
        ]

    def _loop(self, index: int) -> None:
        seed = self.seed_base + index * 1_000_000
        with httpx.Client(timeout=300) as client:
            while not self._stop.is_set():
                seed += 1
                try:
                    reply = self.send(client, seed)
                except Exception as exc:
                    logger.warning("request failed: %r", exc)
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.replies.append(reply)

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Ask every client to finish its current request, and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=600)
