"""`kto-loop up`'s supervisor: a child that dies is restarted with backoff, one that says a restart
cannot fix it (status 2) or that was asked to stop is not, and what happened is reported."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from kto_loop.supervisor import Supervisor
from testkit.waiting import wait_for


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def runs(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


def fast() -> Supervisor:
    return Supervisor(first_backoff_s=0.01, max_backoff_s=0.05)


def test_a_child_that_dies_is_restarted_until_it_runs(tmp_path):
    starts = tmp_path / "starts"
    # Dies (status 1) on its first two starts, then keeps running.
    code = "\n".join(
        [
            "import pathlib, sys, time",
            f"p = pathlib.Path({str(starts)!r})",
            "p.write_text(p.read_text() + 'x' if p.exists() else 'x')",
            "if len(p.read_text()) < 3: sys.exit(1)",
            "time.sleep(600)",
        ]
    )
    supervisor = fast()
    supervisor.start("learner", child(code))
    try:
        (status,) = wait_for(
            lambda: [s for s in supervisor.status() if s.up and s.restarts == 2], what="the third start running"
        )
        assert status.name == "learner" and status.last_exit == 1 and status.gave_up is None
        # Up means spawned: the third start may not have written its mark yet.
        wait_for(lambda: runs(starts) >= 3, what="the third start's mark")
        assert runs(starts) == 3
    finally:
        supervisor.stop()
    assert not any(s.up for s in supervisor.status())


def test_a_killed_child_comes_back_with_a_new_pid(tmp_path):
    supervisor = fast()
    first = supervisor.start("learner", child("import time; time.sleep(600)"))
    try:
        os.kill(first, signal.SIGKILL)
        (status,) = wait_for(
            lambda: [s for s in supervisor.status() if s.up and s.restarts == 1], what="the learner restarted"
        )
        assert status.pid != first and status.last_exit == -signal.SIGKILL
    finally:
        supervisor.stop()


def test_status_2_means_a_restart_cannot_fix_it(tmp_path):
    supervisor = fast()
    supervisor.start("learner", child("import sys; sys.exit(2)"))
    try:
        (status,) = wait_for(lambda: [s for s in supervisor.status() if s.gave_up], what="the supervisor to give up")
        assert not status.up and status.restarts == 0 and status.last_exit == 2
        assert status.gave_up is not None and "a restart cannot fix it" in status.gave_up
    finally:
        supervisor.stop()


def test_a_child_asked_to_stop_stays_stopped(tmp_path):
    supervisor = fast()
    pid = supervisor.start("labeler", child("import time; time.sleep(600)"))
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: supervisor.status()[0].last_exit == -signal.SIGTERM, what="the labeler to stop")
        supervisor.start("learner", child("pass"))  # ends at once, status 0
        wait_for(lambda: supervisor.status()[1].last_exit == 0, what="the learner to end")
        assert [(s.up, s.restarts, s.gave_up) for s in supervisor.status()] == [(False, 0, None), (False, 0, None)]
    finally:
        supervisor.stop()


def test_stop_ends_the_children_and_restarts_none(tmp_path):
    supervisor = fast()
    supervisor.start("learner", child("import time; time.sleep(600)"))
    supervisor.start("labeler", child("import time; time.sleep(600)"))
    supervisor.stop(timeout_s=10)
    assert [(s.up, s.restarts) for s in supervisor.status()] == [(False, 0), (False, 0)]
