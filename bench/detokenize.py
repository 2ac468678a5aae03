"""Streaming detokenization: serve.text.TextTracker against the named baseline, decoding the whole
completion at every step (what the tracker did before, and the simplest correct thing).

Per answer length, the CPU time to stream one answer token by token, per token; the ratio is
baseline / tracker in the same run. Real text (the demo corpus) through the project's byte-level
BPE tokenizer; each is checked to give the same text as one decode of the whole answer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import report
from foundation.models import build_tokenizer, demo_corpus
from serve.text import TextTracker

LENGTHS = (128, 512, 2048)
QUICK_LENGTHS = (128, 512)


def full_decode_stream(tokenizer, tokens: list[int]) -> str:
    """The baseline: decode everything so far at each step, send what is new."""
    sent = ""
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        sent += text[len(sent) : safe] if safe > len(sent) else ""
    return sent + tokenizer.decode(tokens, skip_special_tokens=True)[len(sent) :]


def tracker_stream(tokenizer, tokens: list[int]) -> str:
    tracker = TextTracker(tokenizer, [])
    sent = "".join(tracker.push(tokens[:end])[0] for end in range(1, len(tokens) + 1))
    return sent + tracker.flush()


def best_of(fn, repeats: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return min(times), out


def run(options) -> Path:
    lengths = QUICK_LENGTHS if options.quick else LENGTHS
    with tempfile.TemporaryDirectory(prefix="kto-bench-text-") as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    corpus = tokenizer.encode(demo_corpus(), add_special_tokens=False)
    rows, results = [], []
    for n in lengths:
        tokens = (corpus * (n // len(corpus) + 1))[:n]
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        repeats = 5 if n <= 512 else 2
        base_s, base_text = best_of(lambda tokens=tokens: full_decode_stream(tokenizer, tokens), repeats)
        ours_s, ours_text = best_of(lambda tokens=tokens: tracker_stream(tokenizer, tokens), repeats)
        assert base_text == ours_text == whole, "the streamed text differs from one decode of the answer"
        speedup = report.ratio(base_s, ours_s)
        results.append(
            {
                "tokens": n,
                "baseline_us_per_token": 1e6 * base_s / n,
                "tracker_us_per_token": 1e6 * ours_s / n,
                "speedup": speedup,
            }
        )
        rows.append([n, 1e6 * base_s / n, 1e6 * ours_s / n, speedup])
    print(
        report.table(
            "Streaming detokenization, CPU µs per token (best of repeats, process time)",
            ["answer tokens", "full decode each step", "TextTracker", "speedup ×"],
            rows,
        )
    )
    return report.save_suite("detokenize", options, "decode the whole completion at every step", results)
