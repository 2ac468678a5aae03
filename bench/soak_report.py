"""The soak benchmark's analysis of its samples and requests (bench/soak.py), its targets and tables."""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench import report
from bench import soak_sampler as sampler

if TYPE_CHECKING:
    from bench.soak import Load, Plan, Request, Sampler

logger = logging.getLogger(__name__)


# ---- analysis --------------------------------------------------------------------------------


def analyse(plan: Plan, sampled: Sampler, load: Load, adapters: dict[str, Any]) -> dict[str, Any]:
    samples = sampled.samples
    ts = [s["t"] for s in samples]
    duration, warmup = ts[-1], ts[-1] * plan.warmup_fraction
    processes = {}
    for row in sorted({r for s in samples for r in s["rss_mib"]}):
        seen = [(s["t"], s["rss_mib"][row]) for s in samples if row in s["rss_mib"]]
        mib = [m for _, m in seen]
        processes[row] = {
            "pids": sorted(sampled.pids[row]),
            "start_mib": mib[0],
            "end_mib": mib[-1],
            "max_mib": max(mib),
            "slope_mib_per_hour": sampler.mib_per_hour([t for t, _ in seen], mib, warmup),
        }
    ratings = [s["ratings"] for s in samples]
    stores = {}
    for name in sorted({n for s in samples for n in s["stores"]}):
        sizes = [s["stores"].get(name, 0) for s in samples]
        stores[name] = {
            "files": sorted(sampled.files.get(name, ())),
            "final_bytes": sizes[-1],
            "max_bytes": max(sizes),
            "bytes_per_1000_ratings": sampler.per_1000_ratings(ratings, sizes, ts, warmup),
        }
    one_version = statistics.median(sampled.version_bytes.values()) if sampled.version_bytes else 0
    max_bytes = stores.get(sampler.VERSIONS_STORE, {}).get("max_bytes", 0)
    depth = rollback_depth()
    registry = {
        "versions_published": len(adapters["versions"]),
        "statuses": dict(Counter(v.get("status") for v in adapters["versions"])),
        "versions_on_disk_at_end": len(sampled.last.versions),
        "max_version_dirs": max(s["version_dirs"] for s in samples),
        "one_version_bytes": one_version,
        "max_versions_bytes": max_bytes,
        "max_versions_worth": report.ratio(max_bytes, one_version),
        "rollback_depth": depth,
        "bound_versions_worth": None if depth is None else depth + 2,
    }
    errors: dict[str, Counter[str]] = {"chat": Counter(), "feedback": Counter()}
    for r in load.requests:
        if r.status != "ok":
            errors[r.kind][r.status] += 1
    return {
        "seconds": duration,
        "warmup_s": warmup,
        "ratings": load.ratings,
        "chats": sum(1 for r in load.requests if r.kind == "chat" and r.status == "ok"),
        "processes": processes,
        "stores": stores,
        "registry": registry,
        "latency": latency(load.requests, duration, plan.windows),
        "errors": {kind: dict(c) for kind, c in errors.items()},
        "server_errors_5xx": sum(n for c in errors.values() for s, n in c.items() if s.startswith("5")),
        "samples": samples,
    }


def latency(requests: list[Request], duration: float, windows: int) -> dict[str, Any]:
    """p50/p99 of successful chats and ratings over the run and per window; failures per window."""

    def stats(part: list[Request]) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": sum(1 for r in part if r.status != "ok")}
        for kind in ("chat", "feedback"):
            done = [r.seconds for r in part if r.kind == kind and r.status == "ok"]
            out[kind] = {"n": len(done), "p50_s": report.percentile(done, 50), "p99_s": report.percentile(done, 99)}
        return out

    width = duration / windows if duration > 0 else 1.0
    per: list[list[Request]] = [[] for _ in range(windows)]
    for r in requests:
        per[min(windows - 1, max(0, int(r.at / width)))].append(r)
    return {
        "run": stats(requests),
        "windows": [{"from_s": i * width, "to_s": (i + 1) * width, **stats(part)} for i, part in enumerate(per)],
    }


