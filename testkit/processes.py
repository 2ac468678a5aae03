"""Child processes of tests and benchmarks: `kto-loop` commands (and other servers, such as
Prometheus) in their own process group, their output in a log file.

A process group of its own, so that `stop` reaches whatever the command started (`kto-loop up`
runs the server and the learner as its children) and a Ctrl-C of the parent does not; the log
file, so that a failure can show how the child's output ended, and so that a child never blocks
on a full pipe nobody reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from testkit.waiting import wait_for

STOP_TIMEOUT_S = 30.0
"""Seconds `stop` waits after SIGTERM before it sends SIGKILL."""
READY_TIMEOUT_S = 120.0
"""Seconds `wait_ready` waits by default for a process to answer."""
TAIL_CHARS = 3000
"""How much of a log's end a failure shows."""


def spawn(
    argv: list[str], log: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """`argv` in its own process group (a new session), stdout and stderr appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start(
    command: str,
    env: Mapping[str, str],
    log: Path,
    *,
    log_level: str = "warning",
    args: tuple[str, ...] = (),
    inherit_env: bool = True,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """`kto-loop <command> --log-level <log_level> [args]` by `spawn`. `env` is added to this
    process's environment (inherit_env=False: `env` is the whole environment)."""
    argv = [sys.executable, "-m", "kto_loop.cli", command, "--log-level", log_level, *args]
    return spawn(argv, log, env={**os.environ, **env} if inherit_env else env, cwd=cwd)


def stop(process: subprocess.Popen, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process's group, SIGKILL to it after `timeout_s`; returns once the process
    exited. Nothing to do when it already has."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def assert_running(process: subprocess.Popen) -> None:
    assert process.poll() is None, f"{describe(process)} exited with {process.returncode}"


def describe(process: subprocess.Popen) -> str:
    """The command line, `kto-loop …` for a `start`ed one."""
    args = process.args
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    return " ".join(["kto-loop", *argv[3:]] if argv[1:3] == ["-m", "kto_loop.cli"] else argv)


def log_tail(log: Path, chars: int = TAIL_CHARS) -> str:
    """The last `chars` characters of `log` ('' when there is none yet)."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


@contextmanager
def log_on_failure(log: Path | None) -> Iterator[None]:
    """An AssertionError raised inside gets the end of `log` added to its message (None: as is)."""
    try:
        yield
    except AssertionError as exc:
        if log is not None:
            exc.args = (f"{exc}\n--- the end of {log}:\n{log_tail(log)}",)
        raise


def wait_ready(
    process: subprocess.Popen, url: str, log: Path, *, timeout_s: float = READY_TIMEOUT_S, path: str = "/readyz"
) -> None:
    """Until `url + path` answers 200 (a server's /readyz, the learner's /healthz); fails, with the
    end of `log`, if the process exits first or `timeout_s` seconds pass."""

    def answers() -> bool:
        assert_running(process)
        try:
            return httpx.get(f"{url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with log_on_failure(log):
        wait_for(answers, what=f"{url}{path} to answer 200", timeout_s=timeout_s, interval_s=0.5)
