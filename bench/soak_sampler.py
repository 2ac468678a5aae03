"""What the soak benchmark (bench/soak.py) samples of a running `kto-loop up`, and the fits made
of the samples.

Processes: the `up` process is the server; its descendants are named by their `kto-loop`
subcommand (`learn` -> learner, `label` -> labeler), so a restarted learner is the same row under
a new pid. RSS is VmRSS from /proc/<pid>/status (Linux only; psutil is not a dependency).

Stores: every file under the data directory, grouped by its path up to the first dot of its
name (`bus.sqlite3`, `bus.sqlite3-wal` and `-shm` are the store `bus`; `learner/state.pt` and the
`learner/state.tmp` it is written through are `learner/state`), except the registry's version
directories, which are one store of their own, counted in directories as well as bytes.
Bytes are file sizes (st_size), not blocks: what the loop wrote, the same on any filesystem.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROLES = {"serve": "server", "up": "server", "learn": "learner", "label": "labeler"}
"""`kto-loop` subcommand -> the process's row."""
VERSIONS_STORE = "registry/versions"


# ---- processes -------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` in MiB; None when the process is gone (or is a zombie, which has none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's list: a child belongs to the thread that forked it)."""
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(p) for p in path.read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended while we looked
    return sorted(found)


def role(pid: int) -> str:
    """The row a process is reported in: its `kto-loop` subcommand's role, or its program's name."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "gone"
    if "kto_loop.cli" in argv:
        after = argv[argv.index("kto_loop.cli") + 1 :]
        return ROLES.get(after[0], after[0]) if after else "kto-loop"
    return f"other: {Path(argv[0]).name}" if argv else "other"


def process_tree(root: int) -> dict[int, str]:
    """{pid: role} of `root` (the server) and every process below it."""
    tree, todo = {root: "server"}, children(root)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree[pid] = role(pid)
            todo += children(pid)
    return tree


# ---- stores ----------------------------------------------------------------------------------


def store_name(relative: Path) -> str:
    """The store a file under the data directory belongs to (see the module docstring)."""
    if relative.as_posix().startswith(VERSIONS_STORE + "/"):
        return VERSIONS_STORE
    stem = relative.name.split(".", 1)[0] or relative.name  # a dot file is a store of its own
    return (relative.parent / stem).as_posix()


@dataclass
class Disk:
    """One scan of the data directory."""

    stores: dict[str, int] = field(default_factory=dict)  # store -> bytes
    files: dict[str, set[str]] = field(default_factory=dict)  # store -> names of its files (not versions')
    versions: dict[str, int] = field(default_factory=dict)  # version directory -> bytes


def scan(data_dir: Path) -> Disk:
    """Bytes of every store under `data_dir`, and of each registry version directory. Files that
    vanish while the scan runs (a version pruned, a temp file renamed) are skipped."""
    disk = Disk()
    versions_dir = data_dir / VERSIONS_STORE
    for dirpath, _dirs, files in os.walk(data_dir):
        for name in files:
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            relative = path.relative_to(data_dir)
            store = store_name(relative)
            disk.stores[store] = disk.stores.get(store, 0) + size
            if store != VERSIONS_STORE:
                disk.files.setdefault(store, set()).add(relative.name)
            if store == VERSIONS_STORE:
                top = path.relative_to(versions_dir).parts[0]
                if not top.startswith(".") and len(path.relative_to(versions_dir).parts) > 1:  # not .staging
                    disk.versions[top] = disk.versions.get(top, 0) + size
    return disk


# ---- fits ------------------------------------------------------------------------------------


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys against xs; NaN with fewer than two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} xs but {len(ys)} ys")
    if len(set(xs)) < 2:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def after_warmup(ts: Sequence[float], warmup_s: float) -> list[int]:
    """Indices of the samples taken after the warm-up; every index when fewer than 3 are left."""
    kept = [i for i, t in enumerate(ts) if t >= warmup_s]
    return kept if len(kept) >= 3 else list(range(len(ts)))


def mib_per_hour(ts: Sequence[float], mib: Sequence[float], warmup_s: float) -> float:
    """RSS slope in MiB per hour over the samples after the warm-up (`ts` in seconds)."""
    kept = after_warmup(ts, warmup_s)
    return slope([ts[i] for i in kept], [mib[i] for i in kept]) * 3600


def per_1000_ratings(ratings: Sequence[float], sizes: Sequence[float], ts: Sequence[float], warmup_s: float) -> float:
    """Growth of a store in bytes per 1,000 ratings: the least-squares slope of its size against
    the ratings accepted so far, over the samples after the warm-up. A store that is pruned as it
    goes shows a slope near 0, however large its teeth."""
    kept = after_warmup(ts, warmup_s)
    return slope([ratings[i] for i in kept], [sizes[i] for i in kept]) * 1000
