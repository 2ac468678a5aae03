"""Run by the registry tests in a child process: publish adapters, optionally stalling at a
publish checkpoint (after touching a marker file) so that the parent can SIGKILL it there.

usage: _publish_worker.py URL ADAPTER_DIR BASE_MODEL COUNT TAG [STALL_STAGE MARKER]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import registry.sqlite_registry as sqlite_registry
from registry import open_registry


def main() -> None:
    url, adapter_dir, base_model, count, tag = sys.argv[1:6]
    if len(sys.argv) > 6:
        stage, marker = sys.argv[6], Path(sys.argv[7])

        def stall(reached: str) -> None:
            if reached == stage:
                marker.touch()
                time.sleep(600)  # the parent kills us here

        sqlite_registry._checkpoint = stall
    reg = open_registry(url)
    for i in range(int(count)):
        reg.publish(
            Path(adapter_dir),
            base_model=base_model,
            parent=None,
            metrics={"tag": tag, "i": i},
            lineage={},
        )
    reg.close()


if __name__ == "__main__":
    main()
