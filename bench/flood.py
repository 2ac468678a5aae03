"""Flood benchmark: one client floods the server while other users chat; are they still served?

    .venv/bin/python -m bench --only flood           # 9 rows of 60 s, about 10 minutes
    .venv/bin/python -m bench --only flood --quick   # 9 rows of 12 s, about 3 minutes

The server is `kto-loop serve` in its own process (testkit.processes) on the demo-sized model
(or --model), with the product's defaults, rate limits included, except KTO_AUTH (the row's
mode), KTO_ADMIN_TOKEN and a temporary KTO_DATA_DIR. KTO_TORCH_THREADS is left unset, as the
serving benchmark leaves it (torch's default: every core). Its log level is `warning`, as in
the other suites, so no access line is written per request.

Normal users: 4 threads of this process, each its own user, each sending one greedy
(temperature 0) completion of the same prompt with max_tokens 16 every second on a fixed
schedule (60 a minute, half the per-user chat limit); each request's latency is measured.
The flooder: a process of its own (so that its threads do not hold this process's GIL while
the users' latencies are timed), 8 or 64 connections each sending the same completion again as
soon as it is answered.

Servers, each measured unloaded and then under each flood, every row for the same time:
1. `api-key`: every user has their own API key (issued through POST /v1/users/{user}/keys);
   the flooder holds one key of its own (from 127.0.0.1, a trusted address: only its per-user
   chat limit applies).
2. `header`: users send X-User-Id from 127.0.0.1 (a trusted proxy); the flooder connects from
   127.0.0.2 (not trusted) with a new X-User-Id per request: an anonymous caller, limited only
   by its address's chat limit.
3. An extra row, not the product: `api-key` with KTO_RATE_LIMIT_DELAY_S=0, each 429 answered at
   once: the flooder then sends as fast as it is refused, and refusing (about a millisecond of
   the server's CPU each) is what the other users wait behind.

Baseline: the unloaded row of the same server, just before the floods. Target (the issue's):
users' p50 latency under a flood <= 1.5x the unloaded p50; reported, never enforced. A moving
window lets the flooder's first allowance through at once (120 requests per key, 600 per
address) before the 429s start; those completions compete with the users' and are part of the
measurement; the users' p50 after the flooder's first 429 leaves them out. The server's, the
flooder's and other processes' CPU (cores) are reported with each row: on a small box the
flood's own client and its 429s compete for the same cores.
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

from bench import report
from bench.flooder import FLOOD_ADDRESS, Flooder
from testkit.processes import start, stop, wait_ready

logger = logging.getLogger(__name__)

SERVERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("api-key", "api-key", {}),
    ("header", "header", {}),
    # An extra row, not the product: a 429 answered at once shows what the hold is for.
    ("api-key, no hold before a 429", "api-key", {"KTO_RATE_LIMIT_DELAY_S": "0"}),
)
"""(row name prefix, KTO_AUTH, settings on top of the defaults)."""


@dataclass(frozen=True)
class Plan:
    row_s: float = 60.0  # each row's measured time
    users: int = 4
    period_s: float = 1.0  # each user: one request per period
    max_tokens: int = 16
    flood_connections: tuple[int, ...] = (8, 64)  # one flood row each: a script, and a wider one
    warmup: int = 3  # requests per user before the first row (not measured)


FULL = Plan()
QUICK = Plan(row_s=12.0)


def run(options) -> Path:
    from bench.live import ADMIN_TOKEN, PROMPT, bench_model
    from serve.settings import ServeSettings

    plan = QUICK if options.quick else FULL
    body = {"messages": PROMPT, "max_tokens": plan.max_tokens, "temperature": 0.0}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kto-bench-flood-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_path, model_id = bench_model(options, tmp)
        for n, (name, mode, extra) in enumerate(SERVERS):
            rows += measure_mode(name, mode, extra, model_path, model_id, ADMIN_TOKEN, body, plan, tmp / f"server-{n}")
    targets = [
        report.Target(f"{r['name']}: users' p50 / unloaded p50", r["users"]["p50_ratio"], "<=", 1.5, "x")
        for r in rows
        if r["flooder"] is not None
    ]
    print_tables(rows, targets, plan)
    fields = ServeSettings.model_fields
    limits = {n: fields[n].default for n in fields if n.startswith("rate_limit_") and n != "rate_limit_url"}
    payload = {
        "suite": "flood",
        "quick": options.quick,
        "machine": report.machine_info("cpu", "float32"),
        "model": {"path": str(options.model or "demo (built in a temp dir)"), "id": model_id},
        "plan": asdict(plan),
        "request": body,
        "rate_limits": limits,
        "baseline": "the users' p50 latency in the unloaded row of the same auth mode, same server",
        "results": rows,
        "targets": [t.to_json() for t in targets],
    }
    path = report.write_json("flood-cpu" + ("-quick" if options.quick else ""), payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


def measure_mode(
    prefix: str,
    mode: str,
    extra: dict[str, str],
    model_path: Path,
    model_id: str,
    admin_token: str,
    body: dict,
    plan: Plan,
    tmp: Path,
) -> list[dict[str, Any]]:
    """Start a server in `mode` (with `extra` settings), warm it up, measure its unloaded row and
    then a flood row per number of flooding connections."""
    from testkit.ports import free_port

    tmp.mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTO_")}  # the defaults, not this shell's
    env.update(
        KTO_MODEL=str(model_path),
        KTO_MODEL_ID=model_id,
        KTO_DATA_DIR=str(tmp / "data"),
        KTO_PORT=str(port),
        KTO_ADMIN_TOKEN=admin_token,
        KTO_AUTH=mode,
        **extra,
    )
    log_path = tmp / "serve.log"
    url = f"http://127.0.0.1:{port}"
    logger.info("starting kto-loop serve (KTO_AUTH=%s) on port %d", mode, port)
    process = start("serve", env, log_path, log_level="warning", inherit_env=False, cwd=report.REPO_ROOT)
    try:
        wait_ready(process, url, log_path, timeout_s=180.0)
        names = [f"user-{i}" for i in range(plan.users)]
        if mode == "api-key":
            headers = [bearer(issue_key(url, admin_token, name)) for name in names]
            flood_key: str | None = issue_key(url, admin_token, "flooder")
            flood_name = "flood (1 API key, 127.0.0.1)"
        else:
            headers = [{"X-User-Id": name} for name in names]
            flood_key, flood_name = None, f"flood from {FLOOD_ADDRESS} (new X-User-Id each)"
        with httpx.Client(base_url=url, timeout=120) as client:
            for user_headers in headers:
                for _ in range(plan.warmup):
                    client.post("/v1/chat/completions", json=body, headers=user_headers).raise_for_status()
        unloaded = measure_row(f"{prefix} unloaded", url, process.pid, headers, body, plan, None)
        floods = [
            measure_row(
                f"{prefix} {flood_name} x{n} connections", url, process.pid, headers, body, plan, (n, mode, flood_key)
            )
            for n in plan.flood_connections
        ]
    finally:
        stop(process)
    tracebacks = log_path.read_text(errors="replace").count("Traceback (most recent call last)")
    if tracebacks:
        logger.warning("the server logged %d tracebacks: see %s", tracebacks, log_path)
    for flooded in floods:
        flooded["users"]["p50_ratio"] = report.ratio(
            flooded["users"]["latency_s"]["p50"], unloaded["users"]["latency_s"]["p50"]
        )
    unloaded["users"]["p50_ratio"] = 1.0
    for row in (unloaded, *floods):
        row["mode"], row["settings"], row["server_tracebacks"] = mode, extra, tracebacks
    return [unloaded, *floods]


def issue_key(url: str, admin_token: str, user: str) -> str:
    reply = httpx.post(f"{url}/v1/users/{user}/keys", headers=bearer(admin_token), timeout=30)
    reply.raise_for_status()
    return reply.json()["key"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def measure_row(
    name: str, url: str, server_pid: int, headers: list[dict[str, str]], body: dict, plan: Plan, flood
) -> dict[str, Any]:
    """The users for `plan.row_s` (with the flooder, when `flood` is (mode, key)); their latencies,
    the flooder's counts, the server's rate-limit counters and everyone's CPU."""
    flooder = Flooder(url, body, *flood) if flood else None
    before = rate_limited(url)
    meter, server_before = report.CpuMeter(), process_cpu_s(server_pid)
    started = time.monotonic()
    if flooder:
        flooder.go.set()
    users = Users(url, headers, body, plan.period_s)
    time.sleep(plan.row_s)
    users.stop()
    flooded = flooder.finish() if flooder else None
    wall = time.monotonic() - started
    server_cores = (process_cpu_s(server_pid) - server_before) / wall
    cpu = meter.stop()
    after = rate_limited(url)
    latencies = [seconds for _, seconds in users.sent]
    # after the flooder's first 429 its allowance is spent: what is left is the cost of refusing it
    first_429 = flooded["first_429_at"] if flooded else None
    after_429 = [seconds for at, seconds in users.sent if first_429 is not None and at >= first_429]
    flooder_cores = flooded["cpu_cores"] if flooded else 0.0
    other = cpu["other_cores"]  # everything but this process: the server and the flooder included
    row: dict[str, Any] = {
        "name": name,
        "seconds": wall,
        "users": {
            "users": len(headers),
            "requests": len(latencies),
            "errors": len(users.errors),
            "error_samples": sorted(set(users.errors))[:5],
            "latency_s": {**report.summary(latencies), "p95": report.percentile(latencies, 95)},
            "latency_after_first_429_s": {**report.summary(after_429), "p95": report.percentile(after_429, 95)},
            "completion_tokens": sorted(users.tokens),
        },
        "flooder": flooded,
        "rate_limited": {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)},
        "cpu": {
            "server_cores": server_cores,
            "flooder_cores": flooder_cores,
            "load_generator_cores": cpu["self_cores"],  # this process: the users' threads
            "elsewhere_cores": None if other is None else max(0.0, other - server_cores - flooder_cores),
            "steal_cores": cpu["steal_cores"],
        },
    }
    logger.info(
        "%s: users p50 %.3f s over %d requests; flooder %s",
        name,
        row["users"]["latency_s"]["p50"],
        len(latencies),
        flooded and flooded["status"],
    )
    return row


