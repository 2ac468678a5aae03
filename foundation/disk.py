"""A full disk, recognised in one place: the errors it causes, and a free-space probe with a reserve.

Every process writes SQLite files (bus, ledger, buffer, registry) and plain files (adapters, the
learner's state). When their disk fills up, the error surfaces in many shapes: ``OSError`` with
ENOSPC or EDQUOT, ``sqlite3.OperationalError`` "database or disk is full" (SQLITE_FULL), and
domain errors that wrap them (``BusUnavailable`` caused by one). ``is_disk_full`` looks through
the whole cause/context chain, so callers map a full disk to its answer (the server's 507, the
learner's wait) without knowing who wrapped it.

``DiskProbe`` says whether the directories a process writes can take writes: they can while each
filesystem has more than the reserve free (``KTO_DISK_RESERVE_MB``). The reserve lets the server
refuse new work before the disk is completely full, which leaves room for what is in flight,
for SQLite's checkpoints and for an operator's rollback. On a small filesystem the reserve is at
most ``SMALL_DISK_SHARE`` of it, so that a 100 MB disk is not refused outright.

The metrics (``kto_disk_*_bytes{path}``) are read at each scrape by ``DiskCollector``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13
"""SQLite's primary result code for "database or disk is full"."""
SMALL_DISK_SHARE = 0.05
"""The reserve is never more than this share of the filesystem's size."""


class DiskFull(OSError):
    """A directory cannot take writes: its filesystem has less free than the reserve (ENOSPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or any exception in its ``__cause__`` / ``__context__`` chain, is a full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(exc)
        ):
            return True  # the text too: an error re-raised by hand loses the code, never SQLite's words
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class Space:
    """One filesystem as a probe saw it."""

    path: Path
    """The first of the probe's directories on this filesystem."""
    free_bytes: int
    """Bytes an unprivileged process may still write (statvfs f_bavail)."""
    total_bytes: int
    reserve_bytes: int
    """Below this much free, the directory cannot take writes."""

    @property
    def writable(self) -> bool:
        return self.free_bytes >= self.reserve_bytes


class DiskProbe:
    """The free space of the filesystems holding ``paths`` (one entry per filesystem)."""

    def __init__(self, paths: Iterable[Path], reserve_bytes: int) -> None:
        """``paths``: directories (or files) the process writes; those that do not exist yet are
        probed at their nearest existing parent. ``reserve_bytes``: see the module docstring."""
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self.reserve_bytes = reserve_bytes

    def spaces(self) -> list[Space]:
        seen: dict[int, Space] = {}
        for path in self.paths:
            existing = _existing(path)
            device = os.stat(existing).st_dev
            if device in seen:
                continue
            usage = shutil.disk_usage(existing)
            reserve = min(self.reserve_bytes, int(usage.total * SMALL_DISK_SHARE))
            seen[device] = Space(path, usage.free, usage.total, reserve)
        return list(seen.values())

    def full(self) -> list[Space]:
        """The filesystems that cannot take writes now ([] when all can)."""
        return [s for s in self.spaces() if not s.writable]

    def check(self) -> None:
        """Raise ``DiskFull`` (an OSError, ENOSPC) unless every filesystem can take writes."""
        full = self.full()
        if full:
            raise DiskFull("; ".join(_describe(s) for s in full))


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _describe(space: Space) -> str:
    return (
        f"the disk of {space.path} is full: {space.free_bytes / 2**20:.1f} MiB free,"
        f" under the reserve of {space.reserve_bytes / 2**20:.1f} MiB (KTO_DISK_RESERVE_MB)"
    )


class DiskCollector(Collector):
    """``kto_disk_free_bytes``, ``kto_disk_size_bytes`` and ``kto_disk_reserve_bytes`` by ``path``,
    read from the probe at each scrape (no samples while there is no probe yet)."""

    def __init__(self) -> None:
        self.probe: DiskProbe | None = None

    def collect(self) -> Iterator[Metric]:
        families = {
            "free": GaugeMetricFamily("kto_disk_free_bytes", "Free space where this process writes.", labels=["path"]),
            "size": GaugeMetricFamily("kto_disk_size_bytes", "Size of that filesystem.", labels=["path"]),
            "reserve": GaugeMetricFamily(
                "kto_disk_reserve_bytes",
                "Below this much free, chat and feedback get 507, the learner waits.",
                labels=["path"],
            ),
        }
        try:
            spaces = self.probe.spaces() if self.probe is not None else []
        except OSError as exc:  # a scrape must not fail over a directory that went away
            logger.warning("cannot probe the disk: %s", exc)
            spaces = []
        for s in spaces:
            families["free"].add_metric([str(s.path)], s.free_bytes)
            families["size"].add_metric([str(s.path)], s.total_bytes)
            families["reserve"].add_metric([str(s.path)], s.reserve_bytes)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        yield from (GaugeMetricFamily(n, "", labels=["path"]) for n in _NAMES)


_NAMES = ("kto_disk_free_bytes", "kto_disk_size_bytes", "kto_disk_reserve_bytes")
