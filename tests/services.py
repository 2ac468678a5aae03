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
        why = f"the Kafka and Redis services did not start ({SCRIPT.name} start): {failure}"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    assert done is not None
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    try:
        yield Services(env["KTO_BUS_URL"], env["KTO_REGISTRY_URL"], state_dir)
    finally:
        stopped = _run("stop", state_dir)
        if stopped.returncode != 0:
            logger.warning("stopping the services failed: %s", stopped.stderr)
