"""The learning tests' set-up: a character-level model, the learner's settings for it, simulated
users until a version serves, and the check that the desirable rate rose. Shared by the embedded
run (test_learning_e2e.py) and the production topology (test_learning_production.py); the
`kto-loop` processes themselves are testkit.processes'.

Why this is a fair test: the rule — an answer is liked iff its first character is a vowel — is
what KTO is for (a binary judgement, no pairs, no reward model), and a LoRA adapter on a tiny
character-level model can express it: it only has to shift the first-token distribution
toward 5 of 28 letters (supervised training lifts it past 0.8 in 10 steps, so the capacity is
there; whether thumbs get it there is what the test asks). The random model starts near
5/28 ≈ 0.18 by chance. A diffuse rule over a large vocabulary would barely move a tiny random
model in 600 ratings (measured: it did not); a concentrated one is the honest test of the loop
itself — events, join, KTO steps, gate, publish, hot-swap — rather than of the model's capacity.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import httpx

from foundation.models import build_tiny_model
from kto_loop.simulate import Simulation, simulate, two_proportion_p
from testkit.processes import assert_running, log_on_failure
from testkit.waiting import wait_for

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
VOWELS = ("a", "e", "i", "o", "u")
MODEL_ID = "tiny-chars"
# The learner's cadence and step size for a model this small (the defaults suit real ones).
# Versions go live at once: these runs measure learning (the canary has test_canary_e2e.py).
LEARNER_ENV = {
    "KTO_LEARNING_RATE": "1e-2",
    "KTO_MIN_NEW_LABELS": "32",
    "KTO_STEPS_PER_UPDATE": "8",
    "KTO_MICRO_BATCH": "16",
    "KTO_MAX_WAIT_S": "5",
    "KTO_CANARY_SHARE": "0",
}


def build_char_model(path: Path) -> Path:
    # init_std 0.15: with transformers' default 0.02 a 32-wide model's logits stay within about
    # ±1 and even supervised training cannot lift P(vowel first) past 0.17 (measured).
    return build_tiny_model(path, alphabet=ALPHABET, hidden_size=32, num_layers=2, num_heads=2, seed=1, init_std=0.15)


def simulate_learning(
    urls: list[str],
    *,
    prefixes: tuple[str, ...],
    ratings: int = 600,
    base: int = 60,
    learner: subprocess.Popen | None = None,
    log: Path | None = None,
    timeout_s: float = 180,
) -> Simulation:
    """`ratings` counted ratings: `base` on the base model first, then, once the learner has a
    version serving, the rest. Ratings made while waiting keep the learner fed but are not
    counted: over HTTP, hundreds of ratings of a tiny model take seconds, so unpaced they could all
    be in before a learner (a separate process, still starting) had published anything."""
    result = simulate(urls, ratings=base, users=8, prefixes=prefixes, max_tokens=4)

    def a_version_serves() -> bool:
        if learner is not None:
            assert_running(learner)
        if serving(urls[0]) != MODEL_ID:
            return True
        simulate(urls, ratings=8, users=8, prefixes=prefixes, max_tokens=4)  # uncounted, to feed the learner
        return False

    with log_on_failure(log):
        wait_for(a_version_serves, what="a version served", timeout_s=timeout_s, interval_s=0.2)
    rest = simulate(urls, ratings=ratings - base, users=8, prefixes=prefixes, max_tokens=4)
    result.turns += [replace(t, index=t.index + len(result.turns)) for t in rest.turns]
    result.errors += rest.errors
    return result


def serving(url: str) -> str:
    """The version a new request gets (the base model's id for none), as /v1/models reports it."""
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["serving"]


def assert_learned(result: Simulation, base_id: str) -> None:
    base = [r for r in result.ratings if r.version == base_id]
    adapted = [r for r in result.ratings if r.version != base_id]
    assert len(base) >= 30 and adapted, result.rate_by_version()  # the served version changed, no restart
    d0, n0 = sum(bool(r.desirable) for r in base), len(base)  # rated: never None
    d1, n1 = result.window(len(result.ratings) - 150, len(result.ratings))
    rise = d1 / n1 - d0 / n0
    p = two_proportion_p(d0, n0, d1, n1)
    print(f"base {d0}/{n0} = {d0 / n0:.2f} -> last 150: {d1}/{n1} = {d1 / n1:.2f}, rise {rise:.2f}, p = {p:.2g}")
    assert rise >= 0.2 and p < 0.01, (
        f"base {d0}/{n0}, last {d1}/{n1}, rise {rise:.2f}, p {p:.4f}",
        result.rate_by_version(),
    )
