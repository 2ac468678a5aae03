"""`kto-loop up`'s children (the learner, the labeler): started, restarted when they die, reported.

Rules:

- A child that exits with a failure (a nonzero status, or killed by a signal) is started again
  after a backoff: 1 s, doubling up to 60 s, back to 1 s once it had run for `STABLE_S`.
- Exit status 2 means "a restart cannot fix this" (bad settings, a model that cannot load, a
  file of a newer layout: `kto-loop learn` says which on its last line): it is not restarted,
  and the status says so (`gave_up`) until `kto-loop up` is restarted.
- Exit status 0, or death by SIGTERM or SIGINT, means it was asked to stop (as systemd's
  Restart=on-failure reads them): it is not restarted either.
- `stop()` ends the supervision first, then the children (SIGTERM, SIGKILL after a timeout).

The server reads `status()` (serve.processes) for /readyz and /metrics.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from serve.processes import ProcessStatus

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_S = 60.0
"""A child that ran this long before it died is restarted after the first backoff again (seconds)."""
CANNOT_FIX = 2
"""The exit status of a process that a restart cannot fix."""
STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})
"""Exit statuses of a process that was asked to stop (Popen's negative: killed by that signal)."""


class _Child:
    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
        self.name, self.argv, self.env = name, list(argv), env
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.gave_up: str | None = None
        self.thread: threading.Thread | None = None


class Supervisor:
    """Starts children and keeps them running; see the module docstring. Thread-safe."""

    def __init__(
        self,
        *,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        stable_s: float = STABLE_S,
    ) -> None:
        self.first_backoff_s, self.max_backoff_s, self.stable_s = first_backoff_s, max_backoff_s, stable_s
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # a child's process is replaced, or stopped, under it
        self._stopping = threading.Event()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Run `argv` as the child `name` from now on; its first pid."""
        child = _Child(name, argv, env)
        with self._lock:
            child.process = subprocess.Popen(child.argv, env=child.env)
            self._children.append(child)
        child.thread = threading.Thread(target=self._watch, args=(child,), name=f"supervise-{name}", daemon=True)
        child.thread.start()
        return child.process.pid

    def status(self) -> list[ProcessStatus]:
        with self._lock:
            return [
                ProcessStatus(
                    name=c.name,
                    up=c.process is not None and c.process.poll() is None,
                    pid=c.process.pid if c.process is not None else None,
                    restarts=c.restarts,
                    last_exit=c.last_exit,
                    gave_up=c.gave_up,
                )
                for c in self._children
            ]

    def stop(self, timeout_s: float = 30.0) -> None:
        """No more restarts; SIGTERM to every child, SIGKILL to those still running after `timeout_s`."""
        with self._lock:
            self._stopping.set()
            running = [c.process for c in self._children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in self._children:
            if child.thread is not None:
                child.thread.join(timeout=5)

    def _watch(self, child: _Child) -> None:
        backoff = self.first_backoff_s
        while True:
            process = child.process
            assert process is not None
            started = time.monotonic()
            code = process.wait()
            ran = time.monotonic() - started
            with self._lock:
                child.last_exit = code
            if self._stopping.is_set():
                return
            if code in STOPPED:
                logger.info("%s (pid %d) stopped (status %d); not restarting it", child.name, process.pid, code)
                return
            if code == CANNOT_FIX:
                child.gave_up = f"exited with status {CANNOT_FIX}: a restart cannot fix it (its log says why)"
                logger.error("%s (pid %d) %s; not restarting it", child.name, process.pid, child.gave_up)
                return
            if ran >= self.stable_s:
                backoff = self.first_backoff_s
            logger.error(
                "%s (pid %d) died (status %d) after %.0f s; restarting in %.0f s",
                child.name,
                process.pid,
                code,
                ran,
                backoff,
            )
            if self._stopping.wait(backoff):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    child.process = subprocess.Popen(child.argv, env=child.env)
                except OSError as exc:  # the old process answers wait() at once: the next try backs off more
                    logger.error("cannot restart %s: %s", child.name, exc)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                child.restarts += 1
            logger.info("%s restarted (pid %d, restart %d)", child.name, child.process.pid, child.restarts)
            backoff = min(backoff * 2, self.max_backoff_s)
