"""Immutable adapter directories on disk: durable copies, checksums, atomic renames.

A version directory is written under a staging name, every file and directory is fsynced, and
only then is it renamed to its final name, so a reader never sees a half-written version.
Every backend keeps its files this way (`AdapterFiles`); only the metadata differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.errors import InvalidAdapter, VerificationError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_CHUNK = 1 << 20
_VERSION_DIR = re.compile(r"v\d+")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    # A rename or a new file is only durable once its directory entry is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree_durably(src: Path, dst: Path) -> dict[str, str]:
    """Copy every regular file under src into the new directory dst, fsync it all, and return
    {relative posix path: sha256} of what was written. Files are made read-only: versions are
    immutable."""
    manifest: dict[str, str] = {}
    dst.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        out_dir = dst / rel_dir
        out_dir.mkdir(exist_ok=True)
        for name in sorted(filenames):
            src_file = Path(dirpath) / name
            if not src_file.is_file():
                continue  # sockets, dangling links: nothing an adapter needs
            manifest[(rel_dir / name).as_posix()] = _copy_file(src_file, out_dir / name)
        fsync_dir(out_dir)
    fsync_dir(dst.parent)
    return manifest


def _copy_file(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return digest.hexdigest()


def rename_durably(src: Path, dst: Path) -> None:
    """Atomically move the directory src to dst (same filesystem), failing if dst exists."""
    if dst.exists():
        raise FileExistsError(f"{dst} already exists")
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists."""
    if path.exists():
        shutil.rmtree(path)
        logger.debug("removed %s", path)


def check_source(src_dir: Path) -> None:
    """Raise InvalidAdapter unless src_dir holds a PEFT adapter's config and weights."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src_dir / name).is_file():
            raise InvalidAdapter(src_dir, f"{name} is missing")
    try:
        config = json.loads((src_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(src_dir, f"{CONFIG_FILE} is unreadable: {e}") from e
    if not isinstance(config, dict):
        raise InvalidAdapter(src_dir, f"{CONFIG_FILE} is not a JSON object")


class AdapterFiles:
    """The directory of immutable versions that a registry's metadata points into.

        <root>/v0001/ …        one read-only directory per version
        <root>/.staging/       versions being written
        <root>/.publish.lock   flock held for the whole of a publish

    One root belongs to one registry. With the Redis backend it is a path all replicas share
    (the lock then needs a filesystem with working flock: local disks, NFSv4, CephFS).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self._lock_path = self.root / ".publish.lock"
        self.staging.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        return self.root / version

    @contextmanager
    def publish_lock(self, blocking: bool = True) -> Iterator[bool]:
        """Hold the publish lock; yields False instead of waiting when not `blocking` and busy.
        The kernel releases it when its holder dies, so a killed publish never wedges others."""
        with open(self._lock_path, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def stage(self, src_dir: Path, version: str) -> dict[str, str]:
        """Durably copy src_dir to .staging/<version>; returns the manifest {path: sha256}."""
        return copy_tree_durably(src_dir, self.staging / version)

    def promote(self, version: str) -> None:
        """Move the staged version to its final name in one atomic rename."""
        rename_durably(self.staging / version, self.path(version))

    def remove(self, version: str) -> None:
        """Delete whatever exists of a version that never became visible."""
        remove_tree(self.staging / version)
        remove_tree(self.path(version))

    def sweep_staging(self) -> None:
        """Delete everything in .staging; only with the publish lock held and nothing in flight."""
        for leftover in self.staging.iterdir():
            logger.warning("removing staging leftover %s", leftover)
            if leftover.is_dir():
                remove_tree(leftover)
            else:
                leftover.unlink()

    def versions(self) -> list[str]:
        """The names of the version directories on disk (published, or renamed by a publish in
        flight), oldest first."""
        names = [p.name for p in self.root.iterdir() if _VERSION_DIR.fullmatch(p.name) and p.is_dir()]
        return sorted(names, key=lambda name: int(name[1:]))

    def size(self, version: str) -> int:
        """Bytes of the version's files (0 when it has none on disk)."""
        total = 0
        for path in self.path(version).rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except FileNotFoundError:  # pruned meanwhile by another process
                pass
        return total

    def verify(self, version: str, manifest: dict[str, str]) -> None:
        """Raise VerificationError unless every file of the manifest is there, unchanged."""
        root = self.path(version)
        for rel, expected in manifest.items():
            path = root / rel
            if not path.is_file():
                raise VerificationError(version, f"{rel} is missing from {root}")
            try:
                actual = sha256_file(path)
            except OSError as e:
                raise VerificationError(version, f"{rel} is unreadable: {e}") from e
            if actual != expected:
                raise VerificationError(version, f"{rel} has sha256 {actual}, expected {expected}: the file changed")
