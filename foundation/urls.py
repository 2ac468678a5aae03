"""Backend URLs. Embedded backends take `sqlite:///PATH`, SQLAlchemy's convention: the path is
what follows the third slash, so `sqlite:///data/bus.sqlite3` is relative to the working
directory and `sqlite:////var/lib/kto/bus.sqlite3` is absolute. Redis backends take
`redis://host:port/db[?prefix=…]` (see `redis_url`), Kafka `kafka://host:port[,host:port]`.

Which backend a URL names is decided here only (`backend_of`), from the table `SCHEMES`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

Backend = Literal["sqlite", "redis", "kafka"]

SCHEMES: dict[str, Backend] = {"sqlite": "sqlite", "redis": "redis", "rediss": "redis", "kafka": "kafka"}
"""URL scheme -> the backend it names (rediss: Redis over TLS)."""

SQLITE_PREFIX = "sqlite:///"


def names(url: str) -> Backend | None:
    """The backend `url` names by its scheme, None for a scheme not in `SCHEMES`."""
    return SCHEMES.get(url.split("://", 1)[0]) if "://" in url else None


def backend_of(url: str, *, allowed: tuple[Backend, ...], what: str) -> Backend:
    """The backend `url` names, one of `allowed`; ValueError naming the scheme (never the whole
    URL, which may hold a password) and what `what` accepts otherwise."""
    found = names(url)
    if found is None or found not in allowed:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        expected = " or ".join(f"{s}://" for s, b in SCHEMES.items() if b in allowed)
        named = f"scheme {scheme!r}" if scheme else "without a scheme"
        raise ValueError(f"unsupported {what} URL {named}: expected {expected}")
    return found


def sqlite_path(url: str) -> Path:
    """The database file a `sqlite:///PATH` URL names; ValueError saying what is wrong otherwise."""
    if not url.startswith(SQLITE_PREFIX):
        raise ValueError(f"{url!r} is not a sqlite:///PATH URL")
    raw = unquote(url[len(SQLITE_PREFIX) :])
    if not raw or raw.endswith("/"):
        raise ValueError(f"sqlite URL {url!r} must name a file, e.g. sqlite:///data/bus.sqlite3")
    if ":memory:" in raw or "?" in raw:
        # An in-memory database is per connection, so processes could not share it.
        raise ValueError(f"sqlite URL {url!r} must name a plain file (no :memory:, no query string)")
    return Path(raw)


def sqlite_url(path: Path) -> str:
    """The URL for a file path (absolute paths give the four-slash form)."""
    return f"{SQLITE_PREFIX}{path}"


def redis_url(url: str, default_prefix: str) -> tuple[str, str, str]:
    """Split `redis[s]://[user:password@]host:port/db[?prefix=P&…]` into (URL for redis-py, key
    prefix, `scheme://host:port/db` for messages: no credentials).

    `prefix` (default `default_prefix`) namespaces this store's keys so that several share one
    database; every other query parameter goes to redis-py (e.g. `socket_timeout=5`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {parts.scheme}://…")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in reversed(query) if k == "prefix"), default_prefix)
    if not prefix:
        raise ValueError("a Redis URL's prefix= must not be empty")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
    return urlunsplit(parts._replace(query=rest)), prefix, where


def with_prefix(url: str, prefix: str) -> str:
    """`url` (a Redis URL) with its `prefix=` query parameter set to `prefix`."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("prefix", prefix)])))


def quick_redis(client_url: str, timeout_s: float):
    """A redis-py client for a request path: decoded strings, ``timeout_s`` to connect or answer,
    and two short retries. redis-py's default retries back off for seconds; a caller would rather
    get a quick 503 and retry itself."""
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        client_url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2),
    )
