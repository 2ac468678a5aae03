"""Several processes on one registry, every backend: concurrent publishes, killed publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from registry import UnknownVersion
from testkit.waiting import wait_for

WORKER = Path(__file__).with_name("_publish_worker.py")


def _worker(url: str, root: Path | None, adapter_dir: Path, base_model: str, count: int, tag: str, *stall: str):
    return subprocess.Popen(
        [sys.executable, str(WORKER), url, str(root or "-"), str(adapter_dir), base_model, str(count), tag, *stall],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_processes_publish_concurrently(registry_url, adapter_root, open_reg, adapter_dir, base_model):
    procs = [_worker(registry_url, adapter_root, adapter_dir, base_model, 8, tag) for tag in ("a", "b")]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    reg = open_reg()
    versions = reg.list_versions()
    assert [v.version for v in versions] == [f"v{i:04d}" for i in range(1, 17)]
    published = sorted((v.metrics["tag"], v.metrics["i"]) for v in versions)
    assert published == sorted((tag, i) for tag in ("a", "b") for i in range(8))
    for v in versions:
        reg.verify_files(v.version)


def _wait_for(marker: Path, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    """Until the worker touched `marker` (it then stalls there); killed if the wait fails."""

    def reached() -> bool:
        if marker.exists():
            return True
        assert proc.poll() is None, f"worker exited before its checkpoint: {proc.communicate()[0]}"
        return False

    try:
        wait_for(reached, what="the worker at its checkpoint", timeout_s=deadline_s, interval_s=0.02)
    except AssertionError:
        proc.kill()
        raise


@pytest.mark.parametrize("stage", ["reserved", "staged", "renamed"])
def test_publish_killed_midway_leaves_no_version(
    stage, registry_url, adapter_root, open_reg, adapter_dir, base_model, tmp_path
):
    marker = tmp_path / "reached"
    proc = _worker(registry_url, adapter_root, adapter_dir, base_model, 1, "killed", stage, str(marker))
    _wait_for(marker, proc)

    # While the publish hangs, readers see nothing of it and opening does not disturb it.
    reg = open_reg()
    assert reg.list_versions() == []
    with pytest.raises(UnknownVersion):
        reg.get("v0001")
    reg.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    reg = open_reg()  # sweeps the debris
    assert reg.list_versions() == []
    root = reg.adapter_root
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert list((root / ".staging").iterdir()) == []
    info = reg.publish(adapter_dir, base_model=base_model, parent=None, metrics={}, lineage={})
    assert info.version == "v0002"  # the killed publish's name is never reused
    reg.verify_files(info.version)
    assert [v.version for v in reg.list_versions()] == ["v0002"]
