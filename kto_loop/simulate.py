"""`kto-loop simulate`: users who chat through the HTTP API and rate by a rule.

This is the rule-based labeling KTO is made for: a user likes an answer iff it starts with one of
a few strings. Several users chat concurrently; the desirable rate per served version is logged
as ratings come in, and a learning curve (rolling desirable rate, one colour per version) is
saved as a PNG.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

PROMPTS = ["hello", "tell me something", "what is new", "say a word", "how are you", "one more"]


@dataclass
class Rating:
    index: int
    at: float
    user: str
    version: str
    desirable: bool
    answer: str


@dataclass
class Simulation:
    ratings: list[Rating] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rate_by_version(self) -> dict[str, tuple[int, float]]:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.ratings:
            counts[r.version][0] += 1
            counts[r.version][1] += r.desirable
        return {v: (n, d / n) for v, (n, d) in counts.items()}

    def window(self, start: int, stop: int) -> tuple[int, int]:
        """(desirable, total) among ratings[start:stop] in arrival order."""
        part = sorted(self.ratings, key=lambda r: r.index)[start:stop]
        return sum(r.desirable for r in part), len(part)


def two_proportion_p(d1: int, n1: int, d2: int, n2: int) -> float:
    """One-sided p-value that the second proportion exceeds the first (pooled z-test)."""
    p = (d1 + d2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)) if 0 < p < 1 else 0.0
    if se == 0:
        return 1.0 if d2 / n2 <= d1 / n1 else 0.0
    z = (d2 / n2 - d1 / n1) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def simulate(url: str | Sequence[str], *, ratings: int, users: int = 8,
             prefixes: tuple[str, ...] = ("a", "e", "i", "o", "u"), max_tokens: int = 8, temperature: float = 1.0,
             report_every: int = 50, stop: threading.Event | None = None) -> Simulation:
    """Chat and rate until `ratings` ratings were recorded; returns every rating in order.

    With several server URLs (replicas of one deployment) each user takes turns over them and
    rates each answer on the next replica, not the one that answered, as a load balancer may."""
    urls = [url] if isinstance(url, str) else list(url)
    result = Simulation()
    lock = threading.Lock()
    stop = stop or threading.Event()

    def user_loop(number: int) -> None:
        name = f"sim-{number}"
        with contextlib.ExitStack() as stack:
            replicas = [stack.enter_context(httpx.Client(base_url=u, timeout=60, headers={"X-User-Id": name}))
                        for u in urls]
            turn = 0
            while not stop.is_set():
                turn += 1
                prompt = PROMPTS[(number + turn) % len(PROMPTS)]
                client, rater = replicas[(number + turn) % len(urls)], replicas[(number + turn + 1) % len(urls)]
                try:
                    reply = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                        "temperature": temperature})
                    reply.raise_for_status()
                    body = reply.json()
                    answer = body["choices"][0]["message"]["content"]
                    desirable = answer.startswith(prefixes)
                    vote = rater.post("/v1/feedback", json={"response_id": body["id"],
                                                            "label": "up" if desirable else "down"})
                    vote.raise_for_status()
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors.append(repr(exc))
                    time.sleep(0.2)
                    continue
                with lock:
                    if len(result.ratings) >= ratings:
                        stop.set()
                        return
                    result.ratings.append(Rating(len(result.ratings), time.time(), name, body["model"], desirable, answer))
                    if len(result.ratings) % report_every == 0:
                        _report(result)

    threads = [threading.Thread(target=user_loop, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def _report(result: Simulation) -> None:
    recent = result.ratings[-50:]
    rates = ", ".join(f"{v}: {rate:.2f} (n={n})" for v, (n, rate) in result.rate_by_version().items())
    logger.info("%d ratings; last 50 desirable %.2f; by version: %s", len(result.ratings),
                sum(r.desirable for r in recent) / len(recent), rates)


def plot(result: Simulation, path: Path, window: int = 50) -> Path:
    """Rolling desirable rate over ratings, points coloured by the version that answered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(result.ratings, key=lambda r: r.index)
    xs, ys = [], []
    for i in range(len(ordered)):
        part = ordered[max(0, i - window + 1):i + 1]
        xs.append(i + 1)
        ys.append(sum(r.desirable for r in part) / len(part))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, ys, color="black", linewidth=1, label=f"desirable rate (last {window})")
    versions = list(dict.fromkeys(r.version for r in ordered))
    cmap = plt.get_cmap("viridis", max(2, len(versions)))
    for k, version in enumerate(versions):
        idx = [i for i, r in enumerate(ordered) if r.version == version]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=6, color=cmap(k), label=version if k < 12 else None)
    ax.set_xlabel("rating")
    ax.set_ylabel("desirable rate")
    ax.set_ylim(0, 1)
    ax.set_title("kto-loop: simulated users, rate by served version")
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
