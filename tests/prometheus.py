"""Prometheus for the metrics tests: promtool, and a real server on a free 127.0.0.1 port.

Both come from Debian's `prometheus` package, installed with apt-get when missing (as root) by
``deploy/services/services.py``'s ``ensure_prometheus``. When it cannot be had the tests that
need it are skipped with the reason, except under CI (``CI=true``), where that fails them.
"""

from __future__ import annotations

import functools
import math
import subprocess
from pathlib import Path
from typing import TypeGuard

import httpx
import yaml

from testkit.ports import free_port
from testkit.processes import assert_running, log_on_failure, spawn, stop
from testkit.waiting import wait_for
from tests.services import _services_module, _unavailable


@functools.cache
def _binaries() -> tuple[str, str] | str:
    try:
        return _services_module().ensure_prometheus()
    except SystemExit as exc:
        return f"Prometheus (Debian's prometheus package) is not available: {exc}"


def binaries() -> tuple[str, str]:
    """(prometheus, promtool), or skip (fail under CI)."""
    found = _binaries()
    if isinstance(found, str):
        _unavailable(found)
    return found


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binaries()[1], *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def check_metrics(exposition: str) -> None:
    """`promtool check metrics`: the exposition parses and passes its lint (names, units, help)."""
    done = promtool("check", "metrics", stdin=exposition)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        f"promtool check metrics (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    )


class PrometheusServer:
    """`prometheus` with ``config`` (a dict, written as YAML) and its own TSDB under ``state_dir``."""

    def __init__(self, config: dict, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = state_dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = state_dir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusServer:
        self.process = spawn(
            [
                binaries()[0],
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.state_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.log,
        )
        self.wait(self._ready, what="Prometheus ready", timeout_s=60)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop(self.process, timeout_s=20)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> dict:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (path, params, reply.text)
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series; NaN stays NaN."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of a query that returns at most one series (None when it returns none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return result[0][1] if result else None

    def wait(self, condition, *, what: str, timeout_s: float = 60) -> None:
        """`wait_for` `condition`, failing at once if Prometheus exits; a failure shows its log's end."""

        def met() -> object:
            if self.process is not None:
                assert_running(self.process)
            return condition()

        with log_on_failure(self.log):
            wait_for(met, what=what, timeout_s=timeout_s, interval_s=0.25)


def finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)
