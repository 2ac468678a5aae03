"""The response ledger: which responses exist, whose they are, and how they were rated.

The feedback endpoint checks it before accepting a vote: the response must be one we served (and
not older than the ledger's TTL), the voter must be the user who received it, and a repeated vote
must be recognised as such. It is a fast index, not the record of truth: the events on the bus
are. Losing it costs only the ability to rate older responses.

One vote per response: a changed vote replaces the earlier one. An anonymous response (user
None) is nobody's to rate.

It also keeps a tally per adapter version (responses recorded, current votes by label) for the
version's admin page: counted where the entries are written, in the same atomic step, so every
replica sharing the ledger adds to one tally. Tallies outlive the entries' TTL and a user's
erasure (``forget_user``): they are counts, not anybody's data.

Backends, chosen by URL in ``open_ledger``: ``sqlite:///path`` (embedded, one host) and
``redis://…`` (``serve.redis_ledger``, shared by replicas on several hosts).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from foundation.sqlite import connect, ensure_schema, path_from_url, write_transaction
from foundation.urls import backend_of

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 7 * 24 * 3600.0
LABELS = ("desirable", "undesirable")
_LAYOUT_VERSION = 2  # 2 adds the tallies table (created on open; layout 1 files have none yet)
_PURGE_EVERY_S = 60.0
_BASE = ""  # the tally key of the base model (version None)
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS responses (
        response_id TEXT PRIMARY KEY,
        user TEXT,
        version TEXT,
        label TEXT,
        feedback_event_id TEXT,
        created_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at)",
    "CREATE INDEX IF NOT EXISTS responses_user ON responses (user)",
    """CREATE TABLE IF NOT EXISTS tallies (
        version TEXT PRIMARY KEY,
        responses INTEGER NOT NULL DEFAULT 0,
        desirable INTEGER NOT NULL DEFAULT 0,
        undesirable INTEGER NOT NULL DEFAULT 0)""",
]


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows of one response."""

    response_id: str
    user: str | None
    """Who received it (None: anonymous, which nobody may rate)."""
    version: str | None
    """The adapter version that produced it (None: the base model)."""
    label: str | None
    """The current vote, or None before the first."""
    feedback_event_id: str | None
    """The event_id of the feedback event that set ``label``."""


@dataclass(frozen=True)
class VersionTally:
    """What one version did, as far as the ledger saw: responses recorded, current votes."""

    responses: int = 0
    desirable: int = 0
    undesirable: int = 0

    def to_json(self) -> dict[str, int | float | None]:
        rated = self.desirable + self.undesirable
        return {
            "responses": self.responses,
            "desirable": self.desirable,
            "undesirable": self.undesirable,
            "desirable_rate": self.desirable / rated if rated else None,
        }


class UnknownResponseError(LookupError):
    """No such response in the ledger (never served here, or older than the TTL)."""


class NotResponseOwnerError(PermissionError):
    """The voter is not the user who received the response."""


class LedgerUnavailable(Exception):
    """The ledger cannot be reached; nothing was read or changed, the caller may retry."""


