"""Learning benchmark: does the loop, as a user gets it, make the model better from thumbs?

    .venv/bin/python -m bench --only learning            # full plan: 59 runs, about 90 minutes on 2 cores
    .venv/bin/python -m bench --only learning --quick    # smoke run: a few minutes
    .venv/bin/python -m bench --only learning --tasks first-char-0.1 --rows defaults --seeds 2 \\
        --env KTO_BETA=0.3 --tag beta03                  # an extra row of one's own (its own JSON)

The tasks, rows, columns and targets, and how each is measured: docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import learning_metrics as lm
from bench import report
from bench.learning_run import Outcome, Row, Task, poisoned, run_once
from kto_loop.simulate import Raters, parse_rule

logger = logging.getLogger("bench.learning")

HLT = parse_rule("prefix:HLT")
TASKS = [
    Task("first-char-0.1", Raters((parse_rule("prefix:aeiou"),)), "starts with a lowercase vowel"),
    Task("first-char-0.3", Raters((HLT,)), "starts with H, L or T"),
    Task("avoid-word", Raters((parse_rule("avoid:good"),)), "does not contain the word 'good'"),
    Task("length", Raters((parse_rule("shorter-than:20"),)), "shorter than 20 characters"),
    Task("noisy", Raters((HLT,), flip=0.2), "starts with H, L or T; 20% of labels flipped", target=0.15),
    Task(
        "1:9", Raters((HLT,), rate_liked=0.25), "starts with H, L or T; a quarter of liked answers rated", target=0.15
    ),
]
ROWS = [
    Row("defaults"),
    Row("canary off", {"KTO_CANARY_SHARE": "0"}),
    Row("defaults, unpaced", paced=False),
    Row("poisoned", poisoned=400),
]
PRODUCT_ROWS = ("defaults", "poisoned")
POISON_TASK = "first-char-0.3"
LATENCY_TAIL_S = 30.0
"""Ratings this close to a run's end are not measured for feedback -> served."""


@dataclass(frozen=True)
class Plan:
    seeds: int = 5
    """Seeds of the product's rows (`defaults`, `poisoned`)."""
    extra_seeds: int = 2
    """Seeds of the other rows, kept for comparison (at most `seeds`)."""
    ratings: int = 1200
    users: int = 60
    think_s: float = 8.0
    unpaced_users: int = 40
    base_answers: int = 400
    concurrent: int = 3
    offline: bool = True
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS)
    rows: tuple[str, ...] = tuple(r.name for r in ROWS)


QUICK = Plan(
    seeds=1,
    ratings=400,
    base_answers=200,
    tasks=("first-char-0.1", "first-char-0.3"),
    rows=("defaults", "canary off", "poisoned"),
)


def jobs(plan: Plan) -> list[tuple[Task, Row, int]]:
    """Every (task, row, seed) of the plan, the long ones first, seeds interleaved."""
    out = []
    for row in sorted((r for r in ROWS if r.name in plan.rows), key=lambda r: (not r.paced, -r.poisoned)):
        seeds = plan.seeds if row.name in PRODUCT_ROWS else min(plan.seeds, plan.extra_seeds)
        for seed in range(seeds):
            for task in TASKS:
                if task.name in plan.tasks and (not row.poisoned or task.name == POISON_TASK):
                    out.append((task, row, seed))
    return out


def measure(outcome: Outcome, offline: dict[str, Any] | None) -> dict[str, Any]:
    """One run's record: bench.learning_metrics on its turns and registry."""
    from learner.loop import held_out
    from learner.settings import LearnerSettings

    turns, base_turns = outcome.sim.turns, outcome.base.turns
    base = (sum(t.liked for t in base_turns), len(base_turns))
    fraction = LearnerSettings(_env_file=None).held_out_fraction
    record: dict[str, Any] = {
        "task": outcome.task.name,
        "row": outcome.row.name,
        "seed": outcome.seed,
        "env": outcome.row.env,
        "base": {"answers": base[1], "liked": base[0], "rate": base[0] / base[1]},
        "ratings": len(lm.rated_positions(turns)),
        "answers": len(turns),
        "seconds": outcome.ended - outcome.started,
        "startup_s": outcome.startup_s,
        "curve": lm.curve(turns),
        "at_600": lm.lift_at(turns, base, 600),
        "at_1200": lm.lift_at(turns, base, 1200),
        "ratings_until_plus_0_2": lm.ratings_until(turns, base[0] / base[1]),
        "holds": lm.holds(turns),
        "versions": lm.version_counts(outcome.versions, outcome.history),
        "gate": lm.gate_log(outcome.versions),
        "feedback_to_served": lm.feedback_to_served(
            turns, outcome.versions, lambda rid: held_out(_Ref(rid), fraction), outcome.ended - LATENCY_TAIL_S
        ),
        "errors": len(outcome.errors),
        "cpu": outcome.cpu,
    }
    record["at_end"] = lm.lift_at(turns, base, record["ratings"])
    if outcome.burst is not None:
        record["poisoned"] = poisoned(outcome)
    if offline is not None:
        record["offline"] = offline
    return record


