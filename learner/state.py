"""The learner's own state between updates and restarts: how far it trained, on which lineage.

Written atomically (temp file, fsync, rename) after each publish. Losing it is safe: the
watermark falls back to 0 (old labels are replayed, none is lost) and the optimizer restarts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class LearnerState:
    path: Path
    watermark: int = 0
    """Buffer seq up to which labels have been trained on."""
    version: str | None = None
    """The last version this learner published that passed the gate: its lineage owns `optimizer`."""
    optimizer: dict | None = field(default=None, repr=False)
    deferred: list[str] = field(default_factory=list, repr=False)
    """response_ids of fresh examples at or below `watermark` that the per-user cap left for a
    later update (see `LearnerSettings.max_user_share`)."""

    @classmethod
    def load(cls, path: Path) -> LearnerState:
        if not path.exists():
            return cls(path)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return cls(path, saved["watermark"], saved["version"], saved["optimizer"], saved.get("deferred", []))
        except Exception:
            logger.exception("unreadable learner state %s: starting from watermark 0", path)
            return cls(path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(
                {
                    "watermark": self.watermark,
                    "version": self.version,
                    "optimizer": self.optimizer,
                    "deferred": self.deferred,
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
