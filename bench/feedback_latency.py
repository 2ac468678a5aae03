"""Learner benchmark, part 2: feedback -> published -> served latency of `kto-loop up`.

See bench/learner.py's docstring for what is measured and how; `bench.learner.run` calls
`measure_latency` with its `Plan`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from bench import report
from testkit.processes import assert_running, start, stop, wait_ready
from testkit.waiting import wait_for

if TYPE_CHECKING:
    from bench.learner import Plan

logger = logging.getLogger("bench.learner")


@dataclass
class Sent:
    event_id: str
    response_id: str
    sent_at: float
    measured: bool


def measure_latency(plan: Plan, model_dir: Path, tmp: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    from learner.loop import held_out
    from learner.settings import LearnerSettings
    from testkit.ports import free_port

    tmp.mkdir(parents=True, exist_ok=True)
    data_dir = tmp / "loop-data"
    port = free_port()
    env = {**os.environ, "KTO_MODEL": str(model_dir), "KTO_DATA_DIR": str(data_dir), "KTO_PORT": str(port)}
    for name in [k for k in env if k.startswith("KTO_") and k not in ("KTO_MODEL", "KTO_DATA_DIR", "KTO_PORT")]:
        env.pop(name)  # the defaults, whatever this shell has set
    env.update(extra_env or {})
    defaults = LearnerSettings(_env_file=None, data_dir=data_dir)
    logger.info(
        "starting kto-loop up on port %d (learner cadence: %d labels or %.0f s)",
        port,
        defaults.min_new_labels,
        defaults.max_wait_s,
    )
    log_path = tmp / "kto-loop-up.log"
    process = start("up", env, log_path, log_level="warning", inherit_env=False, cwd=report.REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        wait_ready(process, url, log_path, timeout_s=180.0)
        startup_s = time.perf_counter() - started
        meter = report.CpuMeter()
        driver = Driver(url, plan)
        driver.start()
        registry = open_loop_registry(data_dir)
        try:

            def published() -> list:
                assert_running(process)
                return registry.list_versions()

            wait_for(
                published,
                what="a version published during the warm-up (is the learner running?)",
                timeout_s=plan.warmup_timeout_s,
                interval_s=0.5,
            )
            warmup_s = time.perf_counter() - started - startup_s
            logger.info("first version published; measuring for %.0f s", plan.measure_s)
            driver.measuring.set()
            time.sleep(plan.measure_s)
            driver.measuring.clear()
            drain_started = time.monotonic()
            while time.monotonic() - drain_started < plan.drain_s:
                analysis = analyse(driver, registry.list_versions(), held_out, defaults.held_out_fraction)
                if analysis["pending"] == 0:
                    break
                time.sleep(1.0)
            drained_s = time.monotonic() - drain_started
        finally:
            driver.stop()
        versions = registry.list_versions()
        registry.close()
        cpu = meter.stop()
    except BaseException:
        stop(process)
        logger.error("kto-loop up's log ends with:\n%s", log_path.read_text(errors="replace")[-4000:])
        raise
    stop(process)
    server_log = log_path.read_text(errors="replace")
    analysis = analyse(driver, versions, held_out, defaults.held_out_fraction)
    rejected = [v for v in versions if v.status == "rejected"]
    return {
        "env": extra_env or {},
        "model": str(model_dir),
        "rate_per_s": plan.rate_per_s,
        "users": plan.users,
        "max_tokens": plan.max_tokens,
        "cadence": {
            "min_new_labels": defaults.min_new_labels,
            "max_wait_s": defaults.max_wait_s,
            "steps_per_update": defaults.steps_per_update,
            "micro_batch": defaults.micro_batch,
            "held_out_fraction": defaults.held_out_fraction,
        },
        "startup_s": startup_s,
        "warmup_s": warmup_s,
        "measure_s": plan.measure_s,
        "drain_s": drained_s,
        "achieved_rate_per_s": driver.measured_count() / plan.measure_s,
        "chats": len(driver.chats),
        "errors": driver.errors[:10],
        "error_count": len(driver.errors),
        "versions": len(versions),
        "rejected_versions": len(rejected),
        "rejected_reasons": sorted({v.rejected_reason or "" for v in rejected})[:5],
        "update_seconds": report.summary(
            [v.metrics.get("seconds") for v in versions if isinstance(v.metrics.get("seconds"), (int, float))]
        ),
        "version_interval_s": report.summary([b.created_at - a.created_at for a, b in zip(versions, versions[1:])]),
        "per_version": per_version(versions),
        "server_log_tracebacks": server_log.count("Traceback (most recent call last)"),
        "server_log_errors": [
            line
            for line in server_log.splitlines()
            if line.startswith(("concurrent.", "RuntimeError", "ValueError")) or " ERROR " in line
        ][:5],
        "cpu": cpu,
        **analysis,
    }


def per_version(versions) -> list[dict[str, Any]]:
    """For each version: how many labels were fresh, how many of them it was the first to train on."""
    seen: set[str] = set()
    rows = []
    for v in sorted(versions, key=lambda v: v.created_at):
        events = set(v.lineage.get("feedback_event_ids", []))
        rows.append(
            {
                "version": v.version,
                "status": v.status,
                "created_at": v.created_at,
                "fresh_examples": v.lineage.get("fresh_examples"),
                "first_trained_here": len(events - seen),
                "trained_examples": len(events),
                "update_s": v.metrics.get("seconds"),
                "newest_label_to_publish_s": v.created_at - v.lineage["newest_label_at"]
                if isinstance(v.lineage.get("newest_label_at"), (int, float))
                else None,
            }
        )
        seen |= events
    return rows


def open_loop_registry(data_dir: Path):
    from registry import open_registry

    path = data_dir / "registry" / "registry.sqlite3"
    # serve creates it at start-up: it is there once /readyz said so
    wait_for(path.exists, what=f"the registry at {path}", timeout_s=60, interval_s=0.2)
    return open_registry(f"sqlite:///{path}")


class Driver:
    """`users` threads that each chat and rate at rate/users per second, on a fixed schedule.

    Every chat response is kept (arrival time, the `model` that answered) to find when a version
    was first served; every rating sent while `measuring` is set is measured."""

    def __init__(self, url: str, plan: Plan):
        self.url, self.plan = url, plan
        self.measuring = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sent: list[Sent] = []
        self.chats: list[tuple[float, str]] = []  # (received_at, model)
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(plan.users)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def measured_count(self) -> int:
        return sum(s.measured for s in self.sent)

    def _user(self, number: int) -> None:
        import httpx

        from kto_loop.simulate import PROMPTS

        period = self.plan.users / self.plan.rate_per_s
        next_at = time.monotonic() + number * period / self.plan.users
        rng = random.Random(number)
        with httpx.Client(base_url=self.url, timeout=60, headers={"X-User-Id": f"bench-{number}"}) as client:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    if self._stop.is_set():
                        return
                next_at = max(next_at + period, time.monotonic() - period)  # steady; no burst to catch up
                try:
                    reply = client.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                            "max_tokens": self.plan.max_tokens,
                            "temperature": 1.0,
                        },
                    )
                    reply.raise_for_status()
                    body = reply.json()
                    with self._lock:
                        self.chats.append((time.time(), body["model"]))
                    desirable = body["choices"][0]["message"]["content"].lstrip().lower().startswith(tuple("aeiou"))
                    measured = self.measuring.is_set()
                    sent_at = time.time()
                    vote = client.post(
                        "/v1/feedback", json={"response_id": body["id"], "label": "up" if desirable else "down"}
                    )
                    vote.raise_for_status()
                    with self._lock:
                        self.sent.append(Sent(vote.json()["id"], body["id"], sent_at, measured))
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    with self._lock:
                        self.errors.append(repr(exc))


def analyse(driver: Driver, versions, held_out, held_out_fraction: float) -> dict[str, Any]:
    """published / served latency of every measured rating, from the registry's lineage."""
    from bench.learning_metrics import descendants

    with driver._lock:
        sent = [s for s in driver.sent if s.measured]
        chats = sorted(driver.chats)
    versions = sorted(versions, key=lambda v: v.created_at)
    first_in: dict[str, Any] = {}
    for v in versions:
        for event_id in v.lineage.get("feedback_event_ids", []):
            first_in.setdefault(event_id, v)
    containing_cache: dict[str, set[str]] = {}
    published, served, first_status = [], [], {"ready": 0, "rejected": 0}
    pending = held = 0
    for s in sent:
        if held_out(SimpleNamespace(response_id=s.response_id), held_out_fraction):
            held += 1
            continue
        version = first_in.get(s.event_id)
        if version is None:
            pending += 1
            continue
        first_status[version.status] = first_status.get(version.status, 0) + 1
        published.append(version.created_at - s.sent_at)
        key = s.event_id
        if key not in containing_cache:
            containing = {v.version for v in versions if key in v.lineage.get("feedback_event_ids", [])}
            containing_cache[key] = descendants(versions, containing)
        hit = next((t for t, model in chats if t >= version.created_at and model in containing_cache[key]), None)
        if hit is None:
            pending += 1  # published, not served yet (e.g. only in rejected versions so far)
            continue
        served.append(hit - s.sent_at)
    return {
        "measured_ratings": len(sent),
        "held_out": held,
        "pending": pending,
        "first_version_status": first_status,
        "published_s": report.summary(published),
        "served_s": report.summary(served),
    }
