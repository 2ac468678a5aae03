"""Learner benchmarks: our KTO update path against TRL's KTOTrainer, and feedback → served latency.

    .venv/bin/python -m bench --only learner            # full: about 11 minutes on 2 CPU cores
    .venv/bin/python -m bench --only learner --quick    # smoke run: about 5 minutes
    .venv/bin/python -m bench --only learner --model PATH   # a local model instead of the random ones

This module is the suite's entry (`run`), the plan and the throughput comparison's orchestration;
bench/learner_sides.py runs one side (ours / TRL) in its own subprocess (`python -m
bench.learner_sides --side ...`); bench/learner_families.py repeats the comparison on a tiny model of
each family users bring; bench/feedback_latency.py is part 2. What is measured and how:
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.feedback_latency import measure_latency
from bench.learner_sides import BETA, LEARNING_RATE, LORA_ALPHA, LORA_RANK, SEED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int  # N optimizer steps per run


@dataclass(frozen=True)
class Plan:
    """How much of everything one run measures."""

    batch: int = 8  # B, examples per micro-batch (TRL needs ≥ 2 for its KL term)
    prompt_tokens: int = 64
    completion_tokens: int = 64  # including TRL's EOS
    repeats: int = 3  # runs per (side, model), each in the same fresh subprocess
    models: tuple[ModelSpec, ...] = (
        ModelSpec("demo (h128, 4 layers)", 128, 4, 4, 16),
        ModelSpec("larger (h512, 6 layers)", 512, 6, 8, 4),
    )
    breakdown_steps: int = 3  # an extra instrumented run of ours: where the time goes (steps after the first)
    family_steps: int = 16  # N for each model family's tiny model (bench/learner_families.py)
    family_repeats: int = 3
    # torch threads (OMP_NUM_THREADS) of the throughput workers on CPU, the same for both sides. Not
    # the default (one per core): on this shared 2-core box two OpenMP threads per process collapse
    # as soon as anything else holds a core (runs measured 10-50x slower and erratic), one does not.
    cpu_threads: int = 1
    # feedback → published → served
    rate_per_s: float = 4.0  # ratings per second, spread over `users`
    users: int = 4
    max_tokens: int = 8  # per chat answer
    warmup_timeout_s: float = 120.0  # until the first version is published
    measure_s: float = 45.0  # ratings sent in this window are measured
    drain_s: float = 40.0  # then keep chatting and rating until every measured one is served, at most this long
    # a second run of part 2 with this environment for both processes of `kto-loop up` (empty: none)
    diagnostic_env: tuple[tuple[str, str], ...] = (("OMP_NUM_THREADS", "1"),)
    diagnostic_measure_s: float = 20.0
    diagnostic_drain_s: float = 25.0


FULL = Plan()
QUICK = Plan(
    models=(ModelSpec("demo (h128, 4 layers)", 128, 4, 4, 8),),
    breakdown_steps=2,
    family_steps=8,
    family_repeats=1,
    measure_s=15.0,
    drain_s=35.0,
    diagnostic_env=(),
)


def run(options) -> Path:
    import torch

    from bench import learner_families  # imports this module: not at the top

    plan = QUICK if options.quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16 autocast (fp32 weights)" if device == "cuda" else "float32"
    with tempfile.TemporaryDirectory(prefix="kto-bench-learner-") as tmp_dir:
        tmp = Path(tmp_dir)
        models = resolve_models(options, plan, tmp)
        throughput = [compare_sides(spec, path, plan, tmp) for spec, path in models]
        families = [] if options.model else learner_families.measure_families(plan, tmp)  # not a user's model
        latency = [measure_latency(plan, models[0][1], tmp / "latency")]
        if plan.diagnostic_env:
            env = dict(plan.diagnostic_env)
            logger.info("feedback latency again, diagnostic: %s", env)
            diagnostic = replace(plan, measure_s=plan.diagnostic_measure_s, drain_s=plan.diagnostic_drain_s)
            latency.append(measure_latency(diagnostic, models[0][1], tmp / "latency-diagnostic", env))
    results = {"throughput": throughput, "families": families, "latency": latency}
    targets = make_targets(results) + learner_families.make_targets(families)
    print_tables(results, plan)
    print(learner_families.table(families, plan))
    print(report.targets_table(targets))
    payload = {
        "suite": "learner",
        "quick": options.quick,
        "machine": report.machine_info(device, dtype),
        "plan": asdict(plan),
        "lora": {
            "r": LORA_RANK,
            "alpha": LORA_ALPHA,
            "targets": "all linear but lm_head",
            "lr": LEARNING_RATE,
            "beta": BETA,
        },
        "results": results,
        "targets": [t.to_json() for t in targets],
    }
    name = f"learner-{device}" + ("-quick" if options.quick else "")
    path = report.write_json(name, payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


def build_model(spec: ModelSpec, path: Path) -> Path:
    from foundation.models import build_tiny_model

    if not (path / "config.json").exists():
        build_tiny_model(
            path,
            vocab_size=512,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            seed=SEED,
        )
    return path


def resolve_models(options, plan: Plan, tmp: Path) -> list[tuple[ModelSpec, Path]]:
    if options.model:
        spec = ModelSpec(options.model_id or Path(options.model).name, 0, 0, 0, plan.models[-1].steps)
        return [(spec, Path(options.model))]
    return [(spec, build_model(spec, tmp / f"model-{i}")) for i, spec in enumerate(plan.models)]


# ---- 1. throughput: the orchestrating side ---------------------------------------------------


def compare_sides(spec: ModelSpec, model_path: Path, plan: Plan, tmp: Path, *, memory: bool = True) -> dict[str, Any]:
    """Timing in one subprocess (the sides alternate); peak memory (unless `memory` is False) in
    fresh ones, one per side.

    On CPU each side's memory is taken twice: with glibc's defaults (what the process's RSS
    really reached) and with its mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so
    that every large tensor is its own mapping, returned to the system when freed, and the peak
    RSS follows the live tensors. With the default (a threshold that rises up to 32 MiB as
    buffers are freed) large tensors come from the heap, and the peak also depends on how
    fragmented the heap gets."""
    common = [
        "--model",
        str(model_path),
        "--batch",
        str(plan.batch),
        "--prompt-tokens",
        str(plan.prompt_tokens),
        "--completion-tokens",
        str(plan.completion_tokens),
        "--steps",
        str(spec.steps),
    ]
    import torch

    threads = {} if torch.cuda.is_available() else {"OMP_NUM_THREADS": str(plan.cpu_threads)}
    logger.info(
        "%s: %d runs per side of %d steps x %d examples, alternating", spec.name, plan.repeats, spec.steps, plan.batch
    )
    sides = _worker(
        "both", [*common, "--repeats", str(plan.repeats), "--breakdown-steps", str(plan.breakdown_steps)], tmp, threads
    )
    for side in ("ours", "trl") if memory else ():
        logger.info("%s on %s: peak memory", side, spec.name)
        sides[side]["memory"] = _worker(side, common, tmp, threads)[side]["memory"]
        if sides[side]["device"] == "cuda":  # the CUDA allocator's own peak is exact already
            sides[side]["memory_fixed_mmap"] = sides[side]["memory"]
            continue
        logger.info("%s on %s: peak memory, fixed mmap threshold", side, spec.name)
        fixed = {**threads, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        sides[side]["memory_fixed_mmap"] = _worker(side, common, tmp, fixed)[side]["memory"]
    ours, trl = sides["ours"], sides["trl"]
    compared = {
        "model": spec.name,
        "path": str(model_path),
        "parameters": ours["parameters"],
        "trainable_parameters": {"ours": ours["trainable"], "trl": trl["trainable"]},
        "steps": spec.steps,
        "batch": plan.batch,
        "ours": ours,
        "trl": trl,
        "same_token_ids": all(r.get("same_token_ids_as_ours") for r in trl["runs"]),
        "loss": {"ours": ours["runs"][0]["loss"], "trl": trl["runs"][0]["loss"]},
        "ratio_examples_per_s": report.ratio(ours["examples_per_s"], trl["examples_per_s"]),
        "ratio_best_of_runs": report.ratio(trl["best_seconds"], ours["best_seconds"]),
        "ratio_with_reference": report.ratio(ours["with_reference"]["examples_per_s"], trl["examples_per_s"]),
        "ratio_steady_step": report.ratio(trl["steady_step_s"], ours["steady_step_s"]),
    }
    if memory:
        peak = lambda key: report.ratio(ours[key]["peak_delta_mib"], trl[key]["peak_delta_mib"])
        compared |= {"memory_ratio": peak("memory"), "memory_ratio_fixed_mmap": peak("memory_fixed_mmap")}
    return compared


def _worker(side: str, args: list[str], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    out = tmp / f"worker-{side}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "bench.learner_sides", "--side", side, *args, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=report.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {side} worker failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-4000:]}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - started
    logger.info("  done in %.0f s (process wall, imports included)", result["process_wall_s"])
    return result


# ---- report ----------------------------------------------------------------------------------


def make_targets(results: dict[str, Any]) -> list[report.Target]:
    targets = []
    for t in results["throughput"]:
        targets.append(report.Target(f"ours / TRL examples/s, {t['model']}", t["ratio_examples_per_s"], ">=", 1.5, "x"))
        targets.append(report.Target(f"peak RSS ours / TRL, {t['model']}", t["memory_ratio"], "<=", 1.0, "x"))
        targets.append(
            report.Target(f"  same, fixed mmap threshold, {t['model']}", t["memory_ratio_fixed_mmap"], "<=", 1.0, "x")
        )
    default = results["latency"][0]
    targets.append(
        report.Target("feedback -> published p50 (defaults)", default["published_s"]["p50"], "<=", 20.0, "s")
    )
    return targets


def print_tables(results: dict[str, Any], plan: Plan) -> None:
    rows = []
    for t in results["throughput"]:
        o, r = t["ours"], t["trl"]
        tok = o["mean_tokens"]
        for label, side, block in (
            ("ours: run_update", o, o),
            ("ours + one-time reference", o, o["with_reference"]),
            ("TRL: KTOTrainer.train()", r, r),
        ):
            main_row = block is side
            rows.append(
                [
                    t["model"],
                    label,
                    f"{t['steps']}x{t['batch']}",
                    f"{tok['prompt']:.0f}+{tok['completion']:.0f}",
                    block["seconds"],
                    block["examples_per_s"],
                    block["tokens_per_s"],
                    side["steady_step_s"] if main_row else "",
                    report.ratio(block["examples_per_s"], r["examples_per_s"]),
                    side["memory"]["peak_delta_mib"] if main_row else "",
                    side["memory_fixed_mmap"]["peak_delta_mib"] if main_row else "",
                ]
            )
    first = results["throughput"][0]["ours"] if results["throughput"] else {}
    device = f"{first.get('device')}, {first.get('torch_threads')} torch thread(s)"
    print(
        report.table(
            f"1. Learner throughput, one pass of N steps x B examples ({device}; median of {plan.repeats} runs per "
            f"side, sides alternating; LoRA r{LORA_RANK} on every linear layer; peak memory above the loaded "
            "model, one fresh process per side)",
            [
                "model",
                "path",
                "N x B",
                "tokens",
                "s",
                "examples/s",
                "tokens/s",
                "steady s/step",
                "x TRL",
                "peak RSS MiB",
                "MiB, fixed mmap",
            ],
            rows,
        )
    )
    for t in results["throughput"]:
        o, r = t["ours"], t["trl"]
        print(
            f"   {t['model']}: best run TRL/ours {report.fmt(t['ratio_best_of_runs'])}x; "
            f"steady-state step TRL/ours {report.fmt(t['ratio_steady_step'])}x; reference pass "
            f"{report.fmt(o['with_reference']['reference_s'])} s for {t['steps'] * t['batch']} examples; "
            "same token ids "
            f"on both sides: {t['same_token_ids']}; mean loss ours {t['loss']['ours']:.6f}, TRL "
            f"{t['loss']['trl']:.6f}; "
            f"runs (s) ours {[round(x['seconds'], 2) for x in o['runs']]}, "
            f"TRL {[round(x['seconds'], 2) for x in r['runs']]}; cores busy with other work during each run: "
            f"ours {[report.fmt(x['cpu']['other_cores']) for x in o['runs']]}, "
            f"TRL {[report.fmt(x['cpu']['other_cores']) for x in r['runs']]}"
        )
    print()
    for t in results["throughput"]:
        b = t["ours"].get("breakdown")
        if b:
            rows = [[k, v, report.ratio(v, b["total"])] for k, v in b.items() if k != "total"]
            rows.append(["total", b["total"], 1.0])
            print(
                report.table(
                    f"   Where one step of ours goes: {t['model']} (s per step, steps after the first)",
                    ["phase", "s/step", "share"],
                    rows,
                )
            )
            print()
    rows = []
    for lat in results["latency"]:
        name = "defaults" if not lat["env"] else "diagnostic: " + " ".join(f"{k}={v}" for k, v in lat["env"].items())
        busy = (lat["cpu"]["self_cores"] or 0) + (lat["cpu"]["other_cores"] or 0)
        rows.append(
            [
                name,
                lat["measured_ratings"],
                lat["achieved_rate_per_s"],
                lat["published_s"]["n"],
                lat["published_s"]["p50"],
                lat["published_s"]["p99"],
                lat["served_s"]["n"],
                lat["served_s"]["p50"],
                lat["served_s"]["p99"],
                lat["held_out"],
                lat["pending"],
                lat["versions"],
                lat["rejected_versions"],
                lat["update_seconds"]["p50"],
                lat["version_interval_s"]["p50"],
                busy,
            ]
        )
    lat = results["latency"][0]
    print(
        report.table(
            f"2. Feedback latency (s from sending the rating): kto-loop up on {Path(lat['model']).name}, cadence "
            f"{lat['cadence']['min_new_labels']} labels or {lat['cadence']['max_wait_s']:g} s, "
            f"{lat['cadence']['steps_per_update']} steps x {lat['cadence']['micro_batch']}; "
            f"{lat['rate_per_s']:g} ratings/s "
            f"asked for, measured over {lat['measure_s']:g} s (diagnostic {plan.diagnostic_measure_s:g} s)",
            [
                "run",
                "ratings",
                "rate/s",
                "published n",
                "p50",
                "p99",
                "served n",
                "p50",
                "p99",
                "held out",
                "never",
                "versions",
                "rejected",
                "update s p50",
                "interval s p50",
                "cores busy",
            ],
            rows,
        )
    )
    for lat in results["latency"]:
        print(
            f"   {lat['env'] or 'defaults'}: first version status {lat['first_version_status']}; client errors "
            f"{lat['error_count']}; tracebacks in kto-loop up's log {lat['server_log_tracebacks']} "
            f"{lat['server_log_errors'][:2]}"
        )
    print()


if __name__ == "__main__":  # the side worker's former entry point, still accepted
    from bench.learner_sides import worker

    worker(sys.argv[1:])