def rate_limited(url: str) -> dict[str, float]:
    """The server's `kto_rate_limited_total`, by "scope/by"."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"{url}/metrics", timeout=30)
    reply.raise_for_status()
    return {
        f"{s.labels['scope']}/{s.labels['by']}": s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
        if s.name == "kto_rate_limited_total"
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Users:
    """One thread per user, each sending `body` once every `period_s` on a fixed schedule,
    staggered, with no burst to catch up when a reply comes late."""

    def __init__(self, url: str, headers: list[dict[str, str]], body: dict, period_s: float):
        self.url, self.body, self.period_s, self.count = url, body, period_s, len(headers)
        self.sent: list[tuple[float, float]] = []  # (monotonic time sent, seconds to the reply)
        self.errors: list[str] = []
        self.tokens: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._user, args=(i, h), daemon=True) for i, h in enumerate(headers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """No new requests; wait for those under way."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def _user(self, number: int, headers: dict[str, str]) -> None:
        next_at = time.monotonic() + number * self.period_s / self.count
        with httpx.Client(base_url=self.url, timeout=120, headers=headers) as client:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + self.period_s, time.monotonic() - self.period_s)
                sent_at, started = time.monotonic(), time.perf_counter()
                try:
                    reply = client.post("/v1/chat/completions", json=self.body)
                    seconds = time.perf_counter() - started
                    reply.raise_for_status()
                    tokens = reply.json()["usage"]["completion_tokens"]
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    with self._lock:
                        self.errors.append(repr(exc)[:200])
                    continue
                with self._lock:
                    self.sent.append((sent_at, seconds))
                    self.tokens.add(tokens)


