"""Ingest benchmark: ratings from serve's producer to joined examples in the learner's buffer.

    .venv/bin/python -m bench --only ingest           # Kafka and the embedded bus, a few minutes
    .venv/bin/python -m bench --only ingest --quick   # smoke run

For each bus — Kafka (a broker started by deploy/services/services.py, as `make services` does;
or the one in KTO_BUS_URL when it is a kafka:// URL) and the embedded SQLite log:

1. Burst. `producers` threads (40: serve publishes from anyio's thread pool, 40 threads) send N
   ratings as fast as they can, each rating one call for its response event and then one for its feedback event,
   through the publisher serve itself uses (`serve_publisher`: on Kafka, a local durable spool
   that a forwarder thread drains to the broker, so "publish latency" is what a request waits).
   At the same time the learner's `EventJoiner`, in its own process, joins them into a fresh
   replay buffer (labels are counted from what each poll applied; the buffer is checked once at
   the end). Reported:
   publish-call latency p50/p99, events/s sent, and ratings/s joined = N / (first publish →
   N-th joined label). The target (≥ 5,000 ratings/s joined on Kafka) is this number.
2. Sustained. Ratings at a fixed rate (half the burst's joined rate) for a while, the joiner
   running alongside; its lag (records on both topics not yet committed) is sampled every
   0.5 s. A lag that stays flat means the learner keeps up; one that grows means it does not.

Events are the size serve writes for a short chat (32 prompt and 32 completion token ids).
Both processes share this machine's cores, as serve and the learner do on one box.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report

logger = logging.getLogger(__name__)

SERVICES = report.REPO_ROOT / "deploy" / "services" / "services.py"
STALL_S = 60.0  # a joiner that gets no records for this long (seconds) fails the run


@dataclass(frozen=True)
class Plan:
    ratings: int = 20_000  # per burst
    # Publishing threads. Serve publishes from request handlers through Starlette's
    # run_in_threadpool, i.e. anyio's default thread limiter: 40 threads. Under load that many
    # publishes are in flight at once, and the spool commits them together (group commit), so
    # fewer threads would understate what serve's producer path does.
    producers: int = 40
    sustained_s: float = 20.0
    sample_s: float = 0.5  # lag sampling period
    partitions: int = 1  # per topic; one learner reads them all


FULL = Plan()
QUICK = Plan(ratings=3_000, sustained_s=6.0)


def run(options) -> Path:
    plan = QUICK if options.quick else FULL
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kto-bench-ingest-") as tmp_dir:
        tmp = Path(tmp_dir)
        with kafka_url(tmp / "services") as url:
            results["kafka"] = measure_bus(url, plan, tmp / "kafka")
        results["embedded"] = measure_bus(f"sqlite:///{tmp / 'embedded' / 'bus.sqlite3'}", plan, tmp / "embedded")
    targets = [
        report.Target(
            "ratings joined per second, Kafka (burst)",
            results["kafka"]["burst"]["joined_per_s"],
            ">=",
            5000,
            "ratings/s",
        )
    ]
    print_tables(results, targets, plan)
    payload = {
        "suite": "ingest",
        "quick": options.quick,
        "machine": report.machine_info("cpu", "n/a"),
        "plan": asdict(plan),
        "results": results,
        "targets": [t.to_json() for t in targets],
    }
    path = report.write_json("ingest-cpu" + ("-quick" if options.quick else ""), payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


class kafka_url:
    """The broker to measure: KTO_BUS_URL's if it is Kafka, else one started for this run and stopped after."""

    def __init__(self, state_dir: Path):
        self.state_dir, self.started = state_dir, False

    def __enter__(self) -> str:
        url = os.environ.get("KTO_BUS_URL", "")
        if url.startswith("kafka://"):
            return url
        logger.info("starting a Kafka broker (deploy/services/services.py start)")
        done = subprocess.run(
            [
                sys.executable,
                str(SERVICES),
                "start",
                "--state-dir",
                str(self.state_dir),
                "--owner-pid",
                str(os.getpid()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        self.started = True
        return next(line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("KTO_BUS_URL="))

    def __exit__(self, *exc: object) -> None:
        if self.started:
            subprocess.run(
                [sys.executable, str(SERVICES), "stop", "--state-dir", str(self.state_dir)], capture_output=True
            )


# ---- the producing side (this process) ------------------------------------------------------


def serve_publisher(url: str, data_dir: Path):
    """What serve publishes through for this bus URL: Kafka behind its local spool, or the embedded bus."""
    from serve.app import open_event_bus
    from serve.metrics import ServeMetrics
    from serve.settings import ServeSettings

    bus, _ = open_event_bus(ServeSettings(_env_file=None, bus_url=url, data_dir=data_dir), ServeMetrics())
    return bus


def make_events(n: int, prefix: str) -> list[tuple[str, bytes, bytes]]:
    """(response_id, response event, feedback event) for n ratings, encoded as serve encodes them."""
    from ingest.events import ChatMessage, FeedbackEvent, ResponseEvent, SamplingParams, encode_event

    events = []
    for i in range(n):
        rid = f"{prefix}-{i}"
        response = ResponseEvent(
            response_id=rid,
            user=f"user-{i % 50}",
            base_model="bench/model",
            adapter_version=None,
            messages=[ChatMessage(role="user", content="How do I boil an egg?")],
            prompt_token_ids=list(range(32)),
            completion="Put it in boiling water.",
            completion_token_ids=list(range(100, 132)),
            finish_reason="stop",
            sampling=SamplingParams(max_tokens=64, temperature=1.0, top_p=1.0),
        )
        feedback = FeedbackEvent(response_id=rid, user=f"user-{i % 50}", label="desirable" if i % 3 else "undesirable")
        events.append((rid, encode_event(response), encode_event(feedback)))
    return events


def produce(publisher, topics, events, producers: int, rate_per_s: float | None = None) -> dict[str, Any]:
    """Publish each rating's response then its feedback, from `producers` threads; latency per call."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def send(i: int) -> None:
        rid, response, feedback = events[i]
        if rate_per_s:
            delay = start + i / rate_per_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        mine = []
        for topic, value in ((topics.responses, response), (topics.feedback, feedback)):
            t0 = time.perf_counter()
            publisher.publish(topic, rid, value)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(producers) as pool:
        list(pool.map(send, range(len(events))))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "events": 2 * len(events),
        "events_per_s": 2 * len(events) / seconds,
        "publish_latency_s": report.summary(latencies),
    }


# ---- one bus: burst, then sustained ---------------------------------------------------------


def measure_bus(url: str, plan: Plan, tmp: Path) -> dict[str, Any]:
    from ingest.events import Topics

    tmp.mkdir(parents=True, exist_ok=True)
    kind = url.split("://", 1)[0]
    out: dict[str, Any] = {"url": url}
    for phase in ("burst", "sustained"):
        topics = Topics(f"bench-{uuid.uuid4().hex[:8]}")
        publisher = serve_publisher(url, tmp / f"{phase}-serve")
        publisher.create_topics(topics.all, partitions=plan.partitions)
        if phase == "burst":
            n, rate = plan.ratings, None
        else:
            rate = max(50.0, out["burst"]["joined_per_s"] / 2)
            n = int(rate * plan.sustained_s)
        events = make_events(n, topics.prefix)
        logger.info("%s, %s: %d ratings%s", kind, phase, n, f" at {rate:.0f}/s" if rate else "")
        joiner = Joiner(url, topics.prefix, tmp / f"{phase}-buffer.sqlite3", n, plan.sample_s)
        meter = report.CpuMeter()
        try:
            joiner.wait_subscribed()
            started = time.time()
            produced = produce(publisher, topics, events, plan.producers, rate)
            samples = joiner.wait_done()
        finally:
            joiner.stop()
            publisher.close()
        done_at = samples[-1]["t"]
        lags = [s["lag"] for s in samples if s["t"] >= started]
        out[phase] = {
            **produced,
            "ratings": n,
            "rate_asked_per_s": rate,
            "joined_seconds": done_at - started,
            "joined_per_s": n / (done_at - started),
            "lag_records": report.summary(lags),
            "lag_samples": [(round(s["t"] - started, 2), s["lag"]) for s in samples if s["t"] >= started],
            "cpu": meter.stop(),
        }
        logger.info(
            "  %.0f ratings/s joined; publish p50 %.2f ms",
            out[phase]["joined_per_s"],
            produced["publish_latency_s"]["p50"] * 1000,
        )
    return out


class Joiner:
    """The learner's consumer in a child process (`python -m bench.ingest URL PREFIX BUFFER N`)."""

    def __init__(self, url: str, prefix: str, buffer: Path, n: int, sample_s: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest", url, prefix, str(buffer), str(n), str(sample_s)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=report.REPO_ROOT,
        )

    def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None  # stdout=PIPE
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the joiner process exited with {self.process.wait()}")
        return json.loads(line)

    def wait_subscribed(self) -> None:
        assert self._line()["ready"]

    def wait_done(self) -> list[dict[str, Any]]:
        samples = []
        while True:
            sample = self._line()
            samples.append(sample)
            if sample.get("done"):
                return samples

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def joiner_main(url: str, prefix: str, buffer_path: str, n: int, sample_s: float) -> None:
    """Join until the buffer holds n labels; print a JSON line per sample: time, labels, lag."""
    from ingest.bus import open_bus
    from ingest.events import Topics
    from learner.buffer import ReplayBuffer
    from learner.consumer import EventJoiner

    bus, topics = open_bus(url), Topics(prefix)
    bus.create_topics(topics.all)
    with (
        ReplayBuffer(Path(buffer_path)) as buffer,
        EventJoiner(bus, topics, buffer, group_id=f"{prefix}-learner") as joiner,
    ):
        joiner.poll_once(timeout_s=0.5)  # joins the group before the producer starts
        print(json.dumps({"ready": True}), flush=True)
        next_sample = 0.0
        labels = 0
        progress_at = time.time()
        while True:
            # Labels counted from what each poll did: buffer.counts() scans the whole buffer, and
            # calling it after every poll would measure the benchmark rather than the joiner.
            result = joiner.poll_once(timeout_s=0.1)
            labels += result.new_examples
            now = time.time()
            if result.records:
                progress_at = now
            elif now - progress_at > STALL_S:  # fail the run rather than wait forever
                raise SystemExit(
                    f"the joiner got no records for {STALL_S:.0f} s with {labels} of {n} labels (lag {joiner.lag()})"
                )
            if labels >= n or now >= next_sample:
                print(json.dumps({"t": now, "labels": labels, "lag": joiner.lag(), "done": labels >= n}), flush=True)
                next_sample = now + sample_s
            if labels >= n:
                break
        counts = buffer.counts()
        if counts["desirable"] + counts["undesirable"] != n:
            raise SystemExit(f"the buffer holds {counts}, expected {n} labels")
    bus.close()


# ---- tables ---------------------------------------------------------------------------------


def print_tables(results: dict[str, Any], targets: list[report.Target], plan: Plan) -> None:
    rows = []
    for bus, phases in results.items():
        for phase in ("burst", "sustained"):
            r = phases[phase]
            lat, lag = r["publish_latency_s"], r["lag_records"]
            rows.append(
                [
                    bus,
                    phase,
                    r["ratings"],
                    r["rate_asked_per_s"] or "max",
                    r["events_per_s"],
                    lat["p50"] * 1000,
                    lat["p99"] * 1000,
                    r["joined_per_s"],
                    lag["p50"],
                    lag["max"],
                    r["cpu"]["other_cores"],
                ]
            )
    print(
        report.table(
            f"Ingest: rating = response event + feedback event, {plan.producers} publishing threads, the "
            "joiner in its own "
            f"process, {plan.partitions} partition(s)",
            [
                "bus",
                "phase",
                "ratings",
                "asked/s",
                "events/s sent",
                "publish p50 ms",
                "p99 ms",
                "ratings/s joined",
                "lag p50",
                "lag max",
                "other cores",
            ],
            rows,
        )
    )
    print()
    print(report.targets_table(targets))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    joiner_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
