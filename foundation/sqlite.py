"""SQLite plumbing shared by the embedded bus, the response ledger, the replay buffer and the
embedded registry.

Each keeps their state in one SQLite file in WAL mode that several processes open at once, so
they need the same things: a ``sqlite:///`` URL parser, connections with the right pragmas, and
write transactions that take the write lock up front.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from foundation.urls import sqlite_path

logger = logging.getLogger(__name__)


def path_from_url(url: str) -> Path:
    """The file path in a ``sqlite:///PATH`` URL (see ``foundation.urls``)."""
    return sqlite_path(url)


def connect(
    path: Path, *, synchronous: str, busy_timeout_s: float, incremental_vacuum: bool = False
) -> sqlite3.Connection:
    """Open ``path`` (creating parent directories) in WAL mode, in autocommit mode.

    Autocommit (``isolation_level=None``) because callers manage transactions explicitly with
    ``write_transaction``; Python's implicit transactions would start deferred ones, which can
    fail with SQLITE_BUSY on upgrade instead of waiting.

    ``incremental_vacuum``: a new file is made with ``auto_vacuum=INCREMENTAL``, so that ``shrink``
    can give its free pages back; an existing file keeps its mode until ``shrink`` changes it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the owner serialises use with a lock, and close() may run elsewhere.
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        if incremental_vacuum:
            # Before WAL: switching to WAL writes the header, after which the mode is fixed.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        _set_wal(conn, busy_timeout_s)
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _set_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    # Switching to WAL needs an exclusive lock and may report BUSY without waiting on the busy
    # handler when several processes create the file together, so retry for a while.
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"could not enable WAL mode (got {mode!r})")
        return


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: takes the write lock first, so reads inside are current.

    Rolls back on any exception. When the block returns, the commit is done (and, with
    ``synchronous=FULL``, fsync'd).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback failed")
        raise


class NewerLayout(RuntimeError):
    """The file was written by a newer version of this code: refused rather than misread."""


def ensure_schema(
    conn: sqlite3.Connection,
    statements: list[str],
    version: int,
    what: str,
    migrations: Callable[[int], list[str]] | None = None,
) -> None:
    """Create tables if missing and bring the file to layout `version` (``PRAGMA user_version``),
    in one transaction: `migrations(found)` gives the statements from an older layout `found`
    (0: a new file, which `statements` create as they are now)."""
    with write_transaction(conn):
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > version:
            raise NewerLayout(f"{what} file has layout version {found}, newer than this code's {version}")
        for statement in statements:
            conn.execute(statement)
        for statement in migrations(found) if migrations and found not in (0, version) else []:
            conn.execute(statement)
        if found < version:
            conn.execute(f"PRAGMA user_version={version}")


def file_bytes(path: Path) -> int:
    """Bytes the database at ``path`` takes on disk: the file and its WAL."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def shrink(conn: sqlite3.Connection) -> bool:
    """Give the free pages of ``conn``'s file back to the filesystem, and truncate its WAL.

    SQLite never shrinks a file on DELETE. A file made by ``connect(..., incremental_vacuum=True)``
    gives its free pages back by ``PRAGMA incremental_vacuum``. A file made without it (by an older
    version) is switched over once, by a full VACUUM: that rewrites the file and holds the write
    lock meanwhile (seconds per gigabyte), so call this after the deletions, when the file is
    smallest. Then a TRUNCATE checkpoint empties the WAL, which deletions and vacuuming filled; it
    waits for readers up to the busy timeout, and one still busy is left for the next call.
    Call it outside any transaction.

    Best effort: a failure (a full disk, where VACUUM has no room for its copy) is logged and
    returns False; the free pages then serve new rows, so the file stops growing all the same.
    """
    try:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
            started = time.monotonic()
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
            logger.info(
                "switched %s to incremental vacuum (one full VACUUM, %.1f s)",
                _file_of(conn),
                time.monotonic() - started,
            )
        else:
            # executescript steps the pragma to the end; execute() would free one page per step.
            conn.executescript("PRAGMA incremental_vacuum;")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        logger.warning("could not shrink %s (its free pages will be reused): %s", _file_of(conn), exc)
        return False
    if busy:
        logger.info("the WAL of %s is in use by a reader; truncating it next time", _file_of(conn))
    return True


def _file_of(conn: sqlite3.Connection) -> str:
    return conn.execute("PRAGMA database_list").fetchone()[2]
