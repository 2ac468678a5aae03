"""API keys (`KTO_AUTH=api-key`): issued to a user by an admin, shown once, kept only as hashes.

A key is `kto-` and 43 random URL-safe characters (256 bits), so a plain SHA-256 of it is a
safe thing to store and look up: unlike a password, a key cannot be guessed from its hash by
trying likely values. The server hashes what a caller presents and finds the key by its hash
on every request, with no cache, so a key revoked through one replica is refused by every
replica on its next request.

Backends, chosen by URL in `open_key_store` (the registry's by default, see
`ServeSettings.resolved_keys_url`): `sqlite:///path` (embedded) and `redis://…` (shared by
replicas on several hosts, `serve.redis_credentials`). A backend that cannot be reached raises
`KeysUnavailable`: the caller gets a 503, never a pass.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

from foundation.sqlite import connect, ensure_schema, path_from_url, write_transaction
from foundation.urls import backend_of

Role = Literal["user", "annotator", "admin"]
ROLES: tuple[Role, ...] = ("user", "annotator", "admin")

_LAYOUT_VERSION = 1
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user)",
]


@dataclass(frozen=True)
class ApiKey:
    """What is kept of an issued key: never the key itself."""

    id: str
    user: str
    role: Role
    name: str
    """The issuer's label for it ("laptop", "ci"), shown in lists."""
    created_at: float
    created_by: str
    """The admin credential that issued it."""

    def to_json(self) -> dict:
        return asdict(self)


class UnknownKey(LookupError):
    """No key with that id belongs to that user."""


class KeysUnavailable(Exception):
    """The key store cannot be reached; nothing was read or changed."""


def new_secret() -> str:
    return "kto-" + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore(Protocol):
    def add(self, key: ApiKey, key_hash: str) -> None:
        """Store a new key under its hash."""
        ...

    def find(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, None if there is none (never issued, or revoked)."""
        ...

    def list(self, user: str) -> list[ApiKey]:
        """The user's live keys, oldest first."""
        ...

    def revoke(self, user: str, key_id: str) -> ApiKey:
        """Delete the key; UnknownKey unless `user` holds a key with that id."""
        ...

    def forget_user(self, user: str) -> int:
        """Revoke every key of `user` (an erasure); how many there were."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def issue(store: KeyStore, user: str, role: Role, *, name: str = "", created_by: str) -> tuple[ApiKey, str]:
    """Make a key for `user`, store its hash, and return the record with the key itself (the only
    time it exists outside the caller's hands)."""
    secret = new_secret()
    key = ApiKey(secrets.token_hex(6), user, role, name, time.time(), created_by)
    store.add(key, digest(secret))
    return key, secret


class SqliteKeyStore:
    """The embedded store: one SQLite file in WAL mode, shared by the processes of one host."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # FULL: a revocation that answered must survive a power loss too.
        self._conn: sqlite3.Connection | None = connect(self.path, synchronous="FULL", busy_timeout_s=10.0)
        ensure_schema(self._conn, _SCHEMA, _LAYOUT_VERSION, "API keys")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                raise KeysUnavailable(f"the key store at {self.path} is closed")
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                raise KeysUnavailable(f"the key store at {self.path}: {exc}") from exc

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            if self._conn is None:
                raise KeysUnavailable(f"the key store at {self.path} is closed")
            try:
                with write_transaction(self._conn) as conn:
                    return conn.execute(sql, args).rowcount
            except sqlite3.OperationalError as exc:
                raise KeysUnavailable(f"the key store at {self.path}: {exc}") from exc

    def add(self, key: ApiKey, key_hash: str) -> None:
        self._write(
            "INSERT INTO api_keys (id, user, role, name, hash, created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.id, key.user, key.role, key.name, key_hash, key.created_at, key.created_by),
        )

    _COLUMNS = "id, user, role, name, created_at, created_by"

    def find(self, key_hash: str) -> ApiKey | None:
        rows = self._query(f"SELECT {self._COLUMNS} FROM api_keys WHERE hash = ?", (key_hash,))
        return ApiKey(*rows[0]) if rows else None

    def list(self, user: str) -> list[ApiKey]:
        rows = self._query(f"SELECT {self._COLUMNS} FROM api_keys WHERE user = ? ORDER BY created_at, id", (user,))
        return [ApiKey(*row) for row in rows]

    def revoke(self, user: str, key_id: str) -> ApiKey:
        rows = self._query(f"SELECT {self._COLUMNS} FROM api_keys WHERE user = ? AND id = ?", (user, key_id))
        if not rows or not self._write("DELETE FROM api_keys WHERE user = ? AND id = ?", (user, key_id)):
            raise UnknownKey(key_id)
        return ApiKey(*rows[0])

    def forget_user(self, user: str) -> int:
        return self._write("DELETE FROM api_keys WHERE user = ?", (user,))

    def ping(self) -> None:
        self._query("SELECT 1")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_key_store(url: str) -> KeyStore:
    """The store for `url`: `sqlite:///PATH` or `redis[s]://host:port/db[?prefix=kto:keys:]`."""
    if backend_of(url, allowed=("sqlite", "redis"), what="key store") == "sqlite":
        return SqliteKeyStore(path_from_url(url))
    from serve.redis_credentials import RedisKeyStore  # redis-py only when chosen

    return RedisKeyStore(url)
