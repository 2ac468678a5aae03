"""A small disk of a test's own: a tmpfs mounted on a directory, and a ballast file that fills it.

Mounting needs root (CI runs as root). Without it, or when the mount fails, the tests that need
one are skipped with the reason, except under CI (``CI=true``), where that fails them: a full
disk is a condition the product answers, and CI must see it answered.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.services import _unavailable

MiB = 2**20


@contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted on `path` (created), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs (a small disk to fill) needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        _unavailable(f"cannot mount a tmpfs on {path}: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # a file still open: detach it now


def fill(directory: Path) -> Path:
    """Write a ballast file in `directory` until its disk is full (ENOSPC); the ballast's path."""
    ballast = directory / "ballast"
    with ballast.open("ab", buffering=0) as f:  # unbuffered: nothing left to flush on close
        for chunk in (MiB, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return ballast
