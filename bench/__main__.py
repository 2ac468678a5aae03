"""`python -m bench [--only SUITE] [--quick] [--model PATH]`: run benchmark suites.

Tables go to stdout, diagnostics to stderr (logging), results to bench/results/<suite>-<device>.json
(`-quick` added for --quick runs, so a smoke run never overwrites a full one).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

from bench.report import RESULTS_DIR

logger = logging.getLogger("bench")

SUITES = {
    "serving": "bench.serving",
    "learner": "bench.learner",
    "ingest": "bench.ingest",
    "labeler": "bench.labeler",
    "detokenize": "bench.detokenize",
    "buffer": "bench.buffer",
    "sampling": "bench.sampling",
    "learning": "bench.learning",
    "flood": "bench.flood",
    "soak": "bench.soak",
    "annotation": "bench.annotation",
    "memory": "bench.memory",
    "implicit-feedback": "bench.implicit_feedback",
}  # name -> module with run(options) -> Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SUITES),
        metavar="SUITE",
        help=f"run only this suite (repeatable; one of: {', '.join(SUITES)}); default: all",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute per suite)")
    parser.add_argument("--model", help="a local model directory to benchmark instead of the demo-sized random model")
    parser.add_argument("--model-id", help="the name the model is served under (default: the directory name)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes (%(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the server's own INFO logs")
    learning = parser.add_argument_group("learning suite")
    learning.add_argument("--tasks", help="only these tasks (comma-separated)")
    learning.add_argument("--rows", help="only these rows (comma-separated: defaults, canary off, ...)")
    learning.add_argument("--seeds", type=int, help="seeds per task and row")
    learning.add_argument(
        "--env",
        action="append",
        metavar="KTO_X=VALUE",
        help="a setting for every run on top of the defaults (an extra row: use --tag)",
    )
    learning.add_argument("--tag", help="appended to the results' file names")
    soak = parser.add_argument_group("soak suite")
    soak.add_argument("--minutes", type=float, help="how long the load runs (default: 30; with --quick: 0.5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")  # deprecations, not results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.model is None or Path(options.model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: keep it that way
    for name in options.only or list(SUITES):
        logger.info("running the %s benchmarks%s", name, " (quick)" if options.quick else "")
        path = importlib.import_module(SUITES[name]).run(options)
        print(f"\nresults: {path}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
