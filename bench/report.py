"""What every benchmark shares: percentiles, targets, plain-text tables, machine info, JSON.

Numbers are reported, never asserted: a missed target is a MISS row in the table and
`"met": false` in the JSON, and the run still exits 0.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), linear between closest ranks (numpy's default method).

    With few samples the high percentiles are close to the maximum: p99 of 10 values is
    0.9 of the way from the 9th to the 10th."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99, min and max of `values` (NaN where empty)."""
    values = list(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


# ---- targets ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A goal from the issue: `value <op> threshold`, with op "<=" or ">="."""

    name: str
    value: float
    op: str
    threshold: float
    unit: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def targets_table(targets: Iterable[Target]) -> str:
    rows = [[t.name, fmt(t.value), f"{t.op} {fmt(t.threshold)}", t.unit, "PASS" if t.met else "MISS"] for t in targets]
    return table("Targets (reported, never enforced)", ["target", "measured", "goal", "unit", "verdict"], rows)


# ---- tables ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to 3 significant-ish digits; everything else as str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}" if abs(value) >= 0.001 else f"{value:.2e}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned plain-text table with a title line and a rule under the header."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    out = [f"== {title} ==", line(columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ---- other work on the machine ---------------------------------------------------------------


class CpuMeter:
    """CPU used while a phase ran, in cores: by this process and by everything else (Linux).

    Benchmarks on a shared box are only as good as the box is quiet: `other_cores` well above
    0 means the numbers of that phase were taken while something else competed for the CPU."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return (
            time.monotonic(),
            (user + nice + system + irq + softirq) / tick,
            int(own[11]) / tick + int(own[12]) / tick,
            steal / tick,
        )

    def stop(self) -> dict[str, float | None]:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return {"self_cores": None, "other_cores": None, "steal_cores": None}
        wall = end[0] - self._start[0]
        busy, own, steal = (end[i] - self._start[i] for i in (1, 2, 3))
        return {"self_cores": own / wall, "other_cores": max(0.0, busy - own) / wall, "steal_cores": steal / wall}


# ---- machine info and results ----------------------------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD's commit read from the .git directory (no git process); None when unavailable."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").exists():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, common):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
        for base in (git, common):
            packed = base / "packed-refs"
            if packed.exists():
                for row in packed.read_text().splitlines():
                    if row.endswith(" " + ref):
                        return row.split()[0]
    except OSError:
        logger.debug("could not read the git commit", exc_info=True)
    return None


def machine_info(device: str, dtype: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "dtype": dtype,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(name: str, payload: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write `<directory>/<name>.json` atomically (through a .tmp file), replacing any earlier run."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def save_suite(suite: str, options, baseline: str, results: list[dict[str, Any]], device: str = "cpu") -> Path:
    """Write a micro-suite's results as `<suite>-<device>[-quick].json`; its path."""
    payload = {
        "suite": suite,
        "quick": options.quick,
        "machine": machine_info(device, "float32"),
        "baseline": baseline,
        "results": results,
    }
    path = write_json(f"{suite}-{device}" + ("-quick" if options.quick else ""), payload, options.results_dir)
    logger.info("wrote %s", path)
    return path


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN becomes null, paths become strings, tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
