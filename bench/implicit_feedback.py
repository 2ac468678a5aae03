"""Implicit feedback end to end: do users who never press a thumb, only regenerate what they
dislike and copy what they like, teach the loop a rule as thumbs do?

    .venv/bin/python -m bench --only implicit-feedback          # 3 seeds x 4 modes: ~50 min on 2 cores
    .venv/bin/python -m bench --only implicit-feedback --seeds 1 --tasks thumbs,implicit
    .venv/bin/python -m bench --only implicit-feedback --quick  # 1 seed of thumbs and implicit, 400 labels

Each run is one of the learning benchmark's (bench/learning_run.py): `kto-loop up` on the demo
model with every setting at its default (canary and gate on), the base rate measured on 400
unrated answers, then 60 users at a human pace (4-12 s per turn) who like answers starting with
H, L or T (base ~0.30) until 1,000 labels were sent. The modes differ only in how users label:
a thumb on every answer, or `regenerate` (then the same prompt again) on a disliked one and
`copy` on a liked one. Two more pair up shyer users: `implicit-copy-0.25` copies only a quarter
of liked answers, `thumbs-rate-0.25` thumbs up only a quarter (the learning benchmark's 1:9).
Same seeds, one run at a time, the modes alternating so the box's load falls on all.

Reported per run, the rate users saw (the rule's verdict on every answer, labeled or not): the
base, the first and last windows of 200 labels, the lift of the last over the base with its
one-sided p-value, the labels needed until a window is +0.15 over the base at p < 0.01 (the
issue's bar), and the CLI's figures (first 100 against last 100 answers). Results go to
bench/results/implicit-feedback-cpu.json and .md; docs/benchmarks.md has the table.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import learning_metrics as lm
from bench import report
from bench.learning import measure
from bench.learning_run import Outcome, Row, Task, run_once
from kto_loop.simulate import Raters, parse_rule, two_proportion_p

logger = logging.getLogger("bench.implicit_feedback")

HLT = parse_rule("prefix:HLT")
MODES = [
    Task("thumbs", Raters((HLT,)), "a thumb on every answer", target=0.15),
    Task("implicit", Raters((HLT,), feedback="implicit"), "regenerate disliked, copy liked", target=0.15),
    Task(
        "thumbs-rate-0.25",
        Raters((HLT,), rate_liked=0.25),
        "a thumb on every disliked answer, on a quarter of liked",
        target=0.15,
    ),
    Task(
        "implicit-copy-0.25",
        Raters((HLT,), feedback="implicit", copy_liked=0.25),
        "regenerate disliked, copy a quarter of liked",
        target=0.15,
    ),
]
DEFAULTS = Row("defaults")
LIFT, ALPHA = 0.15, 0.01
"""The issue's bar: the rate users saw up by this much over the base, one-sided p below this."""


@dataclass(frozen=True)
class Plan:
    """The fields bench.learning_run.run_once reads, and which modes and seeds run."""

    seeds: int = 3
    ratings: int = 1000
    users: int = 60
    think_s: float = 8.0
    unpaced_users: int = 40
    base_answers: int = 400
    tasks: tuple[str, ...] = tuple(m.name for m in MODES)


QUICK = Plan(seeds=1, ratings=400, base_answers=200, tasks=("thumbs", "implicit"))


def until(turns, base: tuple[int, int], lift: float = LIFT, alpha: float = ALPHA, step: int = 50) -> int | None:
    """The first multiple of `step` labels at which the window of the last 200 is `lift` over
    the base rate with one-sided p below `alpha`; None if never."""
    for at in range(lm.WIDTH, len(lm.rated_positions(turns)) + 1, step):
        got = lm.lift_at(turns, base, at)
        if got["lift"] >= lift and got["p"] < alpha:
            return at
    return None


