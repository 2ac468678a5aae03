"""What the annotation queue costs: the write each chat now makes, and an annotator's next answer.

Baseline (named): the response ledger's `record_response`, the write every chat already made.
Measured on the embedded (SQLite) backends, in one run:
- `add`: offering one answer to the queue (its conversation and token ids: 100 prompt and 60
  completion tokens), per chat, against the baseline; ratio add / record;
- taking an answer (`candidates` + the strategy's order + `assign`, what `GET /v1/annotations/next`
  does, without HTTP) and labeling it (`annotation` + `annotate`), with the queue holding N answers.
Times are medians of many calls (microseconds). Redis is not measured here: it needs a server, and
its cost is round trips, which the ledger's Redis numbers already show.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

from bench import report
from serve.annotation_queue import Annotation, QueueItem
from serve.annotation_strategies import order
from serve.ledger import SqliteLedger
from serve.sqlite_annotation_queue import SqliteAnnotationQueue

SIZES = (1_000, 10_000)
QUICK_SIZES = (1_000,)
CALLS = 300


def answer(n: int, rng: random.Random) -> QueueItem:
    return QueueItem(
        f"chatcmpl-{n}",
        f"user-{n % 300}",
        "v0001",
        time.time(),
        [{"role": "user", "content": "What should I cook tonight? " * 4}],
        "Something warm and simple: a soup. " * 6,
        [rng.randrange(500) for _ in range(100)],
        [rng.randrange(500) for _ in range(60)],
    )


def median_us(fn, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(size: int, rng: random.Random, tmp: Path) -> dict[str, float]:
    ledger = SqliteLedger(tmp / "ledger.sqlite3")
    queue = SqliteAnnotationQueue(tmp / "annotations.sqlite3", ttl_s=7 * 86400, max_items=10 * size)
    try:
        for n in range(size):  # the queue as it stands when the measured calls come
            queue.add(answer(n, rng))
        record_us = median_us(lambda i: ledger.record_response(f"r{i}", "alice", "v0001"), CALLS)
        add_us = median_us(lambda i: queue.add(answer(size + i, rng)), CALLS)
        taken: list[str] = []

        def take(i: int) -> None:
            now, who = time.time(), f"ann-{i}"
            for c in order("newest", queue.candidates(who, now, newest=True, limit=64)):
                if queue.assign(c.response_id, who, now, 900.0):
                    taken.append(c.response_id)
                    return
            raise AssertionError("the queue ran dry")

        def label(i: int) -> None:
            rid, who = taken[i], f"ann-{i}"
            assert queue.annotation(rid, who, time.time()) is None
            queue.annotate(Annotation(rid, who, "desirable", f"e{i}", time.time()))

        take_us = median_us(take, CALLS)
        label_us = median_us(label, CALLS)
    finally:
        ledger.close()
        queue.close()
    return {
        "answers_queued": size,
        "ledger_record_us": record_us,
        "queue_add_us": add_us,
        "add_over_record": report.ratio(add_us, record_us),
        "take_next_us": take_us,
        "annotate_us": label_us,
    }


def run(options) -> Path:
    rng = random.Random(0)
    results = []
    for size in QUICK_SIZES if options.quick else SIZES:
        with tempfile.TemporaryDirectory(prefix="kto-bench-annotation-") as tmp:
            results.append(measure(size, rng, Path(tmp)))
    columns = ["answers_queued", "ledger_record_us", "queue_add_us", "add_over_record", "take_next_us", "annotate_us"]
    print(
        report.table(
            "Annotation queue on SQLite, µs per call (median)",
            ["answers queued", "ledger record [baseline]", "queue add", "add / record ×", "take next", "annotate"],
            [[r[c] for c in columns] for r in results],
        )
    )
    return report.save_suite(
        "annotation", options, "the ledger's record_response, which every chat already makes", results
    )
