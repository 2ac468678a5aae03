"""The real services (Kafka, redis-server) for one test session, started by the project's script.

``deploy/services/services.py`` does the work, exactly as ``make services`` does, with a state
folder under the session's tmp dir and this process as the owner: if pytest is killed, the
script's watcher stops the services. If they cannot start, tests that need them are skipped
with the reason, except under CI (``CI=true``), where that fails the session: a CI run must
never pass by skipping its integration tests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "services" / "services.py"
START_TIMEOUT_S = 600  # the first run fetches the Kafka jars (and maybe redis-server)


@dataclass(frozen=True)
class Services:
    bus_url: str
    """``kafka://127.0.0.1:PORT``"""
    registry_url: str
    """``redis://127.0.0.1:PORT/0``"""
    state_dir: Path

    @property
    def kafka_servers(self) -> list[str]:
        return [self.bus_url.removeprefix("kafka://")]


def _run(command: str, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), command, "--state-dir", str(state_dir), *extra],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )


def session_services(state_dir: Path) -> Iterator[Services]:
    """Start the services, yield their URLs, stop them (a generator for a session fixture)."""
    try:
        done = _run("start", state_dir, "--owner-pid", str(os.getpid()))
        failure = None if done.returncode == 0 else f"exit status {done.returncode}\n{done.stderr[-4000:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        done, failure = None, str(exc)
    if failure is not None:
        _unavailable(f"the Kafka and Redis services did not start ({SCRIPT.name} start): {failure}")
    assert done is not None
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    try:
        yield Services(env["KTO_BUS_URL"], env["KTO_REGISTRY_URL"], state_dir)
    finally:
        stopped = _run("stop", state_dir)
        if stopped.returncode != 0:
            logger.warning("stopping the services failed: %s", stopped.stderr)


def _services_module():
    """deploy/services/services.py as a module (it is a script, not part of a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kto_services", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


class PrivateRedis:
    """A redis-server of one test's own, with an append-only file, that the test may stop and restart
    on the same port (the shared session services must never be restarted under other tests)."""

    def __init__(self, state_dir: Path):
        self._svc = _services_module()
        self.state_dir = state_dir
        try:
            self._binary = self._svc.ensure_redis_server()
        except SystemExit as exc:
            _unavailable(f"redis-server is not available: {exc}")
        (self.port,) = self._svc.free_ports(1)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start(fresh=True)

    def start(self, fresh: bool = False) -> None:
        self._svc.start_redis(self.state_dir, self.port, self._binary, fresh=fresh, persistent=True)

    def stop(self) -> None:
        self._svc._terminate(self.state_dir / "redis" / "redis.pid", "redis-server", grace_s=10.0)

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivateKafka:
    """A Kafka broker of one test's own that the test may stop and restart on the same ports and data."""

    def __init__(self, state_dir: Path, cache_dir: Path | None = None):
        import shutil

        self._svc = _services_module()
        self.state_dir = state_dir
        self._cache = cache_dir or self._svc.DEFAULT_CACHE
        self._java = shutil.which("java")
        if not self._java:
            _unavailable("java not found: Kafka 4 needs Java 17 or newer")
        self._libs = self._svc.ensure_kafka_libs(self._cache)
        self.port, self._controller_port = self._svc.free_ports(2)
        self.url = f"kafka://127.0.0.1:{self.port}"
        self.start(fresh=True)

    def start(self, fresh: bool = False) -> None:
        for attempt in range(3):
            try:
                self._svc.start_kafka(
                    self.state_dir, self._libs, self.port, self._controller_port, self._java, fresh=fresh
                )
                return
            except SystemExit as exc:
                self.stop(kill=True)
                if attempt == 2:
                    _unavailable(f"the private Kafka broker did not start: {exc}")
                # A loaded box can miss the readiness deadline, or a port be taken meanwhile: try again
                # (a fresh broker on new ports; a restart on its own ports and data).
                logger.warning("the private Kafka broker did not start (%s); trying again", str(exc)[:200])
                if fresh:
                    self.port, self._controller_port = self._svc.free_ports(2)
                    self.url = f"kafka://127.0.0.1:{self.port}"

    def stop(self, kill: bool = False) -> None:
        """Stop the broker: a controlled shutdown, or SIGKILL with ``kill``."""
        pid_file = self.state_dir / "kafka" / "kafka.pid"
        self._svc._terminate(pid_file, "kafka.Kafka", grace_s=0.0 if kill else 20.0)

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()
