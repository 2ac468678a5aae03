"""Pointer-change notifications over Redis pub/sub: a wake-up hint, never the truth.

One daemon thread per registry holds the subscription (a redis-py PubSub is not thread-safe, so
only that thread touches it); any number of threads wait on a condition it signals.

Rules:
- A wait returns at a message, at its timeout, or at once if a message arrived since the
  previous wait returned, so a change that lands while the caller reads the pointer is not lost.
- Messages published while the subscription is down are lost for good. So every subscription,
  the first and each one after a lost connection (a Redis restart), also wakes the waiters:
  they re-read the pointer and catch up. A lost subscription is retried every RESUBSCRIBE_S.
- The thread starts at the first wait: a process that never waits holds no subscription.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

logger = logging.getLogger(__name__)

RESUBSCRIBE_S = 0.5
# How long one read of the subscription blocks: the bound on noticing close().
_READ_S = 0.25


class ChangeListener:
    """Wakes waiters when a message arrives on `channel` (or when the subscription is renewed)."""

    def __init__(self, client: redis.Redis, channel: str, where: str) -> None:
        self._client, self._channel, self._where = client, channel, where
        self._cond = threading.Condition()
        self._generation = 0  # bumped by every message and every (re)subscription
        self._seen = 0  # the generation the last wait returned at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wait(self, timeout_s: float) -> None:
        with self._cond:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"registry-changes:{self._channel}", daemon=True)
                self._thread.start()
            self._cond.wait_for(lambda: self._generation != self._seen or self._stop.is_set(), timeout_s)
            self._seen = self._generation

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * _READ_S + RESUBSCRIBE_S)

    def _wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=_READ_S)
                    if message is None or message["type"] not in ("subscribe", "message"):
                        continue
                    if message["type"] == "subscribe" and down_since is not None:
                        logger.info(
                            "change notifications from %s are back after %.1f s",
                            self._where,
                            time.monotonic() - down_since,
                        )
                        down_since = None
                    self._wake()
            except Exception as e:
                if down_since is None:
                    down_since = time.monotonic()
                    log = logger.warning if isinstance(e, redis.RedisError) else logger.exception
                    log(
                        "lost change notifications from %s (%s); polling only, resubscribing every %.1f s",
                        self._where,
                        e,
                        RESUBSCRIBE_S,
                    )
                self._stop.wait(RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