class ResponseLedger(Protocol):
    """Where the server records served responses and the votes on them."""

    def record_response(self, response_id: str, user: str | None, version: str | None = None) -> None:
        """Remember a served response, who got it and which version made it; idempotent."""
        ...

    def lookup(self, response_id: str) -> LedgerEntry | None:
        """The entry, or None if unknown or expired."""
        ...

    def set_vote(self, response_id: str, user: str, label: str, event_id: str) -> str | None:
        """Atomically set the vote and return the previous label (None for a first vote).

        A repeated identical vote changes nothing (the first event_id stays). Raises
        ``UnknownResponseError`` or ``NotResponseOwnerError``; ``LedgerUnavailable`` if it
        cannot be reached.
        """
        ...

    def tally(self, version: str | None) -> VersionTally:
        """Responses recorded for ``version`` (None: the base model) and their current votes."""
        ...

    def forget_user(self, user: str) -> int:
        """Delete every entry of ``user`` (an erasure request); return how many there were."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class SqliteLedger:
    """The embedded ledger: one SQLite file in WAL mode, safe across threads and processes."""

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ttl_s``: seconds after which a response can no longer be rated (and is purged).
        ``busy_timeout_s``: seconds to wait for another writer. ``clock``: unix seconds.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.path = Path(path)
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_purge = float("-inf")
        # NORMAL, not FULL: a commit survives a process crash; only power loss may drop the last
        # few entries, which just makes those responses unratable. The bus holds the truth.
        self._conn: sqlite3.Connection | None = connect(self.path, synchronous="NORMAL", busy_timeout_s=busy_timeout_s)
        ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "ledger")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the ledger at {self.path} is closed")
        return self._conn

    def record_response(self, response_id: str, user: str | None, version: str | None = None) -> None:
        """Remember a served response; an expired entry with the same id starts over."""
        if not response_id:
            raise ValueError("response_id must not be empty")
        now = self._clock()
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                recorded = conn.execute(
                    "INSERT INTO responses (response_id, user, version, created_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (response_id) DO UPDATE"
                    " SET user = excluded.user, version = excluded.version, label = NULL,"
                    " feedback_event_id = NULL, created_at = excluded.created_at"
                    " WHERE responses.created_at <= ?",
                    (response_id, user, version, now, now - self.ttl_s),
                ).rowcount
                if recorded:
                    _count(conn, version, "responses", 1)
                # Purging lazily here (at most once a minute) keeps the file bounded without a janitor.
                if now - self._last_purge >= _PURGE_EVERY_S:
                    purged = conn.execute("DELETE FROM responses WHERE created_at <= ?", (now - self.ttl_s,)).rowcount
                    self._last_purge = now
                    if purged:
                        logger.info("ledger purged %d responses older than %.0f s", purged, self.ttl_s)

    def lookup(self, response_id: str) -> LedgerEntry | None:
        """The live entry for ``response_id``, or None."""
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT response_id, user, version, label, feedback_event_id FROM responses"
                    " WHERE response_id = ? AND created_at > ?",
                    (response_id, self._clock() - self.ttl_s),
                )
                .fetchone()
            )
        return None if row is None else LedgerEntry(*row)

    def set_vote(self, response_id: str, user: str, label: str, event_id: str) -> str | None:
        """Atomically record ``user``'s vote; return the previous label (None for a first vote)."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if not user or not event_id:
            raise ValueError("user and event_id must not be empty")
        with self._lock:
            conn = self._connection()
            # BEGIN IMMEDIATE: read and write under one lock, so concurrent votes serialise.
            with write_transaction(conn):
                row = conn.execute(
                    "SELECT user, label, version FROM responses WHERE response_id = ? AND created_at > ?",
                    (response_id, self._clock() - self.ttl_s),
                ).fetchone()
                if row is None:
                    raise UnknownResponseError(response_id)
                owner, previous, version = row
                if owner != user:  # an anonymous response (owner None) is nobody's to rate
                    raise NotResponseOwnerError(f"response {response_id} was not served to {user!r}")
                if previous != label:
                    conn.execute(
                        "UPDATE responses SET label = ?, feedback_event_id = ? WHERE response_id = ?",
                        (label, event_id, response_id),
                    )
                    _count(conn, version, label, 1)
                    if previous is not None:
                        _count(conn, version, previous, -1)
        return previous

    def tally(self, version: str | None) -> VersionTally:
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT responses, desirable, undesirable FROM tallies WHERE version = ?",
                    (_BASE if version is None else version,),
                )
                .fetchone()
            )
        return VersionTally() if row is None else VersionTally(*row)

    def forget_user(self, user: str) -> int:
        if not user:
            raise ValueError("user must not be empty")
        with self._lock:
            conn = self._connection()
            with write_transaction(conn):
                return conn.execute("DELETE FROM responses WHERE user = ?", (user,)).rowcount

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count(conn: sqlite3.Connection, version: str | None, column: str, delta: int) -> None:
    # `column` is one of ours (responses or a label), never caller text.
    # Never below 0: a vote recorded before this file had tallies (layout 1) may be changed later.
    conn.execute(
        f"INSERT INTO tallies (version, {column}) VALUES (?, MAX(0, ?))"
        f" ON CONFLICT (version) DO UPDATE SET {column} = MAX(0, {column} + ?)",
        (_BASE if version is None else version, delta, delta),
    )


def open_ledger(url: str, *, ttl_s: float = DEFAULT_TTL_S) -> ResponseLedger:
    """The ledger for ``url``: ``sqlite:///PATH`` (see ``foundation.urls``) or ``redis[s]://host:port/db``."""
    if backend_of(url, allowed=("sqlite", "redis"), what="ledger") == "sqlite":
        return SqliteLedger(path_from_url(url), ttl_s=ttl_s)
    from serve.redis_ledger import RedisLedger  # redis-py only when chosen

    return RedisLedger(url, ttl_s=ttl_s)
