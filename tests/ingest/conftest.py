"""Fixtures for the ingest tests: a bus and a ledger on tmp files, a fake clock, child processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny import FakeClock

from ingest.ledger import SqliteLedger
from ingest.sqlite_bus import SqliteBus

WORKERS = Path(__file__).with_name("workers.py")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.sqlite3"


@pytest.fixture
def bus(bus_path: Path) -> Iterator[SqliteBus]:
    bus = SqliteBus(bus_path)
    yield bus
    bus.close()


@pytest.fixture
def ledger(tmp_path: Path, clock: FakeClock) -> Iterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", ttl_s=3600.0, clock=clock)
    yield ledger
    ledger.close()


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``tests/ingest/workers.py`` with arguments in a child process; killed at teardown."""
    children: list[subprocess.Popen[str]] = []

    def spawn(*args: object) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, str(WORKERS), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
