"""Immutable adapter directories on disk: durable copies, checksums, atomic renames.

A version directory is written under a staging name, every file and directory is fsynced, and
only then is it renamed to its final name, so a reader never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from registry.errors import InvalidAdapter

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_CHUNK = 1 << 20


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