def rollback_depth() -> int | None:
    """The default rollback depth: a `rollback_depth` setting, else the registry's retention
    default; None before version retention exists (the numbers are reported all the same)."""
    import importlib

    from learner.settings import LearnerSettings
    from serve.settings import ServeSettings

    for kind in (ServeSettings, LearnerSettings):
        field = kind.model_fields.get("rollback_depth")
        if field is not None and isinstance(field.default, int):
            return field.default
    try:  # by name: this suite predates the module, and must run on a tree without it
        depth = getattr(importlib.import_module("registry.retention"), "DEFAULT_DEPTH", None)
    except ImportError:
        return None
    return depth if isinstance(depth, int) else None


# ---- targets and tables ----------------------------------------------------------------------


def make_targets(result: dict[str, Any]) -> list[report.Target]:
    targets = [report.Target("5xx responses (chat and feedback)", float(result["server_errors_5xx"]), "<=", 0, "")]
    registry = result["registry"]
    if registry["bound_versions_worth"] is not None:
        targets.append(
            report.Target(
                "registry version files at most, in versions' worth",
                registry["max_versions_worth"],
                "<=",
                registry["bound_versions_worth"],
                "versions",
            )
        )
    return targets


def print_tables(result: dict[str, Any], targets: list[report.Target], plan: Plan) -> None:
    mib = 1024 * 1024
    head = (
        f"{result['seconds'] / 60:.1f} minutes, {plan.clients} clients chatting (max_tokens {plan.max_tokens}) "
        f"and rating; {result['chats']} chats, {result['ratings']} ratings; slopes after the first "
        f"{result['warmup_s']:.0f} s"
    )
    rows = [
        [row, ",".join(map(str, p["pids"])), p["start_mib"], p["end_mib"], p["max_mib"], p["slope_mib_per_hour"]]
        for row, p in result["processes"].items()
    ]
    columns = ["process", "pids", "start MiB", "end MiB", "max MiB", "MiB/h"]
    print(report.table(f"Soak: processes, {head}", columns, rows))
    print()
    stores = sorted(result["stores"].items(), key=lambda kv: _fastest_first(kv[1]["bytes_per_1000_ratings"]))
    rows = [
        [name, s["final_bytes"] / mib, s["max_bytes"] / mib, s["bytes_per_1000_ratings"] / mib, " ".join(s["files"])]
        for name, s in stores
    ]
    columns = ["store", "final MiB", "max MiB", "MiB/1k ratings", "files"]
    print(report.table("Soak: stores under the data directory", columns, rows))
    print()
    r = result["registry"]
    rows = [
        [
            r["versions_published"],
            r["versions_on_disk_at_end"],
            r["max_version_dirs"],
            r["one_version_bytes"] / 1024,
            r["max_versions_bytes"] / mib,
            r["max_versions_worth"],
            r["rollback_depth"] if r["rollback_depth"] is not None else "not set",
        ]
    ]
    columns = ["published", "on disk at end", "max dirs", "1 version KiB", "max MiB", "max x 1 version", "depth"]
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items(), key=str)) or "none"
    print(report.table(f"Soak: registry versions ({statuses})", columns, rows))
    print()
    lat = result["latency"]
    rows = [_latency_row("run", lat["run"])]
    rows += [_latency_row(f"{w['from_s']:.0f}-{w['to_s']:.0f} s", w) for w in lat["windows"]]
    columns = ["window", "chats", "chat p50 s", "chat p99 s", "ratings", "rate p50 s", "rate p99 s", "errors"]
    print(report.table("Soak: latency of successful requests, and failures", columns, rows))
    print()
    rows = [[kind, status, n] for kind, counts in result["errors"].items() for status, n in sorted(counts.items())]
    print(report.table("Soak: failed requests by status", ["kind", "status", "requests"], rows or [["-", "-", 0]]))
    print()
    print(report.targets_table(targets))
    if result["up_exited_early"] is not None or result["log_tracebacks"]:
        print(
            f"\nNOTE: kto-loop up exited with {result['up_exited_early']} during the run; "
            f"{result['log_tracebacks']} tracebacks in its log"
        )


def _latency_row(name: str, s: dict[str, Any]) -> list[Any]:
    c, f = s["chat"], s["feedback"]
    return [name, c["n"], c["p50_s"], c["p99_s"], f["n"], f["p50_s"], f["p99_s"], s["errors"]]


def _fastest_first(growth: float) -> float:
    return 0.0 if math.isnan(growth) else -growth
