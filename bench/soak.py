"""Soak benchmark: the whole loop under steady load for a long time; does anything grow?

    .venv/bin/python -m bench --only soak                 # 30 minutes
    .venv/bin/python -m bench --only soak --minutes 120   # longer
    .venv/bin/python -m bench --only soak --quick         # 30 s smoke run (its own -quick JSON)

The loop is `kto-loop up` (server, learner, labeler) as a user starts it: its own process, a
fresh data directory, the shipped defaults (no KTO_* variable of this shell reaches it; the canary
on, default retention) plus the model (bench_model: the demo-sized one or --model) and an admin
token, which only opens the admin API that the adapter count is read from at the end.

Load: the serving benchmark's 16 clients (bench.live.Clients), each sending back to back a chat
completion (max_tokens 64, temperature 1.0, its own seed) as a new user (`as_someone`, so the
per-user rate limits hold) and then rating it as that user (up when the answer starts with a
vowel). A rating is a feedback request the server accepted (202).

Every few seconds (5, or often enough for 30 samples in a short run): the RSS of each process
and the bytes of each store under the data directory (bench.soak_sampler says how both are
read and grouped). Reported:
- per process: RSS at the start and the end, its maximum, and its slope in MiB per hour, a
  least-squares fit over the samples after the warm-up (the first 15% of the run);
- per store: final and maximum size, and growth per 1,000 ratings (least-squares slope of its
  size against the ratings accepted so far, after the warm-up);
- the registry: versions published (GET /v1/adapters), version directories still on disk at the
  end and at most at any sample, the registry's version bytes at most, and that maximum in
  versions' worth (over the median size of one version directory). The issue's acceptance: with
  default retention, at most (rollback depth + 2) versions' worth, however long the run; a
  target row once version retention has a rollback depth (soak_report.rollback_depth);
- chat and feedback latency (successful requests: p50, p99) over the run and per tenth of it,
  and the requests that failed, by status code (or exception) and kind.
The analysis and the tables are bench/soak_report.py's. Numbers are reported, never enforced.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench import soak_sampler as sampler
from bench.live import ADMIN_TOKEN, Clients, Reply, as_someone, bench_model, complete
from bench.soak_report import analyse, make_targets, print_tables
from testkit.processes import start, stop, wait_ready

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    minutes: float = 30.0
    clients: int = 16  # the serving benchmark's top level
    max_tokens: int = 64
    sample_s: float = 5.0  # at most; a short run samples more often (at least 30 samples)
    warmup_fraction: float = 0.15  # of the run, left out of the slopes
    windows: int = 10  # latency per window of the run


QUICK_MINUTES = 0.5


def run(options) -> Path:
    minutes = options.minutes or (QUICK_MINUTES if options.quick else Plan.minutes)
    plan = Plan(minutes=minutes)
    with tempfile.TemporaryDirectory(prefix="kto-bench-soak-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_path, model_id = bench_model(options, tmp)
        result = soak(plan, model_path, model_id, tmp)
    device = result.pop("device")
    targets = make_targets(result)
    print_tables(result, targets, plan)
    payload = {
        "suite": "soak",
        "quick": options.quick,
        "machine": report.machine_info(device, "float32" if device == "cpu" else "bfloat16"),
        "model": {"path": str(options.model or "demo (built in a temp dir)"), "id": model_id},
        "plan": asdict(plan),
        "results": result,
        "targets": [t.to_json() for t in targets],
    }
    name = f"soak-{device}" + ("-quick" if options.quick else "")
    path = report.write_json(name, payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


def soak(plan: Plan, model_path: Path, model_id: str, tmp: Path) -> dict[str, Any]:
    """Start the loop, load it for `plan.minutes` while sampling, stop it; the analysis."""
    import torch

    from bench.learning_run import loop_env
    from testkit.ports import free_port

    data_dir, port = tmp / "data", free_port()
    data_dir.mkdir()
    env = loop_env(model_path, data_dir, port, 0, {"KTO_MODEL_ID": model_id, "KTO_ADMIN_TOKEN": ADMIN_TOKEN})
    env.pop("KTO_SEED")  # its default
    log_path = tmp / "kto-loop-up.log"  # outside the data directory: not a store
    url = f"http://127.0.0.1:{port}"
    logger.info("starting kto-loop up on port %d for %g minutes of load", port, plan.minutes)
    process = start("up", env, log_path, log_level="warning", inherit_env=False, cwd=report.REPO_ROOT)
    try:
        wait_ready(process, url, log_path, timeout_s=180.0)
        seconds = plan.minutes * 60
        load = Load(url, plan)
        samples = Sampler(process.pid, data_dir, load, max(1.0, min(plan.sample_s, seconds / 30)))
        load.start()
        samples.start()
        ends = time.monotonic() + seconds
        while time.monotonic() < ends and process.poll() is None:
            time.sleep(min(1.0, max(0.0, ends - time.monotonic())))
        exited = process.poll()
        load.stop()
        samples.stop()
        adapters = list_adapters(url) if exited is None else {"versions": []}
    except BaseException:
        stop(process)
        logger.error("kto-loop up's log ends with:\n%s", log_path.read_text(errors="replace")[-4000:])
        raise
    stop(process)
    if exited is not None:
        logger.error("kto-loop up exited with %s during the run; its log:\n%s", exited, log_path.read_text()[-4000:])
    log_text = log_path.read_text(errors="replace")
    result = analyse(plan, samples, load, adapters)
    result["up_exited_early"] = exited
    result["log_tracebacks"] = log_text.count("Traceback (most recent call last)")
    result["device"] = "cuda" if torch.cuda.is_available() else "cpu"  # where `up` put the model
    return result


def list_adapters(url: str) -> dict[str, Any]:
    reply = httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
    reply.raise_for_status()
    return reply.json()


# ---- the load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str  # chat | feedback
    at: float  # sent, seconds after the load started
    seconds: float
    status: str  # "ok", the HTTP status of a refusal, or the exception's name


class Load:
    """`plan.clients` clients that each chat as a new user and rate the answer, back to back."""

    def __init__(self, url: str, plan: Plan):
        self.url, self.plan = url, plan
        self.requests: list[Request] = []
        self.ratings = 0
        self._lock = threading.Lock()
        self._pool = Clients(plan.clients, self.chat_and_rate, seed_base=int(time.time()) % 1_000_000)
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def chat_and_rate(self, client: httpx.Client, seed: int) -> Reply:
        user = as_someone()
        reply = self._send(
            "chat",
            lambda: complete(
                client, self.url, max_tokens=self.plan.max_tokens, temperature=1.0, seed=seed, headers=user
            ),
        )
        label = "up" if reply.text.lstrip().lower().startswith(tuple("aeiou")) else "down"
        body = {"response_id": reply.response_id, "label": label}
        rate = lambda: client.post(f"{self.url}/v1/feedback", json=body, headers=user).raise_for_status()
        self._send("feedback", rate)
        with self._lock:
            self.ratings += 1
        return reply

    def _send(self, kind: str, call):
        started, status = time.monotonic(), "ok"
        try:
            return call()
        except httpx.HTTPStatusError as exc:
            status = str(exc.response.status_code)
            raise  # Clients counts and logs it
        except Exception as exc:
            status = type(exc).__name__
            raise
        finally:
            done = Request(kind, started - self._t0, time.monotonic() - started, status)
            with self._lock:
                self.requests.append(done)


class Sampler:
    """Every `interval_s` (and once more at `stop`): seconds into the load, ratings so far, each
    process row's RSS and each store's bytes."""

    def __init__(self, root_pid: int, data_dir: Path, load: Load, interval_s: float):
        self.root_pid, self.data_dir, self.load, self.interval_s = root_pid, data_dir, load, interval_s
        self.samples: list[dict[str, Any]] = []
        self.pids: dict[str, set[int]] = defaultdict(set)
        self.version_bytes: dict[str, int] = {}  # each version directory's size when last seen
        self.files: dict[str, set[str]] = defaultdict(set)  # store -> every file name seen in it
        self.last = sampler.Disk()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.sample()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.sample()
            next_at += self.interval_s

    def sample(self) -> None:
        rss: dict[str, float] = {}
        for pid, row in sampler.process_tree(self.root_pid).items():
            mib = sampler.rss_mib(pid)
            if mib is not None:
                rss[row] = rss.get(row, 0.0) + mib
                self.pids[row].add(pid)
        self.last = disk = sampler.scan(self.data_dir)
        self.version_bytes.update(disk.versions)
        for store, names in disk.files.items():
            self.files[store] |= names
        self.samples.append(
            {
                "t": self.load.elapsed(),
                "ratings": self.load.ratings,
                "rss_mib": rss,
                "stores": disk.stores,
                "version_dirs": len(disk.versions),
            }
        )