USER_COLUMNS = ["row", "user reqs", "user errors", "p50 s", "p95 s", "p50 x unloaded", "p50 s after 1st 429"]
FLOOD_COLUMNS = ["flood sent", "flood 200", "flood 429", "flood other", "flood req/s", "1st 429 at s"]
SERVER_COLUMNS = ["kto_rate_limited_total +", "server cores", "flooder cores", "elsewhere cores"]


def print_tables(rows: list[dict[str, Any]], targets: list[report.Target], plan: Plan) -> None:
    table = []
    for r in rows:
        u, f, cpu = r["users"], r["flooder"] or {}, r["cpu"]
        limited = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["rate_limited"].items())) or "-"
        flood = [f.get(k, "-") for k in ("sent", "ok", "rate_limited", "other", "requests_per_s", "first_429_s")]
        after = u["latency_after_first_429_s"]["p50"] if f else "-"
        latency = [u["latency_s"]["p50"], u["latency_s"]["p95"], u["p50_ratio"], after]
        cores = [cpu["server_cores"], cpu["flooder_cores"], cpu["elsewhere_cores"]]
        table.append([r["name"], u["requests"], u["errors"], *latency, *flood, limited, *cores])
    title = (
        f"Flood: {plan.users} users x 1 request / {plan.period_s:g} s (max_tokens {plan.max_tokens}, greedy) "
        f"vs {' or '.join(map(str, plan.flood_connections))} flooding connections; {plan.row_s:g} s per row; "
        f"{os.cpu_count()} cores"
    )
    print(report.table(title, USER_COLUMNS + FLOOD_COLUMNS + SERVER_COLUMNS, table))
    print()
    print(report.targets_table(targets))
    busy = {r["name"]: r["cpu"]["elsewhere_cores"] for r in rows if (r["cpu"]["elsewhere_cores"] or 0) > 0.25}
    if busy:
        print(
            f"\nNOTE: other processes kept up to {max(busy.values()):.2f} of {os.cpu_count()} cores busy during "
            f"{', '.join(busy)}: those numbers are not a clean measurement; rerun on a quiet machine."
        )
