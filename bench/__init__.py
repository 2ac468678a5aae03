"""kto-loop's benchmarks: `python -m bench` (or `make bench`) runs them, prints tables and
writes JSON to bench/results/.

One module per suite, each with `run(options) -> Path`: `serving` (bench/serving.py, with
bench/swap.py for the hot-swap part) today; the learner's and ingest's suites join as sibling
modules. Speed is reported as a ratio against a baseline measured in the same run, and each
target from the issues is marked PASS or MISS; a missed target never fails the run.
"""
