"""The learning benchmark's summary over seeds, its tables and its PNG of the curves."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import report


def _median(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


def _quantile(values, q: float) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return report.percentile(values, q) if values else math.nan


def summarize(records: list[dict[str, Any]], tasks, plan) -> dict[str, Any]:
    """Per (task, row) over seeds, the poisoned row, the offline ratios and the targets."""
    targets = {t.name: t.target for t in tasks}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if not r.get("failed"):
            groups[(r["task"], r["row"])].append(r)
    cells = []
    for (task, row), runs in sorted(groups.items()):
        ok = [r for r in runs if r["at_1200"]["lift"] >= targets[task] and r["at_1200"]["p"] < 0.01]
        latency = [r["feedback_to_served"] for r in runs]
        versions = {k: _median([r["versions"][k] for r in runs]) for k in runs[0]["versions"]}
        curves = [r["curve"] for r in runs]
        width = min(map(len, curves)) if curves else 0
        cells.append(
            {
                "task": task,
                "row": row,
                "seeds": len(runs),
                "target": targets[task],
                "base": _median([r["base"]["rate"] for r in runs]),
                "lift_600": _median([r["at_600"]["lift"] for r in runs]),
                "p_600_below_0_01": sum(r["at_600"]["p"] < 0.01 for r in runs),
                "lift_1200": _median([r["at_1200"]["lift"] for r in runs]),
                "lift_1200_min": min((r["at_1200"]["lift"] for r in runs), default=math.nan),
                "p_1200_max": max((r["at_1200"]["p"] for r in runs), default=math.nan),
                "seeds_ok": len(ok),
                "ratings_until_plus_0_2": _median([r["ratings_until_plus_0_2"] for r in runs]),
                "never_plus_0_2": sum(r["ratings_until_plus_0_2"] is None for r in runs),
                "last_minus_peak": _median([-r["holds"]["drop"] for r in runs]),
                "ended_below_base": sum(r["at_end"]["rate"] < r["base"]["rate"] for r in runs),
                "versions": versions,
                "feedback_to_served_p50_s": _median([x["p50_s"] for x in latency]),
                "feedback_to_served_p99_s": _median([x["p99_s"] for x in latency]),
                "never_served": sum(x["never"] for x in latency),
                "measured": sum(x["measured"] for x in latency),
                "curve": [statistics.fmean(c[i] for c in curves) for i in range(width)],
                "offline_ratio": _median([_offline_ratio(r) for r in runs if "offline" in r]),
            }
        )
    poison = [r["poisoned"] for r in records if "poisoned" in r]
    summary: dict[str, Any] = {
        "cells": cells,
        "poisoned": {
            "seeds": len(poison),
            "outcomes": [p["outcome"] for p in poison],
            "honest_ratings_median": _median([p["honest_ratings_of_poisoned"] for p in poison]),
            "honest_ratings_p90": _quantile([p["honest_ratings_of_poisoned"] for p in poison], 90),
            "runs": poison,
        },
    }
    summary["targets"] = [t.to_json() for t in _targets(cells, summary["poisoned"], plan)]
    return summary


def _offline_ratio(record: dict[str, Any]) -> float | None:
    off = record["offline"]
    if "error" in off or not off.get("loop_active"):
        return 0.0 if "error" not in off else None  # nothing promoted: the loop delivered no lift
    base = off["base"]["rate"]
    return report.ratio(off["loop_active"]["rate"] - base, off["offline"]["rate"] - base)


def _targets(cells: list[dict], poison: dict, plan) -> list[report.Target]:
    out = []
    for c in cells:
        if c["row"] != "defaults":
            continue
        need = max(1, math.ceil(0.8 * c["seeds"]))
        out.append(
            report.Target(
                f"{c['task']}: seeds with lift@1200 >= {c['target']} (p<0.01)",
                c["seeds_ok"],
                ">=",
                need,
                f"of {c['seeds']}",
            )
        )
        out.append(report.Target(f"{c['task']}: seeds ending below the base rate", c["ended_below_base"], "<=", 0))
    latency = [c["feedback_to_served_p50_s"] for c in cells if c["row"] == "defaults"]
    if latency:
        out.append(
            report.Target("feedback -> served p50, defaults (median over tasks)", _median(latency), "<=", 20, "s")
        )
    if poison["seeds"]:
        out.append(
            report.Target(
                "poisoned: honest ratings it served before rollback (median)",
                poison["honest_ratings_median"],
                "<=",
                300,
                "ratings",
            )
        )
    return out


def print_tables(summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    cells = summary["cells"]
    rows = [
        [
            c["task"],
            c["row"],
            c["base"],
            c["lift_600"],
            f"{c['p_600_below_0_01']}/{c['seeds']}",
            c["lift_1200"],
            c["lift_1200_min"],
            f"{c['seeds_ok']}/{c['seeds']}",
            c["ratings_until_plus_0_2"],
            c["last_minus_peak"],
            c["ended_below_base"],
            "/".join(
                report.fmt(c["versions"][k])
                for k in ("published", "gate_refused", "canaries", "promoted", "rolled_back", "activated")
            ),
            c["feedback_to_served_p50_s"],
            c["feedback_to_served_p99_s"],
            c["offline_ratio"],
        ]
        for c in cells
    ]
    print(
        report.table(
            "Learning: the rate users saw (medians over seeds)",
            [
                "task",
                "row",
                "base",
                "lift@600",
                "p<.01",
                "lift@1200",
                "min",
                "seeds ok",
                "until +0.2",
                "last-peak",
                "below base",
                "versions pub/gate/canary/prom/rb/act",
                "fb->served p50 s",
                "p99 s",
                "vs offline",
            ],
            rows,
        )
    )
    print()
    print(
        report.table(
            "Learning curves: rate users saw per 100 ratings (mean over seeds)",
            ["task", "row", "curve"],
            [[c["task"], c["row"], " ".join(f"{x:.2f}" for x in c["curve"])] for c in cells],
        )
    )
    poison = summary["poisoned"]
    if poison["seeds"]:
        print()
        print(
            report.table(
                "Poisoned burst: honest ratings of poisoned versions before the canary decided",
                [
                    "seed",
                    "outcome",
                    "poisoned versions",
                    "burst ratings",
                    "honest ratings",
                    "honest rate poisoned",
                    "others",
                    "seconds",
                ],
                [
                    [
                        i,
                        p["outcome"],
                        p["poisoned_versions"],
                        p["burst_ratings_of_poisoned"],
                        p["honest_ratings_of_poisoned"],
                        p["honest_rate_of_poisoned"],
                        p["honest_rate_of_others"],
                        p["decision_seconds_after_burst"],
                    ]
                    for i, p in enumerate(poison["runs"])
                ],
            )
        )
    print()
    print(report.targets_table(report.Target(**{k: v for k, v in t.items() if k != "met"}) for t in summary["targets"]))


def save_curves(summary: dict[str, Any], outcomes: dict, path: Path) -> Path:
    """One panel per task: each run's rolling rate (thin) and the mean per row (thick), base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kto_loop.curve import rolling

    tasks = sorted({c["task"] for c in summary["cells"]})
    rows = sorted({c["row"] for c in summary["cells"]})
    colours = dict(zip(rows, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    cols = min(3, len(tasks))
    fig, axes = plt.subplots(
        math.ceil(len(tasks) / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(len(tasks) / cols)), squeeze=False
    )
    for ax, task in zip(axes.flat, tasks):
        for (name, row, _seed), outcome in outcomes.items():
            if name == task:
                xs, ys = rolling(outcome.sim, 100)
                ax.plot(xs, ys, color=colours[row], linewidth=0.4, alpha=0.35)
        for c in summary["cells"]:
            if c["task"] == task:
                ax.plot(
                    [100 * (i + 1) for i in range(len(c["curve"]))],
                    c["curve"],
                    color=colours[c["row"]],
                    linewidth=2,
                    marker="o",
                    markersize=3,
                    label=c["row"],
                )
                ax.axhline(c["base"], color=colours[c["row"]], linestyle=":", linewidth=1)
        ax.set_title(task, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("ratings", fontsize=8)
        ax.set_ylabel("liked", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(
        "kto-loop learning benchmark: the rate users saw (thin: runs, thick: mean per 100, dotted: base)", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
