"""Where an engine step goes: milliseconds per decoding step at 1, 4 and 16 rows (seeded and
not), then a torch.profiler table of one 16-row run. A diagnostic, not a suite: nothing is
compared or saved unless `--out DIR` is given (then `engine-profile-<device>.txt` goes there).

    .venv/bin/python -m bench.engine_profile --model PATH [--tokens 128] [--out DIR]

On CUDA the model runs in bf16, as serving does there; on CPU in float32.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from foundation.models import default_device, load_model
from serve.engine import Engine
from serve.generation import Finished, GenerationRequest


def per_step_s(engine: Engine, prompt: list[int], rows: int, tokens: int, seeded: bool) -> float:
    """Seconds per decoding step for `rows` requests of exactly `tokens` tokens each."""
    done = threading.Semaphore(0)

    def emit(output) -> None:
        if isinstance(output, Finished):
            done.release()

    start = time.perf_counter()
    for i in range(rows):
        engine.submit(GenerationRequest(prompt, tokens, temperature=1.0, seed=i if seeded else None), emit)
    for _ in range(rows):
        done.acquire()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--out", type=Path, help="write the report here as well")
    options = parser.parse_args(argv)
    device, dtype = default_device()
    loaded = load_model(options.model, device=device, dtype=dtype)
    engine = Engine(loaded, max_batch=16)
    engine.eos_ids = set()  # every request runs to exactly --tokens: steps are comparable
    engine.start()
    try:
        prompt = loaded.tokenizer.encode("hello there, how are you today?")
        per_step_s(engine, prompt, 2, 8, True)  # warm-up
        lines = [f"{device.type}, {dtype}, {options.tokens} tokens per request"]
        for seeded in (True, False):
            for rows in (1, 4, 16):
                ms = 1000 * per_step_s(engine, prompt, rows, options.tokens, seeded)
                lines.append(
                    f"seeded={seeded!s:<5} rows={rows:<2}  {ms:7.2f} ms/step  {rows / ms * 1000:8.0f} tokens/s"
                )
    finally:
        engine.stop()
    # The profile: 16 seeded rows stepped on this thread (the profiler sees the calling thread's ops).
    profiled = Engine(loaded, max_batch=16)
    profiled.eos_ids = set()
    for i in range(16):
        profiled.submit(GenerationRequest(prompt, min(32, options.tokens), temperature=1.0, seed=i), lambda _: None)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        while profiled.step():
            pass
    report = "\n".join(lines) + "\n\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    print(report)
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / f"engine-profile-{device.type}.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
