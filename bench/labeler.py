"""Labeler benchmark: how fast the rule labeler (`kto-loop label`, its own process) labels answers.

    .venv/bin/python -m bench --only labeler           # Kafka and the embedded bus, a few minutes
    .venv/bin/python -m bench --only labeler --quick   # smoke run

For each bus — Kafka (a broker started by deploy/services/services.py, or KTO_BUS_URL's) and the
embedded SQLite log — with three rules (contains, an RE2 regex, max_chars) on answers of about
200 characters:

1. Burst. N answers are on the responses topic when the labeler starts; labels/s = N / (first
   label → the N-th answer labeled), read back from the feedback topic by this process.
2. Sustained. Answers published at the serving benchmark's 16-client rate (bench/results/
   serving-cpu.json; 25/s if it has not been run) while the labeler runs; its lag (answers not
   yet labeled) sampled every 0.5 s. Flat means it keeps up.

Baseline: the serving rate. The ratio burst labels/s ÷ answers served per second says how many
16-client servers one labeler can follow.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.ingest import kafka_url
from testkit import processes

logger = logging.getLogger(__name__)

RULES = {
    "rules": [
        {"name": "no-refunds", "kind": "contains", "phrases": ["refund", "money back"], "label": "undesirable"},
        {"name": "no-phone", "kind": "regex", "pattern": r"\d{3}-\d{4}", "label": "undesirable"},
        {"name": "short", "kind": "max_chars", "chars": 400, "label": "undesirable", "otherwise": "desirable"},
    ]
}
TEXT = "Put the egg in boiling water for seven minutes, then cool it in cold water and peel it. " * 2


@dataclass(frozen=True)
class Plan:
    answers: int = 20_000
    sustained_s: float = 30.0
    sample_s: float = 0.5


FULL = Plan()
QUICK = Plan(answers=3_000, sustained_s=8.0)


def serving_rate() -> tuple[float, str]:
    path = report.RESULTS_DIR / "serving-cpu.json"
    try:
        levels = json.loads(path.read_text())["results"]["throughput"]["levels"]
        level = next(x for x in levels if x["clients"] == 16)
        return level["requests"] / level["seconds"], str(path.relative_to(report.REPO_ROOT))
    except (OSError, KeyError, StopIteration, ValueError):
        return 25.0, "assumed (no serving-cpu.json)"


def run(options) -> Path:
    plan = QUICK if options.quick else FULL
    rate, rate_from = serving_rate()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kto-bench-labeler-") as tmp_dir:
        tmp = Path(tmp_dir)
        with kafka_url(tmp / "services") as url:
            results["kafka"] = measure(url, plan, rate, tmp / "kafka")
        results["embedded"] = measure(f"sqlite:///{tmp / 'embedded' / 'bus.sqlite3'}", plan, rate, tmp / "embedded")
    rows = [
        [
            bus,
            r["burst"]["labels_per_s"],
            report.ratio(r["burst"]["labels_per_s"], rate),
            r["sustained"]["lag_max"],
            r["sustained"]["lag_p50"],
            r["sustained"]["lag_end"],
        ]
        for bus, r in results.items()
    ]
    print(
        report.table(
            f"Rule labeler ({len(RULES['rules'])} rules; baseline: {rate:.1f} answers/s served to 16 clients, "
            f"{rate_from})",
            ["bus", "burst answers labeled/s", "x serving rate", "sustained lag max", "lag p50", "lag at end"],
            rows,
        )
    )
    payload = {
        "suite": "labeler",
        "quick": options.quick,
        "machine": report.machine_info("cpu", "n/a"),
        "plan": asdict(plan),
        "baseline": {"answers_per_s": rate, "from": rate_from},
        "results": results,
    }
    path = report.write_json("labeler-cpu" + ("-quick" if options.quick else ""), payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


def measure(url: str, plan: Plan, rate: float, tmp: Path) -> dict[str, Any]:
    from ingest.bus import open_bus
    from ingest.events import Topics, decode_event
    from registry import open_registry

    tmp.mkdir(parents=True, exist_ok=True)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    registry_url = f"sqlite:///{tmp / 'registry' / 'registry.sqlite3'}"
    with open_registry(registry_url) as registry:
        registry.put_rules(RULES, actor="bench")
    bus = open_bus(url)
    labeled: set[str] = set()
    reader = bus.consumer(f"bench-{uuid.uuid4().hex}", [topics.feedback])

    def read() -> None:
        for record in reader.poll(timeout_s=0.1, max_records=5000):
            labeled.add(decode_event(record.value).response_id)  # type: ignore[union-attr]

    publish(bus, topics, 0, plan.answers)
    env = {"KTO_BUS_URL": url, "KTO_REGISTRY_URL": registry_url, "KTO_TOPIC_PREFIX": prefix, "KTO_DATA_DIR": str(tmp)}
    log = tmp / "labeler.log"
    labeler = processes.start("label", env, log)
    try:
        while not labeled:
            processes.assert_running(labeler)
            read()
        first = time.perf_counter()
        while len(labeled) < plan.answers:
            processes.assert_running(labeler)
            read()
        burst_s = time.perf_counter() - first
        # Sustained: the serving rate, the lag sampled as it goes.
        stop = threading.Event()
        published = [plan.answers]

        def trickle() -> None:
            started, sent = time.perf_counter(), 0
            while not stop.is_set():
                due = int((time.perf_counter() - started) * rate) - sent
                if due > 0:
                    publish(bus, topics, published[0], due)
                    published[0] += due
                    sent += due
                time.sleep(0.02)

        producer = threading.Thread(target=trickle)
        producer.start()
        lags = []
        end = time.perf_counter() + plan.sustained_s
        while time.perf_counter() < end:
            next_sample = time.perf_counter() + plan.sample_s
            while time.perf_counter() < next_sample:
                read()
            lags.append(published[0] - len(labeled))
        stop.set()
        producer.join()
    finally:
        processes.stop(labeler)
        reader.close()
        bus.close()
    return {
        "burst": {"answers": plan.answers, "seconds": burst_s, "labels_per_s": (plan.answers - 1) / burst_s},
        "sustained": {
            "rate_per_s": rate,
            "seconds": plan.sustained_s,
            "lag_max": max(lags),
            "lag_p50": report.percentile(lags, 50),
            "lag_end": lags[-1],
            "lags": lags,
        },
    }


def publish(bus: Any, topics: Any, first: int, n: int) -> None:
    from ingest.events import ChatMessage, ResponseEvent, SamplingParams, encode_event

    for start in range(first, first + n, 500):
        items: list[tuple[str | None, bytes]] = []
        for i in range(start, min(start + 500, first + n)):
            event = ResponseEvent(
                response_id=f"r-{i}",
                user=f"user-{i % 50}",
                base_model="bench/model",
                adapter_version=None,
                messages=[ChatMessage(role="user", content="How do I boil an egg?")],
                prompt_token_ids=list(range(32)),
                completion=TEXT if i % 7 else TEXT + " Ask for a refund.",
                completion_token_ids=list(range(100, 132)),
                finish_reason="stop",
                sampling=SamplingParams(max_tokens=64, temperature=1.0, top_p=1.0),
            )
            items.append((event.response_id, encode_event(event)))
        bus.publish_many(topics.responses, items)
