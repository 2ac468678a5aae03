"""Fixtures for the response ledger's tests, imported by tests/serve/conftest.py.

Every test that uses ``ledger`` or ``ledger_store`` runs twice: on the embedded ledger (a file and
a fake clock) and on Redis (the session's redis-server, a key prefix of the test's own).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.ledger import ResponseLedger, SqliteLedger
from serve.redis_ledger import RedisLedger
from tests.tiny import FakeClock, spawn_scripts

VOTER = Path(__file__).with_name("ledger_voter.py")


class LedgerStore:
    """One test's ledger storage (a file, or a key prefix on Redis); ``open`` gives a new handle on it."""

    def __init__(self, backend: str, path: Path, redis_url: str | None) -> None:
        self.backend, self.path, self.redis_url = backend, path, redis_url
        # Starting at the real time, so that child processes (on the real clock) see live entries.
        self.clock = FakeClock(time.time())
        self.key_prefix = f"test-{uuid.uuid4().hex[:12]}:"
        self.opened: list[Any] = []

    @property
    def url(self) -> str:
        """What a child process opens it with (see ``workers.py voter``)."""
        return self.redis_url if self.backend == "redis" else f"sqlite:///{self.path}"  # type: ignore[return-value]

    def open(self, ttl_s: float = 3600.0) -> ResponseLedger:
        if self.backend == "redis":
            ledger: Any = RedisLedger(self.url, ttl_s=ttl_s, key_prefix=self.key_prefix)
        else:
            ledger = SqliteLedger(self.path, ttl_s=ttl_s, clock=self.clock)
        self.opened.append(ledger)
        return ledger

    def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass for the ledger: on the fake clock, or (Redis expires keys on its own
        clock) for real, so Redis tests use TTLs of a second or so."""
        if self.backend == "redis":
            time.sleep(seconds)
        else:
            self.clock.advance(seconds)

    def close(self) -> None:
        for ledger in self.opened:
            ledger.close()
        if self.backend == "redis":
            import redis

            with redis.Redis.from_url(self.url) as client:
                keys = list(client.scan_iter(match=f"{self.key_prefix}*"))
                if keys:
                    client.delete(*keys)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerStore]:
    redis_url = request.getfixturevalue("services").registry_url if request.param == "redis" else None
    store = LedgerStore(request.param, tmp_path / "ledger.sqlite3", redis_url)
    yield store
    store.close()


@pytest.fixture
def ledger(ledger_store: LedgerStore) -> ResponseLedger:
    return ledger_store.open()


@pytest.fixture
def spawn_voter() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start tests/serve/ledger_voter.py with arguments in a child process; killed at teardown."""
    yield from spawn_scripts(VOTER)
