"""Domain exceptions of the adapter registry.

The HTTP layer maps these classes to status codes in one place; callers read the attributes,
never the message text.
"""

from __future__ import annotations

from pathlib import Path


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class RegistryUnavailable(RegistryError):
    """The backing store cannot be reached or used right now (locked, I/O error, damaged)."""


class UnknownVersion(RegistryError):
    """No visible version has this name."""

    def __init__(self, version: str | None) -> None:
        self.version = version
        super().__init__(f"unknown adapter version {version!r}")


class VersionPruned(UnknownVersion):
    """The version exists, but retention deleted its files: nothing can serve it again."""

    def __init__(self, version: str, pruned_at: float) -> None:
        self.pruned_at = pruned_at
        super().__init__(version)
        self.args = (
            f"adapter version {version!r} was pruned: retention deleted its files; its metadata and "
            "lineage stay (pin a version to keep it)",
        )


class VersionRejected(RegistryError):
    """The version exists but was rejected, so it can never be activated."""

    def __init__(self, version: str, reason: str | None) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"adapter version {version!r} is rejected: {reason or 'no reason given'}")


class VerificationError(RegistryError):
    """A version's files are missing or do not match their recorded checksums."""

    def __init__(self, version: str, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"adapter version {version!r} failed verification: {reason}")


class NothingToRollBack(RegistryError):
    """The base model is active and no earlier version is left to return to."""

    def __init__(self) -> None:
        super().__init__("nothing to roll back: the base model is active and no earlier version remains")


class InvalidAdapter(RegistryError):
    """The directory handed to publish() is not a PEFT adapter directory."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"not a publishable adapter directory {str(path)!r}: {reason}")


class NoCanary(RegistryError):
    """No canary runs (or, when `version` is given, none of that version)."""

    def __init__(self, version: str | None = None) -> None:
        self.version = version
        super().__init__(f"no canary of {version} runs" if version else "no canary runs")


class CanaryRunning(RegistryError):
    """A canary runs already; one at a time."""

    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"a canary of {version} runs already; promote or roll it back first")


class InvalidCanary(RegistryError):
    """This version cannot be a canary (e.g. it is the active version)."""

    def __init__(self, version: str, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"no canary of {version}: {reason}")
