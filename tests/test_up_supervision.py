"""`kto-loop up` keeps its learner running: killed with SIGKILL, it is started again, the restart
is counted in /readyz and /metrics, readiness never depends on it, and stopping `up` (SIGTERM to
it alone) stops its children too."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.ports import free_port
from testkit.processes import assert_running, log_on_failure, start, stop, wait_ready
from testkit.waiting import wait_for
from tests.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_metrics(url: str) -> dict[tuple[str, str], float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    return {
        (s.name, s.labels["process"]): s.value for f in families if f.name.startswith("kto_process_") for s in f.samples
    }


def test_a_killed_learner_is_restarted_and_counted(tmp_path, tiny_model_dir):
    port = free_port()
    env = {
        "KTO_DATA_DIR": str(tmp_path / "data"),
        "KTO_PORT": str(port),
        "KTO_MODEL": str(tiny_model_dir),
        "KTO_MODEL_ID": TINY_MODEL_ID,
    }
    log = tmp_path / "up.log"
    up = start("up", env, log, log_level="info")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(up, url, log)
        first = httpx.get(f"{url}/readyz").json()["processes"]["learner"]
        assert first["up"] and first["restarts"] == 0
        assert process_metrics(url)[("kto_process_restarts_total", "learner")] == 0

        os.kill(first["pid"], signal.SIGKILL)

        def restarted() -> dict | None:
            assert_running(up)
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text  # serving never depended on the learner
            learner = ready.json()["processes"]["learner"]
            return learner if learner["restarts"] == 1 and learner["up"] else None

        with log_on_failure(log):
            learner = wait_for(restarted, what="the learner started again", timeout_s=60)
        assert learner is not None
        assert learner["pid"] != first["pid"] and learner["last_exit"] == -signal.SIGKILL
        assert httpx.get(f"{url}/readyz").json()["checks"]["learner"] is True
        metrics = process_metrics(url)
        assert metrics[("kto_process_restarts_total", "learner")] == 1
        assert metrics[("kto_process_up", "learner")] == 1
        children = [p["pid"] for p in httpx.get(f"{url}/readyz").json()["processes"].values()]

        up.send_signal(signal.SIGTERM)  # to `up` alone, not its process group
        up.wait(timeout=60)
        wait_for(lambda: not any(alive(pid) for pid in children), what="the children to stop with up")
    finally:
        stop(up)
