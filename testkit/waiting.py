"""Waiting until something holds: the one polling loop of the tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = 30.0
"""Seconds `wait_for` waits by default before it fails."""
INTERVAL_S = 0.05
"""Seconds between two calls of the condition by default."""
SHOWN_CHARS = 500
"""The most characters of the last value seen that a failure shows."""


def wait_for(
    condition: Callable[[], T], *, what: str, timeout_s: float = TIMEOUT_S, interval_s: float = INTERVAL_S
) -> T:
    """Call `condition` every `interval_s` seconds until it returns something truthy; return that.

    After `timeout_s` seconds fails with an AssertionError naming `what` and, when it says more
    than False or None, the last value seen. An exception from `condition` is not caught: a
    condition may assert what must hold meanwhile (a process still running, say) and fail at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = "" if value is None or value is False else f"; last seen: {_shown(value)}"
            raise AssertionError(f"{what}: not within {timeout_s:g} s{seen}")
        time.sleep(interval_s)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"
