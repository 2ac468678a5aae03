"""Planning an update as the replay buffer grows: what the learner reads from the buffer before
each update.

Baseline (named): load every referenced example with its token ids (`referenced()`, what the loop
did before). Measured: the light `index()` plus `load()` of the examples an update actually uses
(a 200-example held-out set and 8 × 16 replayed ones). Examples of 100 prompt + 60 completion
tokens, 300 users; seconds are best of 3, ratio baseline / index in the same run.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from bench import report
from ingest.bus import Record
from ingest.events import FeedbackEvent, ResponseEvent, SamplingParams
from learner.buffer import ReplayBuffer
from learner.join import Polled

SIZES = (10_000, 50_000)
QUICK_SIZES = (2_000, 10_000)


def fill(buffer: ReplayBuffer, start: int, n: int, rng: random.Random) -> None:
    batch: list[Polled] = []
    for i in range(start, start + n):
        user = f"u{i % 300}"
        response = ResponseEvent(
            response_id=f"r{i}",
            user=user,
            base_model="bench",
            adapter_version=None,
            messages=[{"role": "user", "content": "hi"}],
            prompt_token_ids=[rng.randrange(500) for _ in range(100)],
            completion="…",
            completion_token_ids=[rng.randrange(500) for _ in range(60)],
            finish_reason="stop",
            sampling=SamplingParams(max_tokens=64, temperature=1.0, top_p=1.0),
        )
        vote = FeedbackEvent(response_id=f"r{i}", user=user, label="desirable" if i % 3 else "undesirable")
        batch += [
            (Record("b.responses", 0, i, response.response_id, b"", 0.0), response, None),
            (Record("b.feedback", 0, i, vote.response_id, b"", 0.0), vote, None),
        ]
        if len(batch) >= 5000:
            buffer.apply(batch, now=0.0)
            batch = []
    if batch:
        buffer.apply(batch, now=0.0)
    while todo := buffer.unreferenced(5000):
        buffer.set_reference([(e.response_id, -1.0, -2.0) for e in todo])


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(options) -> Path:
    sizes = QUICK_SIZES if options.quick else SIZES
    rng = random.Random(0)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="kto-bench-buffer-") as tmp:
        buffer = ReplayBuffer(Path(tmp) / "buffer.sqlite3")
        filled = 0
        for n in sizes:
            fill(buffer, filled, n - filled, rng)
            filled = n

            def light() -> None:
                index = buffer.index()
                picked = [r.response_id for r in index[-200:]] + [r.response_id for r in rng.sample(index, 128)]
                assert len(buffer.load(picked)) == len(set(picked))

            baseline_s = best_of(lambda: buffer.referenced())
            light_s = best_of(light)
            results.append(
                {
                    "examples": n,
                    "referenced_s": baseline_s,
                    "index_and_load_s": light_s,
                    "speedup": report.ratio(baseline_s, light_s),
                }
            )
            rows.append([n, baseline_s * 1000, light_s * 1000, report.ratio(baseline_s, light_s)])
        buffer.close()
    print(
        report.table(
            "Reading the buffer to plan one update, ms (best of 3)",
            ["examples", "referenced() [baseline]", "index() + load(picked)", "speedup ×"],
            rows,
        )
    )
    return report.save_suite("buffer", options, "referenced(): every example with its token ids", results)
