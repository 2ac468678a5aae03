"""Serving benchmarks: the live HTTP server (uvicorn, in this process) on the demo-sized model.

1. Overhead at concurrency 1. A non-streaming, greedy (temperature 0) completion of a fixed
   prompt with max_tokens N through the server, against the same generation in-process with
   Hugging Face `model.generate` on the very model object the server holds (same weights, same
   device and dtype, same prompt ids from `render_prompt`, greedy, KV cache). The random model
   may stop at EOS before N tokens, so the baseline is asked for exactly the number of tokens the
   server produced (`usage.completion_tokens` = n; `min_new_tokens = max_new_tokens = n`): both
   sides run the same n forward passes. Runs alternate (server, engine, generate) after a
   warm-up, and the medians are compared: ratio = server / generate, target <= 1.15. The engine
   alone (`Engine.submit`, no HTTP) is timed too, which splits the overhead into the engine's
   share and the HTTP route's share (parsing, bus and ledger writes, JSON, the client).
2. Throughput. 1, 4 and 16 client threads (httpx) each send non-streaming completions back to
   back (max_tokens 64, temperature 1.0, a different seed per request) for a fixed time; tokens/s
   = completion tokens of every finished request / wall time until the last one finished. The
   baseline is 1 client in the same run; target: 16 clients >= 5x. The same clients then stream
   for a shorter time, which gives the time to first token (first chunk with content) at each
   concurrency, and then submit straight into the engine (no HTTP), which shows how much of the
   gap is the engine's own batching and how much the HTTP path's. Each level's time is cut into
   `rounds` slices interleaved with the other levels.
3. Hot-swap: see bench/swap.py.

Targets are reported (PASS / MISS), never enforced.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import report, swap
from bench.live import ADMIN_TOKEN, PROMPT, Clients, LiveServer, Reply, bench_model, complete, make_adapters, stream
from foundation.models import render_prompt
from serve.generation import Failed, Finished, GenerationRequest
from serve.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How much of everything one run measures."""

    max_tokens: int = 64  # N, for overhead and throughput
    warmup: int = 3  # overhead runs discarded per side
    runs: int = 20  # overhead runs kept per side
    levels: tuple[int, ...] = (1, 4, 16)  # concurrent clients
    duration_s: float = 15.0  # non-streaming throughput over HTTP, per level
    stream_s: float = 6.0  # streaming over HTTP (time to first token), per level
    engine_s: float = 6.0  # straight into the engine, no HTTP, per level
    rounds: int = 3  # slices each level's time is cut into, interleaved with the other levels
    adapters: int = 10  # swaps per condition (idle, under load)
    background: int = 4  # streaming clients during the loaded swaps
    lora_rank: int = 16


FULL = Plan()
QUICK = Plan(warmup=2, runs=10, duration_s=4.0, stream_s=2.0, engine_s=2.0, rounds=1, adapters=4)


