"""The SQLite schema of the embedded registry, and how its connections are opened.

Rows of `versions` move pending → ready | rejected, or pending → abandoned when a publish dies;
only ready and rejected rows are ever visible. `pointer` is a single row read by every poll; it
holds the running canary too (JSON of registry.canary.Canary), so that both change together.

Layouts: 1 had no canary and no evidence; 2 adds `pointer.canary`, `history.evidence` and the
canary actions; 3 adds the `flags` table and the erasure action (registry.erasure); 4 the
canary_advance action; 5 the `rule_sets` table; 6 `versions.pinned`, `versions.pruned_at` and
the pin, unpin and prune actions (registry.retention). Opening an
older file migrates it in place, in one transaction; a newer layout than this code's is refused
rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from foundation import sqlite
from registry.errors import RegistryError, RegistryUnavailable
from registry.versions import HISTORY_ACTIONS

SCHEMA_VERSION = 6

_ACTIONS = ", ".join(f"'{action}'" for action in HISTORY_ACTIONS)
_HISTORY = f"""
CREATE TABLE IF NOT EXISTS {{name}} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL CHECK (action IN ({_ACTIONS})),
    version TEXT,
    previous TEXT,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence TEXT  -- JSON, or NULL
)"""

_TABLES = """
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: numbers are never reused
    version TEXT UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'rejected', 'abandoned')),
    parent TEXT,
    created_at REAL NOT NULL,
    base_model TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '{}',  -- {relative path: sha256} of every file of the version
    metrics TEXT NOT NULL DEFAULT '{}',
    lineage TEXT NOT NULL DEFAULT '{}',
    rejected_reason TEXT,
    pinned INTEGER NOT NULL DEFAULT 0,
    pruned_at REAL  -- when retention deleted its files, NULL while they are kept
);
CREATE TABLE IF NOT EXISTS pointer (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    counter INTEGER NOT NULL,
    active TEXT,
    canary TEXT  -- JSON of the running canary, NULL when none runs
);
{history};
CREATE TABLE IF NOT EXISTS rollback_stack (
    pos INTEGER PRIMARY KEY,
    version TEXT
);
CREATE TABLE IF NOT EXISTS flags (
    version TEXT NOT NULL,
    erasure TEXT NOT NULL,  -- the erasure request that flagged it
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (version, erasure)
);
CREATE TABLE IF NOT EXISTS rule_sets (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    rules TEXT NOT NULL  -- JSON of the whole set
);
INSERT OR IGNORE INTO pointer (id, counter, active) VALUES (1, 0, NULL);
""".replace("{history}", _HISTORY.format(name="history"))


def _migrations(found: int) -> list[str]:
    """The statements taking layout `found` to this one. SQLite cannot change a CHECK constraint
    in place, so the history (whose actions grew at 2, 3, 4 and 6) is copied into a new table;
    tables added meanwhile (flags, rule_sets) are created by _TABLES."""
    if found == 0 or found >= SCHEMA_VERSION:  # 0: a new file
        return []
    columns = "seq, at, action, version, previous, actor, reason" + (", evidence" if found >= 2 else "")
    return [
        *(["ALTER TABLE pointer ADD COLUMN canary TEXT"] if found == 1 else []),
        "ALTER TABLE versions ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE versions ADD COLUMN pruned_at REAL",
        _HISTORY.format(name="history_new"),
        f"INSERT INTO history_new ({columns}) SELECT {columns} FROM history ORDER BY seq",
        "DROP TABLE history",
        "ALTER TABLE history_new RENAME TO history",
    ]


@contextmanager
def unavailable_on_error(db_path: Path) -> Iterator[None]:
    """Turn sqlite3 errors (locked past busy_timeout, I/O errors, a damaged file) into the one
    domain error callers handle."""
    try:
        yield
    except sqlite3.Error as e:
        raise RegistryUnavailable(f"registry database {db_path}: {e}") from e


def connect(db_path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open (creating if needed) the registry database in WAL mode with full fsync (a committed
    publish or pointer swap survives a power cut, not just a crash), migrated to this layout.

    The connection is in autocommit mode: callers open explicit BEGIN IMMEDIATE transactions.
    It may be shared between threads provided the caller serializes its use.
    """
    with unavailable_on_error(db_path):
        conn = sqlite.connect(db_path, synchronous="FULL", busy_timeout_s=busy_timeout_s)
        try:
            sqlite.ensure_schema(
                conn,
                [t for t in _TABLES.split(";") if t.strip()],
                SCHEMA_VERSION,
                f"registry {db_path}",
                migrations=_migrations,
            )
        except sqlite.NewerLayout as e:
            conn.close()
            raise RegistryError(str(e)) from e
        except BaseException:
            conn.close()
            raise
    return conn
