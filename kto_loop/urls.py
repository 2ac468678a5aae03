"""Backend URLs. Embedded backends take `sqlite:///PATH`, SQLAlchemy's convention: the path is
what follows the third slash, so `sqlite:///data/bus.sqlite3` is relative to the working
directory and `sqlite:////var/lib/kto/bus.sqlite3` is absolute."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> Path:
    """The database file a `sqlite:///PATH` URL names; ValueError saying what is wrong otherwise."""
    if not url.startswith(SQLITE_PREFIX):
        raise ValueError(f"{url!r} is not a sqlite:///PATH URL")
    raw = unquote(url[len(SQLITE_PREFIX):])
    if not raw or raw.endswith("/"):
        raise ValueError(f"sqlite URL {url!r} must name a file, e.g. sqlite:///data/bus.sqlite3")
    if ":memory:" in raw or "?" in raw:
        # An in-memory database is per connection, so processes could not share it.
        raise ValueError(f"sqlite URL {url!r} must name a plain file (no :memory:, no query string)")
    return Path(raw)


def sqlite_url(path: Path) -> str:
    """The URL for a file path (absolute paths give the four-slash form)."""
    return f"{SQLITE_PREFIX}{path}"
