"""One run of the learning benchmark: `kto-loop up` on the demo model with a fresh data
directory and the default settings (plus the row's overrides), the base rate measured on
unrated answers, simulated users chatting and rating by the task's rules, then the registry read
back. See bench/learning.py for the plan and what is reported."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.feedback_latency import open_loop_registry
from kto_loop.simulate import Raters, Simulation, Turn, simulate
from testkit.processes import start, stop, wait_ready
from testkit.waiting import wait_for

logger = logging.getLogger("bench.learning")

BASE_USERS = 8
"""Users that measure the base rate (answers only, none rated)."""


@dataclass(frozen=True)
class Task:
    """What the simulated users like, and how they rate."""

    name: str
    raters: Raters
    about: str
    target: float = 0.20
    """The lift at 1,200 ratings the issue asks of this task."""
    max_tokens: int = 8


@dataclass(frozen=True)
class Row:
    """A configuration of the loop and of its users."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    """KTO_* overrides of the defaults (none: the product as shipped)."""
    paced: bool = True
    """Users wait between turns (think time), or send them back to back."""
    poisoned: int = 0
    """Ratings of a burst by raters with the inverted rule, before the honest ones."""


@dataclass
class Outcome:
    """What one run produced, for bench.learning_metrics."""

    task: Task
    row: Row
    seed: int
    base: Simulation
    burst: Simulation | None
    sim: Simulation
    versions: list
    history: list
    started: float
    ended: float
    startup_s: float
    cpu: dict[str, Any]
    active_adapter: Path | None
    """A copy of the adapter active at the end (None: the base model), for offline scoring."""
    errors: list[str] = field(default_factory=list)


def loop_env(model_dir: Path, data_dir: Path, port: int, seed: int, overrides: dict[str, str]) -> dict[str, str]:
    """The environment of `kto-loop up`: this shell's, with every KTO_* setting removed (the
    defaults are the product), then the run's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTO_")}
    env.update(
        {
            "KTO_MODEL": str(model_dir),
            "KTO_MODEL_ID": "kto-loop-demo",
            "KTO_DATA_DIR": str(data_dir),
            "KTO_PORT": str(port),
            "KTO_SEED": str(seed),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(overrides)
    return env


def run_once(
    task: Task, row: Row, seed: int, plan, model_dir: Path, workdir: Path, extra_env: dict[str, str] | None = None
) -> Outcome:
    """Start the loop, measure, stop it; the data directory is removed afterwards."""
    from testkit.ports import free_port

    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    port = free_port()
    env = loop_env(model_dir, data_dir, port, seed, {**row.env, **(extra_env or {})})
    log_path = workdir / "kto-loop-up.log"
    started = time.perf_counter()
    process = start("up", env, log_path, log_level="info", inherit_env=False, cwd=report.REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log_path, timeout_s=180.0)
        startup_s = time.perf_counter() - started
        users, think = (plan.users, plan.think_s) if row.paced else (plan.unpaced_users, 0.0)
        chat = {"max_tokens": task.max_tokens, "users": users, "think_time": think}
        base = simulate(
            url,
            ratings=plan.base_answers,
            raters=task.raters,
            rate=False,
            seed=seed + 10**6,
            max_tokens=task.max_tokens,
            users=BASE_USERS,
        )
        meter = report.CpuMeter()
        t0 = time.time()
        burst = None
        if row.poisoned:
            burst = poison(url, data_dir, task, row, seed, chat)
        sim = simulate(url, ratings=plan.ratings, raters=task.raters, seed=seed, **chat)
        t1 = time.time()
        cpu = meter.stop()
        registry = open_loop_registry(data_dir)
        try:
            versions, history, active = registry.list_versions(), registry.history(), registry.active()
            active_adapter = None
            if active is not None:
                active_adapter = workdir / "active-adapter"
                shutil.copytree(registry.adapter_path(active), active_adapter)
        finally:
            registry.close()
    except BaseException:
        stop(process)
        logger.error("kto-loop up's log ends with:\n%s", log_path.read_text(errors="replace")[-4000:])
        raise
    stop(process)
    log_text = log_path.read_text(errors="replace")
    if "Traceback (most recent call last)" in log_text:
        logger.warning(
            "%s/%s/seed %d: the loop logged a traceback:\n%s",
            task.name,
            row.name,
            seed,
            log_text[log_text.index("Traceback") :][:3000],
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    errors = base.errors + (burst.errors if burst else []) + sim.errors
    return Outcome(task, row, seed, base, burst, sim, versions, history, t0, t1, startup_s, cpu, active_adapter, errors)


def poison(url: str, data_dir: Path, task: Task, row: Row, seed: int, chat: dict[str, Any]) -> Simulation:
    """The poisoned labels: `row.poisoned` answers of the base model, then a batch of ratings of
    them with every label inverted, arriving at once (a bad label source: a broken rule, judge or
    annotation job; Turn.liked stays the honest verdict). The learner trains on them and
    canaries the result; honest users, who start once that canary does, judge it. Their answers
    came before any canary, so the canary counts none of the bad ratings as evidence: raters who
    go on lying to the canary itself would get it promoted, and no test on ratings can tell."""
    import httpx

    answers = simulate(
        url,
        ratings=row.poisoned,
        raters=task.raters,
        rate=False,
        seed=seed + 2 * 10**6,
        max_tokens=chat["max_tokens"],
        users=BASE_USERS,
    )
    turns = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for turn in answers.turns:
            vote = client.post(
                "/v1/feedback",
                headers={"X-User-Id": turn.user},
                json={"response_id": turn.response_id, "label": "down" if turn.liked else "up"},
            )
            vote.raise_for_status()
            turns.append(replace(turn, desirable=not turn.liked, feedback_id=vote.json()["id"], rated_at=time.time()))
    registry = open_loop_registry(data_dir)
    try:
        wait_for(
            lambda: registry.canary() is not None or registry.active() is not None,
            what="a canary or an active version after the burst",
            timeout_s=300,
            interval_s=0.2,
        )
    except AssertionError:  # a result too (the gate refused every version, say): the honest users come anyway
        logger.warning("no canary nor active version 300 s after the poisoned burst")
    finally:
        registry.close()
    return Simulation(turns=turns, errors=answers.errors, serving=answers.serving)


def poisoned(outcome: Outcome) -> dict[str, Any]:
    """The poisoned row: versions trained on the burst's labels (and their descendants), and how
    many of their answers the honest users rated before the canary rolled them back."""
    from bench.learning_metrics import descendants

    burst = outcome.burst
    assert burst is not None  # measured for the poisoned row's runs, which have the burst
    burst_ids = {t.feedback_id for t in burst.turns if t.feedback_id}
    trained = {v.version for v in outcome.versions if burst_ids & set(v.lineage.get("feedback_event_ids", []))}
    bad = descendants(outcome.versions, trained)
    honest_start = outcome.sim.turns[0].at if outcome.sim.turns else outcome.ended
    decided = [
        e
        for e in outcome.history
        if e.version in bad and e.at >= honest_start and e.action in ("canary_rollback", "canary_promote", "activate")
    ]
    first = decided[0] if decided else None
    until = first.at if first else outcome.ended

    def served(turns: list[Turn], start: float) -> int:
        return sum(1 for t in turns if t.version in bad and t.desirable is not None and start <= t.at <= until)

    honest_bad = [t for t in outcome.sim.turns if t.version in bad and t.at <= until]
    others = [t for t in outcome.sim.turns if t.version not in bad and t.at <= until]
    return {
        "poisoned_versions": len(bad),
        "served_poisoned_versions": len({t.version for t in burst.turns + outcome.sim.turns} & bad),
        "outcome": "rolled back"
        if first and first.action == "canary_rollback"
        else ("promoted" if first else "still running at the end"),
        "burst_ratings_of_poisoned": served(burst.turns, 0.0),
        "honest_ratings_of_poisoned": served(outcome.sim.turns, honest_start),
        "honest_rate_of_poisoned": sum(t.liked for t in honest_bad) / len(honest_bad) if honest_bad else None,
        "honest_rate_of_others": sum(t.liked for t in others) / len(others) if others else None,
        "decision_seconds_after_burst": (first.at - honest_start) if first else None,
    }