def record(outcome: Outcome) -> dict[str, Any]:
    """bench.learning's record of one run, plus this suite's figures."""
    out = measure(outcome, None)
    turns = outcome.sim.turns
    base = (out["base"]["liked"], out["base"]["answers"])
    k = min(100, len(turns) // 2)
    first, last = sum(t.liked for t in turns[:k]), sum(t.liked for t in turns[-k:])
    signals = [t.signal for t in turns if t.desirable is not None]
    out.update(
        mode=outcome.task.name,
        first_200=lm.lift_at(turns, base, lm.WIDTH),
        until_plus_0_15=until(turns, base),
        cli={"answers": k, "first": first / k, "last": last / k, "p": two_proportion_p(first, k, last, k)},
        labels={
            "thumbs": signals.count(None),
            "regenerate": signals.count("regenerate"),
            "copy": signals.count("copy"),
        },
    )
    return out


def run(options) -> Path:
    from foundation.models import ensure_demo_model

    plan = QUICK if options.quick else Plan()
    if getattr(options, "seeds", None):
        plan = Plan(**{**asdict(plan), "seeds": options.seeds})
    if getattr(options, "tasks", None):
        plan = Plan(**{**asdict(plan), "tasks": tuple(options.tasks.split(","))})
    modes = [m for m in MODES if m.name in plan.tasks]
    todo = [(mode, seed) for seed in range(plan.seeds) for mode in modes]  # alternating, one at a time
    logger.info("implicit feedback: %d runs of %d labels, one at a time", len(todo), plan.ratings)
    started, records = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="kto-bench-implicit-") as tmp:
        model_dir = ensure_demo_model(Path(tmp))
        for i, (mode, seed) in enumerate(todo):
            workdir = Path(tmp) / f"{i:03d}"
            workdir.mkdir()
            try:
                rec = record(run_once(mode, DEFAULTS, seed, plan, model_dir, workdir))
            except Exception:  # a benchmark reports a failed run, it does not stop
                logger.exception("run %s/seed %d failed", mode.name, seed)
                records.append({"mode": mode.name, "seed": seed, "failed": True})
                continue
            records.append(rec)
            logger.info(
                "done %s/seed %d: base %.2f -> %.2f (%+.2f, p %.2g); +%.2f at p<%.2g after %s labels (%.0f min)",
                mode.name,
                seed,
                rec["base"]["rate"],
                rec["at_end"]["rate"],
                rec["at_end"]["lift"],
                rec["at_end"]["p"],
                LIFT,
                ALPHA,
                rec["until_plus_0_15"],
                (time.perf_counter() - started) / 60,
            )
    name = "implicit-feedback-cpu" + ("-quick" if options.quick else "")
    markdown = table(records)
    print(markdown)
    payload = {
        "suite": "implicit-feedback",
        "quick": options.quick,
        "machine": report.machine_info("cpu", "float32"),
        "plan": asdict(plan),
        "bar": {"lift": LIFT, "p_below": ALPHA},
        "modes": [
            {"name": m.name, "about": m.about, "feedback": m.raters.feedback, "copy_liked": m.raters.copy_liked}
            for m in modes
        ],
        "wall_minutes": (time.perf_counter() - started) / 60,
        "runs": records,
    }
    path = report.write_json(name, payload, options.results_dir)
    (options.results_dir / f"{name}.md").write_text(markdown)
    return path


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of docs/benchmarks.md: one row per run."""
    head = (
        "| mode | seed | labels (regenerate/copy) | base | first 200 labels | last 200 labels | lift | p "
        "| labels to +0.15, p<0.01 | CLI: first → last 100 answers (p) | canaries promoted / rolled back "
        "| gate refused |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for r in records:
        if r.get("failed"):
            rows.append(f"| {r['mode']} | {r['seed']} | failed | | | | | | | | | |")
            continue
        n, end, cli, v = r["labels"], r["at_end"], r["cli"], r["versions"]
        kinds = f" ({n['regenerate']}/{n['copy']})" if n["regenerate"] or n["copy"] else ""
        rows.append(
            f"| {r['mode']} | {r['seed']} | {r['ratings']}{kinds} | {r['base']['rate']:.2f} "
            f"| {r['first_200']['rate']:.2f} | {end['rate']:.2f} | {end['lift']:+.2f} | {end['p']:.1e} "
            f"| {r['until_plus_0_15'] or 'never'} | {cli['first']:.2f} → {cli['last']:.2f} ({cli['p']:.1e}) "
            f"| {v['promoted']} / {v['rolled_back']} | {v['gate_refused']} of {v['published']} |"
        )
    return head + "\n".join(rows) + "\n"
