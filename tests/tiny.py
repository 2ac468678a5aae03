"""Names and small helpers shared by the test packages (fixtures live in conftest.py files)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

TINY_MODEL_ID = "tiny-test-model"


class FakeClock:
    """Unix seconds that move only when a test says so, for leases, TTLs, parking and expiry."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spawn_scripts(script: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Body of a fixture: spawn(*args) runs `script` in a child process; all are killed at teardown."""
    children: list[subprocess.Popen[str]] = []

    def spawn(*args: object) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
