"""What the learning benchmark computes from one run: pure functions of the simulated users'
turns (every answer, rated or not, with the version that gave it and the rules' verdict), the
base rate, and the registry's versions and history.

The rate users saw is always the rules' verdict (`Turn.liked`) on every answer they got, rated
or not, flipped label or not: what the raters really think of what was served, whichever version
(active or canary) served it. Windows are counted in ratings: "at 600" is the answers given
while ratings 401-600 were made (width 200).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from bench import report
from kto_loop.simulate import Turn, two_proportion_p

WIDTH = 200
"""Ratings in the window a lift is measured on."""


def rated_positions(turns: Sequence[Turn]) -> list[int]:
    """Index in `turns` of each rated turn, in order."""
    return [i for i, t in enumerate(turns) if t.desirable is not None]


def window(turns: Sequence[Turn], stop: int, width: int = WIDTH) -> tuple[int, int]:
    """(liked, answers) among the answers given while ratings stop−width+1 … stop were made:
    those after rating stop−width, up to rating stop (so consecutive windows share no answer)."""
    rated = rated_positions(turns)
    if not rated:
        return 0, 0
    stop = min(stop, len(rated))
    first = rated[stop - width - 1] + 1 if stop - width > 0 else 0
    part = turns[first : rated[stop - 1] + 1]
    return sum(t.liked for t in part), len(part)


def curve(turns: Sequence[Turn], step: int = 100) -> list[float]:
    """The rate users saw in each block of `step` ratings."""
    rated = rated_positions(turns)
    out = []
    for start in range(0, len(rated) - step + 1, step):
        liked, n = window(turns, start + step, step)
        out.append(liked / n)
    return out


def lift_at(turns: Sequence[Turn], base: tuple[int, int], at: int, width: int = WIDTH) -> dict[str, Any]:
    """The rate in the window ending at rating `at`, its lift over the base rate, and the
    one-sided p-value of a two-proportion z-test (base sample vs window) that it rose."""
    liked, n = window(turns, at, width)
    if n == 0 or len(rated_positions(turns)) < at:
        return {"at": at, "rate": math.nan, "answers": n, "lift": math.nan, "p": math.nan}
    rate = liked / n
    return {
        "at": at,
        "rate": rate,
        "answers": n,
        "lift": rate - base[0] / base[1],
        "p": two_proportion_p(base[0], base[1], liked, n),
    }


def ratings_until(
    turns: Sequence[Turn], base_rate: float, lift: float = 0.2, step: int = 50, width: int = WIDTH
) -> int | None:
    """The first multiple of `step` ratings at which the window rate is at least base + lift."""
    total = len(rated_positions(turns))
    for at in range(width, total + 1, step):
        liked, n = window(turns, at, width)
        if n and liked / n >= base_rate + lift:
            return at
    return None


def holds(turns: Sequence[Turn], step: int = 50, width: int = WIDTH) -> dict[str, float]:
    """The last window against the best window of the run: does the gain hold?"""
    total = len(rated_positions(turns))
    rates = [liked / n for at in range(width, total + 1, step) for liked, n in [window(turns, at, width)] if n]
    if not rates:
        return {"last": math.nan, "peak": math.nan, "drop": math.nan}
    last = window(turns, total, width)
    last_rate = last[0] / last[1]
    peak = max([*rates, last_rate])
    return {"last": last_rate, "peak": peak, "drop": peak - last_rate}


def version_counts(versions: Sequence[Any], history: Sequence[Any]) -> dict[str, int]:
    """Versions published, refused by the gate, and what the canary (or the learner) did with them."""
    actions = [e.action for e in history]
    by_controller = [e for e in history if e.actor == "canary-controller"]
    return {
        "published": len(versions),
        "gate_refused": sum(1 for v in versions if (v.rejected_reason or "").startswith("gate:")),
        "canaries": actions.count("canary_start"),
        "advanced": actions.count("canary_advance"),
        "promoted": sum(e.action == "canary_promote" for e in by_controller),
        "rolled_back": sum(e.action == "canary_rollback" for e in by_controller),
        "activated": sum(e.action == "activate" and e.actor == "learner" for e in history),
    }


def gate_log(versions: Sequence[Any]) -> dict[str, Any]:
    """Why the gate refused versions (reason codes), and the KL to the base of each version."""
    codes: dict[str, int] = {}
    kl = []
    for v in versions:
        gate = v.metrics.get("gate") or {}
        for code in gate.get("codes", []):
            codes[code] = codes.get(code, 0) + 1
        kl.append((gate.get("candidate") or {}).get("kl_per_token"))
    return {"refused_by_reason": codes, "kl_per_token": kl}


def descendants(versions: Sequence[Any], roots: set[str]) -> set[str]:
    """`roots` and every version trained from one of them, however far down."""
    parent = {v.version: v.parent for v in versions}
    out = set()
    for name in parent:
        seen, walk = set(), name
        while walk is not None and walk not in seen:
            if walk in roots:
                out.add(name)
                break
            seen.add(walk)
            walk = parent.get(walk)
    return out


def feedback_to_served(
    turns: Sequence[Turn], versions: Sequence[Any], held_out: Callable[[str], bool], until: float
) -> dict[str, Any]:
    """For each rating sent before `until` (unix seconds) and not held out by the learner's gate:
    seconds until the first answer by a version trained on it (one whose lineage lists its
    feedback event, or a descendant of one), given to any simulated user. A rating never served
    so counts as infinitely late: percentiles include those."""
    first_with: dict[str, set[str]] = {}
    for v in versions:
        for event in v.lineage.get("feedback_event_ids", []):
            first_with.setdefault(event, set()).add(v.version)
    served_at: dict[str, list[float]] = {}
    for t in turns:
        served_at.setdefault(t.version, []).append(t.at)
    cache: dict[frozenset, set[str]] = {}
    latencies, held, never = [], 0, 0
    for t in turns:
        if t.feedback_id is None or t.rated_at is None or t.rated_at > until:
            continue
        if held_out(t.response_id):
            held += 1
            continue
        trained = frozenset(first_with.get(t.feedback_id, ()))
        if trained not in cache:
            cache[trained] = descendants(versions, set(trained))
        hits = [at for name in cache[trained] for at in served_at.get(name, ()) if at >= t.rated_at]
        if hits:
            latencies.append(min(hits) - t.rated_at)
        else:
            never += 1
    everything = latencies + [math.inf] * never
    return {
        "measured": len(everything),
        "held_out": held,
        "never": never,
        "p50_s": late_percentile(everything, 50),
        "p99_s": late_percentile(everything, 99),
        "served": report.summary(latencies),
    }


def late_percentile(values: Sequence[float], q: float) -> float:
    """report.percentile, where a value may be infinite (never served): infinite as soon as the
    percentile reaches into those."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    if math.isinf(ordered[math.ceil(rank)]):
        return math.inf
    return report.percentile(ordered, q)
