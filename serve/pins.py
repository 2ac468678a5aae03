"""Which adapter versions an engine holds, and which it may unload: the bookkeeping behind the
hot-swap rule, shared by every engine (serve.generation).

A version stays loaded while hot-swap keeps it (the active version, the previous one, the
canary's candidate) or while any request pinned to it is still running. `pin` (at submit) and
`collect` (the unloading) take the same lock, so a version can never be pinned while it is
being unloaded.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable


class VersionPins:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._keep: set[str] = set()
        self._held: Counter[str | None] = Counter()

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self._loaded)

    def pin(self, version: str | None) -> None:
        """A request starts on `version` (None: the base model); KeyError when it is not loaded."""
        with self._lock:
            if version is not None and version not in self._loaded:
                raise KeyError(version)
            self._held[version] += 1

    def release(self, version: str | None) -> None:
        """That request finished (or failed, or was cancelled)."""
        with self._lock:
            self._held[version] -= 1

    def add(self, version: str) -> None:
        """`version` is loaded now, and kept until the next `keep` leaves it out."""
        with self._lock:
            self._loaded.add(version)
            self._keep.add(version)

    def keep(self, versions: set[str]) -> None:
        with self._lock:
            self._keep = set(versions)

    def collect(self, unload: Callable[[str], object], *, keep_one: bool = False) -> list[str]:
        """Unload, by calling `unload`, every version neither kept nor held; the ones unloaded.
        `keep_one`: never unload the last loaded version (PEFT's model needs one to stay wrapped)."""
        with self._lock:
            held = {v for v, n in self._held.items() if n > 0}
            gone = []
            for version in sorted(self._loaded - self._keep - held):
                if keep_one and len(self._loaded) == 1:
                    break
                unload(version)
                self._loaded.discard(version)
                gone.append(version)
            return gone
