"""Custom labelers: Python code an operator installs, found through the `kto_loop.labelers`
entry point group and enabled by name (`KTO_LABELERS=toxicity,pii`).

An entry point names a class or a factory; called with no arguments it gives an object with a
`label(response: ingest.events.ResponseEvent) -> "desirable" | "undesirable" | None` method (None:
no label). Its labels are written as source `rule:<entry point name>` and, like a rule's, once per
answer and version: the version is the installed distribution's, so upgrading the package labels
new answers anew. A labeler that raises on an answer is logged and counted, never fatal.

    # in the plugin's pyproject.toml
    [project.entry-points."kto_loop.labelers"]
    toxicity = "my_package.toxicity:ToxicityLabeler"
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from ingest.events import ResponseEvent
from labelers.rules import RULE_NAME, Label

logger = logging.getLogger(__name__)

GROUP = "kto_loop.labelers"


class CustomLabeler(Protocol):
    def label(self, response: ResponseEvent) -> Label | None: ...


@dataclass(frozen=True)
class Plugin:
    name: str
    version: str
    """The distribution's version, part of each label's event id."""
    labeler: CustomLabeler

    @property
    def source(self) -> str:
        return f"rule:{self.name}"


class PluginError(ValueError):
    """An enabled labeler that is not installed, or cannot be loaded."""


def load_plugins(names: list[str]) -> list[Plugin]:
    """The enabled labelers, loaded; PluginError naming what is wrong (and what is installed)."""
    if not names:
        return []
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    plugins = []
    for name in names:
        if name not in found:
            installed = ", ".join(sorted(found)) or "none"
            raise PluginError(f"labeler {name!r} is not installed (entry points in {GROUP}: {installed})")
        if not _valid_name(name):
            raise PluginError(f"labeler {name!r}: an entry point name must match {RULE_NAME}")
        entry = found[name]
        try:
            labeler: Any = entry.load()()
        except Exception as e:  # its code, not ours: say which one failed and why
            raise PluginError(f"labeler {name!r} ({entry.value}) failed to load: {e!r}") from e
        if not callable(getattr(labeler, "label", None)):
            raise PluginError(f"labeler {name!r} ({entry.value}) has no label(response) method")
        version = entry.dist.version if entry.dist is not None else "0"
        plugins.append(Plugin(name, version, labeler))
        logger.info("custom labeler %s %s from %s", name, version, entry.value)
    return plugins


def _valid_name(name: str) -> bool:
    return re.match(RULE_NAME, name) is not None