@dataclass(frozen=True)
class _Ref:
    response_id: str


def run(options) -> Path:
    from foundation.models import ensure_demo_model

    plan = QUICK if options.quick else Plan()
    overrides: dict[str, Any] = {
        "tasks": tuple(options.tasks.split(",")) if getattr(options, "tasks", None) else None,
        "rows": tuple(options.rows.split(",")) if getattr(options, "rows", None) else None,
        "seeds": getattr(options, "seeds", None),
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    extra_env = dict(e.split("=", 1) for e in getattr(options, "env", None) or [])
    todo = jobs(plan)
    logger.info(
        "learning: %d runs (%d at a time); pace %d users x %.0f s think",
        len(todo),
        plan.concurrent,
        plan.users,
        plan.think_s,
    )
    started, records, outcomes = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory(prefix="kto-bench-learning-") as tmp, ThreadPoolExecutor(plan.concurrent) as pool:
        model_dir = ensure_demo_model(Path(tmp))  # what `make run` builds, built the same way
        futures = {
            pool.submit(_one, task, row, seed, plan, model_dir, Path(tmp) / f"{i:03d}", extra_env): (
                task.name,
                row.name,
                seed,
            )
            for i, (task, row, seed) in enumerate(todo)
        }
        for future in as_completed(futures):
            key = futures[future]
            try:
                record, outcome = future.result()
            except Exception:  # a benchmark reports a failed run, it does not stop
                logger.exception("run %s failed", key)
                records.append({"task": key[0], "row": key[1], "seed": key[2], "failed": True})
                continue
            records.append(record)
            outcomes[key] = outcome
            logger.info(
                "done %s/%s/seed %d: base %.2f -> %.2f at the end (%d of %d runs, %.0f min)",
                *key,
                record["base"]["rate"],
                record["at_end"]["rate"],
                len(records),
                len(todo),
                (time.perf_counter() - started) / 60,
            )
    from bench.learning_report import print_tables, save_curves, summarize

    summary = summarize(records, TASKS, plan)
    print_tables(summary, records)
    name = (
        "learning-cpu"
        + ("-quick" if options.quick else "")
        + (f"-{options.tag}" if getattr(options, "tag", None) else "")
    )
    png = save_curves(summary, outcomes, options.results_dir / f"{name}.png")
    payload = {
        "suite": "learning",
        "quick": options.quick,
        "machine": report.machine_info("cpu", "float32"),
        "plan": asdict(plan),
        "extra_env": extra_env,
        "tasks": [_task_json(t) for t in TASKS],
        "rows": [asdict(r) for r in ROWS],
        "wall_minutes": (time.perf_counter() - started) / 60,
        "summary": summary,
        "runs": sorted(records, key=lambda r: (r["task"], r["row"], r["seed"])),
        "curves_png": png.name,
    }
    path = report.write_json(name, payload, options.results_dir)
    logger.info("wrote %s and %s", path, png)
    return path


def _one(
    task: Task, row: Row, seed: int, plan: Plan, model_dir: Path, workdir: Path, extra_env: dict[str, str]
) -> tuple[dict[str, Any], Outcome]:
    from bench.offline_kto import run_offline

    workdir.mkdir(parents=True)
    outcome = run_once(task, row, seed, plan, model_dir, workdir, extra_env)
    offline = None
    if plan.offline and row.name == "defaults":
        offline = run_offline(
            model_dir,
            outcome.sim.turns,
            [str(r) for r in task.raters.rules],
            max_tokens=task.max_tokens,
            seed=seed,
            active_adapter=outcome.active_adapter,
            workdir=workdir,
        )
    return measure(outcome, offline), outcome


def _task_json(task: Task) -> dict[str, Any]:
    return {
        "name": task.name,
        "about": task.about,
        "rules": [str(r) for r in task.raters.rules],
        "flip": task.raters.flip,
        "rate_liked": task.raters.rate_liked,
        "target": task.target,
        "max_tokens": task.max_tokens,
    }
