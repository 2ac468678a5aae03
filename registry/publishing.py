"""The publish protocol every backend follows, safe against a kill at any point.

 1. take the publish lock (`AdapterFiles.publish_lock`: publishes are serialized across every
    process sharing the adapter root; they are rare and short);
 2. reserve the name: the backend records it as pending, invisible to every read;
 3. copy the files to .staging/<version>, fsync files and directories;
 4. rename to <adapter_root>/<version>, fsync the parent;
 5. the backend flips pending to ready (or rejected) atomically: now the version is visible.
Whoever next holds the lock with nothing in flight (the next publish, or any open) sweeps what a
killed publish left: staging directories and the directories of pending names, which become
abandoned so that they are never handed out again.

A backend supplies only its metadata side, a `Catalog`; the files are the same everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from registry import store
from registry.errors import RegistryError
from registry.versions import VersionInfo, metadata_json

logger = logging.getLogger(__name__)

VISIBLE = ("ready", "rejected")


@dataclass(frozen=True)
class NewVersion:
    """What a publish records besides the files, validated before anything is written."""

    status: str
    parent: str | None
    base_model: str
    metrics_json: str
    lineage_json: str
    rejected_reason: str | None

    @classmethod
    def checked(
        cls,
        src_dir: Path,
        *,
        base_model: str,
        parent: str | None,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str,
        rejected_reason: str | None,
    ) -> NewVersion:
        """ValueError or InvalidAdapter for a request that must not start."""
        if status not in VISIBLE:
            raise ValueError(f"status must be 'ready' or 'rejected', not {status!r}")
        if (status == "rejected") != bool(rejected_reason):
            raise ValueError("rejected_reason is required with status 'rejected' and only then")
        store.check_source(src_dir)
        return cls(
            status=status,
            parent=parent,
            base_model=base_model,
            metrics_json=metadata_json(metrics, "metrics"),
            lineage_json=metadata_json(lineage, "lineage"),
            rejected_reason=rejected_reason,
        )


class Catalog(Protocol):
    """A backend's metadata side of a publish; each step is atomic on its own."""

    def reserve(self) -> str:
        """Allocate the next version name (never reused) and record it as pending."""
        ...

    def commit(self, version: str, new: NewVersion, files: dict[str, str]) -> None:
        """Pending → new.status with the metadata and the file manifest; RegistryError if the
        name is no longer pending."""
        ...

    def abandon(self, version: str) -> bool:
        """Pending → abandoned; False (and nothing changed) if the name was not pending."""
        ...

    def pending(self) -> list[str]:
        """Names still pending."""
        ...


def _checkpoint(stage: str) -> None:
    """Called between publish steps; tests replace it to kill a publish at a known point."""


class Publishing:
    """`Registry.publish`: it uses the backend's `_files` (store.AdapterFiles), `_catalog` (a
    Catalog) and `get` (registry.base.Registry)."""

    _files: store.AdapterFiles
    _catalog: Catalog

    def get(self, version: str) -> VersionInfo:
        raise NotImplementedError

    def publish(
        self,
        src_dir: Path,
        *,
        base_model: str,
        parent: str | None,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "ready",
        rejected_reason: str | None = None,
    ) -> VersionInfo:
        """Copy a PEFT adapter directory in as a new immutable version, atomically: check the
        request, then run the protocol above."""
        src_dir = Path(src_dir)
        new = NewVersion.checked(
            src_dir,
            base_model=base_model,
            parent=parent,
            metrics=metrics,
            lineage=lineage,
            status=status,
            rejected_reason=rejected_reason,
        )
        if parent is not None:
            self.get(parent)  # UnknownVersion: lineage must point at a real version
        version = _publish_files(self._files, self._catalog, src_dir, new)
        logger.info("published %s (parent %s, status %s)", version, parent, status)
        return self.get(version)


def _publish_files(files: store.AdapterFiles, catalog: Catalog, src_dir: Path, new: NewVersion) -> str:
    with files.publish_lock():
        _sweep_locked(files, catalog)
        version = catalog.reserve()
        if files.path(version).exists():
            # Never delete it: it belongs to a version this registry's metadata no longer knows.
            catalog.abandon(version)
            raise RegistryError(
                f"{files.path(version)} already exists although {version} was just allocated: "
                f"the registry's metadata was lost, or another registry uses {files.root}"
            )
        try:
            _checkpoint("reserved")
            manifest = files.stage(src_dir, version)
            _checkpoint("staged")
            files.promote(version)
            _checkpoint("renamed")
        except BaseException:
            logger.exception("publish of %s failed; cleaning up", version)
            _abandon(files, catalog, version)
            raise
        try:
            catalog.commit(version, new, manifest)
        except BaseException:
            # The commit may have applied with only its reply lost (a network store): the files
            # go only with a name still pending. If even that cannot be asked, the next sweep will.
            logger.exception("publish of %s failed at its commit; cleaning up", version)
            if catalog.abandon(version):
                files.remove(version)
            raise
    return version


def sweep_if_idle(files: store.AdapterFiles, catalog: Catalog) -> None:
    """Clean up after killed publishes, unless a publish is in flight (it will do it)."""
    with files.publish_lock(blocking=False) as acquired:
        if acquired:
            _sweep_locked(files, catalog)
        else:
            logger.debug("a publish is in flight; sweeping is left to it")


def _sweep_locked(files: store.AdapterFiles, catalog: Catalog) -> None:
    """With the publish lock held nothing is in flight, so all pending work is debris."""
    for version in catalog.pending():
        logger.warning("removing %s, left behind by an interrupted publish", version)
        _abandon(files, catalog, version)
    files.sweep_staging()


def _abandon(files: store.AdapterFiles, catalog: Catalog, version: str) -> None:
    # Directories first, then the record: a kill in between leaves a name the next sweep redoes.
    files.remove(version)
    catalog.abandon(version)
