"""Fixtures for the ingest tests: a bus (embedded or Kafka), a fake clock, child processes.

A test runs on the embedded bus unless its module parametrizes ``backend`` (``both_backends``):
then it runs once per backend, on Kafka against the session's broker (the ``services``
fixture), with topic and group names of its own (``helpers.NamespacedBus``).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.kafka_bus import KafkaBus
from ingest.sqlite_bus import SqliteBus
from tests.ingest.helpers import NamespacedBus
from tests.tiny import FakeClock, spawn_scripts

WORKERS = Path(__file__).with_name("workers.py")

BACKENDS = ["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)]
both_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
kafka_only = pytest.mark.parametrize("backend", [pytest.param("kafka", marks=pytest.mark.kafka)], indirect=True)

KAFKA_TEST_OPTIONS: dict[str, Any] = {
    "timeout_s": 10.0,
    # Short, so that rebalances and crash take-overs happen within a second or a few.
    "session_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "max_poll_interval_s": 20.0,
    # New topics show up in a subscription within a second.
    "metadata_max_age_s": 1.0,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.sqlite3"


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """ "sqlite" or "kafka": the embedded bus unless the module parametrizes it."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def open_test_bus(backend: str, bus_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], Any]]:
    """``open_test_bus()``: a new handle on this test's log (the same file, or the same Kafka names).

    Everything it opened is closed at teardown, Kafka consumers included: a member left open
    would hold up its group's rebalances until its poll interval runs out.
    """
    opened: list[Any] = []
    if backend == "kafka":
        services = request.getfixturevalue("services")
        prefix = f"test-{uuid.uuid4().hex[:12]}"

        def make() -> Any:
            return NamespacedBus(KafkaBus(services.kafka_servers, **KAFKA_TEST_OPTIONS), prefix)
    else:

        def make() -> Any:
            return SqliteBus(bus_path)

    def open_() -> Any:
        opened.append(make())
        return opened[-1]

    yield open_
    for bus in opened:
        for consumer in getattr(bus, "consumers", []):
            consumer.close()
        bus.close()


@pytest.fixture
def bus(open_test_bus: Callable[[], Any]) -> Any:
    return open_test_bus()


@pytest.fixture
def bus_url(backend: str, bus_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL a child process opens this test's bus with (topic names: ``bus.real(...)`` on Kafka)."""
    if backend == "kafka":
        return request.getfixturevalue("services").bus_url
    return f"sqlite:///{bus_path}"


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``tests/ingest/workers.py`` with arguments in a child process; killed at teardown."""
    yield from spawn_scripts(WORKERS)