def run(options) -> Path:
    """Build the model and adapters, start the server, run the three benchmarks, report."""
    plan = QUICK if options.quick else FULL
    with tempfile.TemporaryDirectory(prefix="kto-bench-serving-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_path, model_id = bench_model(options, tmp)
        started = time.perf_counter()
        adapter_dirs = make_adapters(
            model_path, tmp / "adapters", 2 * plan.adapters + 1, base_model=model_id, r=plan.lora_rank
        )
        logger.info("made %d adapters in %.1f s", len(adapter_dirs), time.perf_counter() - started)
        settings = ServeSettings(
            data_dir=tmp / "data",
            model=str(model_path),
            model_id=model_id,
            admin_token=ADMIN_TOKEN,
            default_max_tokens=plan.max_tokens,
        )
        with LiveServer(settings) as server:
            loaded = server.state.loaded
            device, dtype = str(loaded.device), str(loaded.dtype).removeprefix("torch.")
            params = sum(p.numel() for p in loaded.model.parameters())  # before PEFT injects LoRA layers
            logger.info(
                "server up at %s: %s (%.1fM parameters) on %s (%s)", server.url, model_id, params / 1e6, device, dtype
            )
            overhead = measure_overhead(server, plan)
            throughput = measure_throughput(server, plan)
            hotswap = swap.measure(server, plan, adapter_dirs, model_id)
    results = {"overhead": overhead, "throughput": throughput, "hotswap": hotswap}
    targets = make_targets(results)
    print_tables(results, targets, server_poll_s=settings.registry_poll_s)
    payload = {
        "suite": "serving",
        "quick": options.quick,
        "machine": report.machine_info(device, dtype),
        "model": {"path": str(options.model or "demo (built in a temp dir)"), "id": model_id, "parameters": params},
        "plan": asdict(plan),
        "server": {"registry_poll_s": settings.registry_poll_s, "max_batch": settings.max_batch},
        "results": results,
        "targets": [t.to_json() for t in targets],
        "busy_phases": busy_phases(results),
    }
    name = f"serving-{device.split(':')[0]}" + ("-quick" if options.quick else "")
    path = report.write_json(name, payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


# ---- 1. overhead at concurrency 1 ------------------------------------------------------------


def measure_overhead(server: LiveServer, plan: Plan) -> dict[str, Any]:
    state = server.state
    loaded = state.loaded
    if state.engine.loaded_versions:
        raise RuntimeError("the overhead benchmark must run on the bare base model, before any adapter loads")
    prompt_ids = render_prompt(loaded.tokenizer, PROMPT)
    n_max = plan.max_tokens
    http_s, engine_s, hf_s, counts, match = [], [], [], set(), True
    meter = report.CpuMeter()
    with httpx.Client(timeout=300) as client:
        for _ in range(plan.warmup):
            reply = complete(client, server.url, max_tokens=n_max, temperature=0.0)
            engine_generate(state.engine, prompt_ids, n_max)
            hf_generate(loaded, prompt_ids, reply.tokens)
        count_before = server.metric("kto_request_duration_seconds_count", {"stream": "false"})
        sum_before = server.metric("kto_request_duration_seconds_sum", {"stream": "false"})
        for _ in range(plan.runs):
            reply = complete(client, server.url, max_tokens=n_max, temperature=0.0)
            n = reply.tokens
            direct, finished = engine_generate(state.engine, prompt_ids, n_max)
            hf_seconds, hf_tokens = hf_generate(loaded, prompt_ids, n)
            http_s.append(reply.seconds)
            engine_s.append(direct.seconds)
            hf_s.append(hf_seconds)
            counts.add(n)
            match &= same_greedy_tokens(finished, hf_tokens, loaded)
        handled = server.metric("kto_request_duration_seconds_count", {"stream": "false"}) - count_before
        handler_mean = (server.metric("kto_request_duration_seconds_sum", {"stream": "false"}) - sum_before) / handled
    if len(counts) != 1:
        logger.warning("greedy completions had different lengths across runs: %s", sorted(counts))
    n = max(counts)
    if n < n_max // 4:
        logger.warning("the model stopped after %d of %d tokens: fixed costs dominate this comparison", n, n_max)
    server_p50, hf_p50 = report.percentile(http_s, 50), report.percentile(hf_s, 50)
    return {
        "max_tokens": n_max,
        "completion_tokens": n,
        "runs": plan.runs,
        "warmup": plan.warmup,
        "server_s": report.summary(http_s),
        "engine_s": report.summary(engine_s),
        "generate_s": report.summary(hf_s),
        "server_handler_mean_s": handler_mean,
        "ratio_server_vs_generate": report.ratio(server_p50, hf_p50),
        "ratio_engine_vs_generate": report.ratio(report.percentile(engine_s, 50), hf_p50),
        "ms_per_token": {
            "server": 1000 * server_p50 / n,
            "generate": 1000 * hf_p50 / n,
            "engine": 1000 * report.percentile(engine_s, 50) / n,
        },
        "greedy_tokens_match": match,
        "cpu": meter.stop(),
    }


def engine_generate(
    engine, prompt_ids: list[int], max_tokens: int, *, temperature: float = 0.0, seed: int | None = None
) -> tuple[Reply, Finished]:
    """One request straight into the engine (no HTTP): seconds from submit to Finished."""
    done = threading.Event()
    result: list = []
    first: list[float] = []

    def emit(out) -> None:
        if not first:
            first.append(time.perf_counter())
        if isinstance(out, (Finished, Failed)):
            result.append(out)
            done.set()

    started = time.perf_counter()
    engine.submit(GenerationRequest(list(prompt_ids), max_tokens, temperature=temperature, seed=seed), emit)
    if not done.wait(timeout=300):
        raise RuntimeError("the engine did not finish a request in 300 s")
    seconds = time.perf_counter() - started
    if isinstance(result[0], Failed):
        raise RuntimeError(result[0].error)
    finished = result[0]
    return Reply(started, seconds, len(finished.token_ids), "", ttft=first[0] - started), finished


def hf_generate(loaded, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    """The baseline: `model.generate`, greedy, KV cache, exactly n new tokens."""
    ids = torch.tensor([prompt_ids], device=loaded.device)
    _sync(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    _sync(loaded.device)
    return time.perf_counter() - started, out[0, len(prompt_ids) :].tolist()


def same_greedy_tokens(finished: Finished, hf_tokens: list[int], loaded) -> bool:
    """Whether the engine and `generate` chose the same tokens (a sanity check of the baseline).

    When the engine stopped at EOS, `min_new_tokens` made generate pick something else there,
    so the last token is left out of the comparison."""
    ours = finished.token_ids[:-1] if finished.finish_reason == "stop" else finished.token_ids
    same = hf_tokens[: len(ours)] == ours
    if not same:
        logger.warning("greedy tokens differ: engine %s vs generate %s", ours[:16], hf_tokens[:16])
    return same


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- 2. throughput at 1, 4, 16 clients --------------------------------------------------------


def measure_throughput(server: LiveServer, plan: Plan) -> dict[str, Any]:
    """Each level runs in `plan.rounds` slices, interleaved with the other levels, so that a
    burst of other work on the machine spreads over all levels instead of skewing one."""
    url, n, engine = server.url, plan.max_tokens, server.state.engine
    prompt_ids = render_prompt(server.state.loaded.tokenizer, PROMPT)
    kinds = {
        "http": (plan.duration_s, lambda c, seed: complete(c, url, max_tokens=n, temperature=1.0, seed=seed)),
        "stream": (plan.stream_s, lambda c, seed: stream(c, url, max_tokens=n, temperature=1.0, seed=seed)),
        "engine": (
            plan.engine_s,
            lambda c, seed: engine_generate(engine, prompt_ids, n, temperature=1.0, seed=seed)[0],
        ),
    }
    slices: dict[tuple[str, int], list[dict[str, Any]]] = {(k, c): [] for k in kinds for c in plan.levels}
    for _ in range(plan.rounds):
        for clients in plan.levels:
            for kind, (seconds, send) in kinds.items():
                slices[kind, clients].append(_drive(clients, seconds / plan.rounds, send))
    levels = []
    for clients in plan.levels:
        http, streamed, direct = (_merge(slices[k, clients]) for k in kinds)
        levels.append(
            {
                "clients": clients,
                "requests": len(http["replies"]),
                "errors": http["errors"],
                "tokens": http["tokens"],
                "seconds": http["seconds"],
                "tokens_per_s": http["tokens_per_s"],
                "tokens_per_request": http["tokens"] / max(1, len(http["replies"])),
                "latency_s": report.summary([r.seconds for r in http["replies"]]),
                "other_cores": max(
                    (m["other_cores"] for m in (http, streamed, direct) if m["other_cores"] is not None), default=None
                ),
                "stream": {
                    "requests": len(streamed["replies"]),
                    "errors": streamed["errors"],
                    "tokens_per_s": streamed["tokens_per_s"],
                    "ttft_s": report.summary([r.ttft for r in streamed["replies"] if r.ttft is not None]),
                },
                "engine": {
                    "requests": len(direct["replies"]),
                    "tokens_per_s": direct["tokens_per_s"],
                    "ttft_s": report.summary([r.ttft for r in direct["replies"]]),
                },
            }
        )
        logger.info(
            "%d clients: %.0f tokens/s over HTTP, %.0f straight into the engine",
            clients,
            http["tokens_per_s"],
            direct["tokens_per_s"],
        )
    for level in levels:
        level["ratio_vs_1_client"] = report.ratio(level["tokens_per_s"], levels[0]["tokens_per_s"])
        level["engine"]["ratio_vs_1_client"] = report.ratio(
            level["engine"]["tokens_per_s"], levels[0]["engine"]["tokens_per_s"]
        )
    return {
        "max_tokens": n,
        "duration_s": plan.duration_s,
        "stream_s": plan.stream_s,
        "engine_s": plan.engine_s,
        "rounds": plan.rounds,
        "levels": levels,
    }


def _drive(clients: int, seconds: float, send) -> dict[str, Any]:
    """`clients` threads sending back to back for `seconds`, then drained; tokens/s over it all."""
    meter = report.CpuMeter()
    pool = Clients(clients, send, seed_base=clients * 10_000_000 + int(time.time() * 1000) % 1_000_000).start()
    started = time.perf_counter()
    time.sleep(seconds)
    pool.stop()
    replies = pool.replies
    ended = max((r.started + r.seconds for r in replies), default=time.perf_counter())
    return {
        "replies": replies,
        "errors": len(pool.errors),
        "tokens": sum(r.tokens for r in replies),
        "seconds": ended - started,
        "cpu": meter.stop(),
    }


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    other = [p["cpu"]["other_cores"] for p in parts if p["cpu"]["other_cores"] is not None]
    return {
        "replies": [r for p in parts for r in p["replies"]],
        "errors": sum(p["errors"] for p in parts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": report.ratio(tokens, seconds),
        "other_cores": max(other) if other else None,
    }


# ---- targets and tables -----------------------------------------------------------------------


def make_targets(results: dict[str, Any]) -> list[report.Target]:
    overhead, levels, swaps = results["overhead"], results["throughput"]["levels"], results["hotswap"]
    top = levels[-1]
    targets = [
        report.Target(
            "overhead: server / generate, median latency, c=1", overhead["ratio_server_vs_generate"], "<=", 1.15, "x"
        ),
        report.Target(f"throughput: {top['clients']} clients / 1 client", top["ratio_vs_1_client"], ">=", 5.0, "x"),
    ]
    for condition in swaps["conditions"]:
        targets.append(
            report.Target(
                f"hot-swap p50, {condition['name']}", condition["activation_to_served_s"]["p50"], "<=", 0.5, "s"
            )
        )
    return targets


def print_tables(results: dict[str, Any], targets: list[report.Target], *, server_poll_s: float) -> None:
    o = results["overhead"]
    rows = [
        [
            "server (HTTP, client-side)",
            o["server_s"]["p50"],
            o["server_s"]["p90"],
            o["ms_per_token"]["server"],
            o["ratio_server_vs_generate"],
        ],
        ["  server handler (its histogram, mean)", o["server_handler_mean_s"], "", "", ""],
        [
            "engine alone (Engine.submit, no HTTP)",
            o["engine_s"]["p50"],
            o["engine_s"]["p90"],
            o["ms_per_token"]["engine"],
            o["ratio_engine_vs_generate"],
        ],
        [
            "HF model.generate (baseline)",
            o["generate_s"]["p50"],
            o["generate_s"]["p90"],
            o["ms_per_token"]["generate"],
            1.0,
        ],
    ]
    print(
        report.table(
            f"1. Overhead at concurrency 1: greedy, {o['completion_tokens']} tokens (max_tokens {o['max_tokens']}), "
            f"{o['runs']} runs, tokens match: {o['greedy_tokens_match']}, other cores busy: "
            f"{report.fmt(o['cpu']['other_cores'])}",
            ["path", "p50 s", "p90 s", "ms/token", "x generate"],
            rows,
        )
    )
    print()
    rows = [
        [
            lv["clients"],
            lv["requests"],
            lv["errors"],
            lv["tokens_per_s"],
            lv["ratio_vs_1_client"],
            lv["latency_s"]["p50"],
            lv["stream"]["ttft_s"]["p50"],
            lv["stream"]["ttft_s"]["p90"],
            lv["stream"]["tokens_per_s"],
            lv["engine"]["tokens_per_s"],
            lv["engine"]["ratio_vs_1_client"],
            lv["other_cores"],
        ]
        for lv in results["throughput"]["levels"]
    ]
    t = results["throughput"]
    print(
        report.table(
            f"2. Throughput: max_tokens {t['max_tokens']}, temperature 1.0; per level {t['duration_s']:g} s over HTTP, "
            f"{t['stream_s']:g} s streaming (TTFT), {t['engine_s']:g} s straight into the engine; {t['rounds']} rounds",
            [
                "clients",
                "requests",
                "errors",
                "tokens/s",
                "x 1 client",
                "latency p50 s",
                "TTFT p50 s",
                "TTFT p90 s",
                "stream tok/s",
                "engine tok/s",
                "engine x 1",
                "other cores",
            ],
            rows,
        )
    )
    print()
    print(swap.table(results["hotswap"], server_poll_s))
    print()
    print(report.targets_table(targets))
    busy = busy_phases(results)
    if busy:
        print(
            f"\nNOTE: other processes kept up to {max(busy.values()):.2f} of {os.cpu_count()} cores busy during "
            f"{', '.join(busy)}: those numbers are not a clean measurement; rerun on a quiet machine."
        )


def busy_phases(results: dict[str, Any], threshold: float = 0.25) -> dict[str, float]:
    """Phases during which other processes used more than `threshold` cores (CpuMeter)."""
    phases = {"overhead": results["overhead"]["cpu"]["other_cores"]}
    phases.update({f"throughput c={lv['clients']}": lv["other_cores"] for lv in results["throughput"]["levels"]})
    phases.update({f"hot-swap {c['name']}": c["cpu"]["other_cores"] for c in results["hotswap"]["conditions"]})
    return {name: cores for name, cores in phases.items() if cores is not None and cores > threshold}
