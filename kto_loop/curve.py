"""The learning curve of a simulation: the rate users saw, with version changes and canary
decisions marked (what `kto-loop simulate` saves, and each run of the learning benchmark)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from kto_loop.simulate import Simulation


@dataclass(frozen=True)
class Event:
    """A change in what the server served, placed at a rating count."""

    at: int
    """Ratings made when it was first seen."""
    kind: str
    """`active` (a new active version), `canary` (a canary started), `advance`, `promote`, `rollback`."""
    version: str | None


def events(result: Simulation) -> list[Event]:
    """What changed, from the simulation's record of the served versions: a canary that ends with
    its candidate active was promoted; one that ends otherwise was rolled back (or stopped)."""
    rated_at = [t.rated_at or t.at for t in result.ratings]
    out: list[Event] = []
    previous: tuple[str | None, str | None] | None = None
    for when, active, canary in result.serving:
        at = bisect.bisect_right(rated_at, when)
        if previous is not None and previous != (active, canary):
            was_active, was_canary = previous
            promoted = was_canary is not None and active == was_canary
            if promoted:
                out.append(Event(at, "promote", was_canary))
            elif active != was_active:
                out.append(Event(at, "active", active))
            if was_canary and canary != was_canary and not promoted:
                # Seen between two polls: a new candidate with the same active version is an
                # advance (or a rollback and a new canary: told apart only by the history).
                out.append(Event(at, "advance" if canary else "rollback", canary or was_canary))
            elif canary and canary != was_canary:
                out.append(Event(at, "canary", canary))
        previous = (active, canary)
    return out


def rolling(result: Simulation, window: int) -> tuple[list[int], list[float]]:
    """(rating count, share of the last `window` answers the users liked) at every answer."""
    xs, ys, rated, liked = [], [], 0, []
    for turn in result.turns:
        rated += turn.desirable is not None
        liked.append(turn.liked)
        part = liked[-window:]
        xs.append(rated)
        ys.append(sum(part) / len(part))
    return xs, ys


def plot(
    result: Simulation, path: Path, *, window: int = 100, title: str | None = None, base_rate: float | None = None
) -> Path:
    """Save the curve as a PNG: the rate users saw (by the raters' rules, so flipped labels do
    not show), the base rate if measured, version changes and canary decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = rolling(result, window)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(xs, ys, color="black", linewidth=1.2, label=f"liked, last {window} answers")
    if base_rate is not None:
        ax.axhline(base_rate, color="grey", linestyle=":", linewidth=1, label=f"base model {base_rate:.2f}")
    style = {
        "promote": ("tab:green", "-", "promoted"),
        "rollback": ("tab:red", "--", "rolled back"),
        "active": ("tab:blue", "-", "activated"),
        "canary": ("tab:olive", ":", "canary started"),
    }
    labelled = set()
    for event in events(result):
        if event.kind == "advance":
            ax.plot([event.at], [0.01], marker="|", color="tab:olive", markersize=6)
            continue
        colour, line, name = style[event.kind]
        ax.axvline(
            event.at, color=colour, linestyle=line, linewidth=0.8, alpha=0.7, label=None if name in labelled else name
        )
        labelled.add(name)
        if event.kind in ("promote", "rollback", "active"):
            ax.annotate(event.version or "base", (event.at, 0.97), fontsize=6, rotation=90, va="top", color=colour)
    ax.set_xlabel("ratings")
    ax.set_ylabel("share of answers liked")
    ax.set_ylim(0, 1)
    ax.set_title(title or "kto-loop: what simulated users saw (| canary advanced)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
