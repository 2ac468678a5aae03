"""testkit.processes: a child's output in its log, a failure that shows it, SIGKILL when SIGTERM is ignored."""

from __future__ import annotations

import sys

import pytest

from testkit.ports import free_port
from testkit.processes import spawn, start, stop, wait_ready
from testkit.waiting import wait_for


def test_a_kto_loop_command_that_exits_fails_the_readiness_wait_at_once_with_its_log(tmp_path):
    log = tmp_path / "nonsense.log"
    process = start("nonsense", {}, log)
    try:
        with pytest.raises(AssertionError) as failed:
            wait_ready(process, f"http://127.0.0.1:{free_port()}", log, timeout_s=60)
    finally:
        stop(process)
    message = str(failed.value)
    assert "kto-loop nonsense --log-level warning exited with 2" in message
    assert f"the end of {log}" in message and "invalid choice: 'nonsense'" in message


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path):
    log = tmp_path / "stubborn.log"
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    process = spawn([sys.executable, "-c", code], log)
    try:
        wait_for(lambda: "ready" in log.read_text(), what="the child ignoring SIGTERM", timeout_s=30)
    finally:
        stop(process, timeout_s=0.5)
    assert process.returncode == -9
