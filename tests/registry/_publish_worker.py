"""Run by the registry tests in a child process: publish adapters, optionally stalling at a
publish checkpoint (after touching a marker file) so that the parent can SIGKILL it there.

usage: _publish_worker.py URL ADAPTER_ROOT ADAPTER_DIR BASE_MODEL COUNT TAG [STALL_STAGE MARKER]
(ADAPTER_ROOT "-" for the backend's default)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import registry.publishing as publishing
from registry import open_registry


def main() -> None:
    url, adapter_root, adapter_dir, base_model, count, tag = sys.argv[1:7]
    if len(sys.argv) > 7:
        stall_at, marker = sys.argv[7], Path(sys.argv[8])

        def stall(stage: str) -> None:
            if stage == stall_at:
                marker.touch()
                time.sleep(600)  # the parent kills us here

        publishing._checkpoint = stall
    reg = open_registry(url, None if adapter_root == "-" else Path(adapter_root))
    for i in range(int(count)):
        reg.publish(Path(adapter_dir), base_model=base_model, parent=None, metrics={"tag": tag, "i": i}, lineage={})
    reg.close()


if __name__ == "__main__":
    main()
