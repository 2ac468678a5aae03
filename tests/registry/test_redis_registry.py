"""What only the Redis backend has: change notifications across clients, a server that goes away
and comes back, and adapter files shared by registries that must not clobber each other.

The contract tests (test_registry_*.py) run on Redis too; here `backend` is Redis only.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from registry import RegistryError, RegistryUnavailable, open_registry
from tests.services import PrivateRedis

pytestmark = pytest.mark.redis

FAST_S = 1.0  # "at once": a refused connection is a local round trip, far below this


@pytest.fixture
def backend() -> str:
    return "redis"


def _timed(call, *args, **kwargs) -> float:
    started = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - started


def _wait_in_thread(reg, timeout_s: float) -> tuple[threading.Thread, list[float]]:
    woke: list[float] = []

    def wait() -> None:
        reg.wait_for_change(timeout_s)
        woke.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, woke


def test_wait_for_change_wakes_on_a_change_by_another_client(reg, open_reg, publish):
    v1 = publish()
    # The first wait subscribes, and returns once subscribed: anything before it was missed.
    assert _timed(reg.wait_for_change, 10) < 5
    assert _timed(reg.wait_for_change, 0.3) >= 0.25  # nothing changed: it waits its time out

    other = open_reg()  # another replica, or the learner
    thread, woke = _wait_in_thread(reg, 30)
    changed_at = time.monotonic()
    other.activate(v1, actor="learner")
    thread.join(10)
    assert woke and woke[0] - changed_at < 2.0
    assert reg.pointer() == (1, v1)

    # Rejecting the active version moves the pointer too, so it notifies as well.
    thread, woke = _wait_in_thread(reg, 30)
    changed_at = time.monotonic()
    other.reject(v1, "NaN weights", actor="replica-b")
    thread.join(10)
    assert woke and woke[0] - changed_at < 2.0
    assert reg.pointer() == (2, None)


def test_a_change_during_the_pointer_read_is_not_missed(reg, open_reg, publish):
    v1 = publish()
    reg.wait_for_change(10)  # subscribed
    open_reg().activate(v1, actor="op")
    # The message lands while nobody waits (as while HotSwap reads the pointer): it must be
    # kept for the next wait. (Without this pause the test would pass too, only test less.)
    time.sleep(0.5)  # deliberate, no condition: nobody is waiting while the message lands
    assert _timed(reg.wait_for_change, 30) < 1.0


def test_unreachable_redis_is_unavailable_at_once(tmp_path):
    from testkit.ports import free_port

    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=r"127\.0\.0\.1"):
        open_registry(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "adapters")
    assert time.monotonic() - started < FAST_S


def test_redis_restart(tmp_path, adapter_dir, base_model):
    server = PrivateRedis(tmp_path / "redis")
    url, root = f"{server.url}?prefix=restart:", tmp_path / "adapters"
    reg = open_registry(url, root)
    other = None
    try:
        v1, v2 = (
            reg.publish(
                adapter_dir, base_model=base_model, parent=None, metrics={"i": i}, lineage={"events": [f"e{i}"]}
            ).version
            for i in (1, 2)
        )
        reg.activate(v1, actor="op")
        reg.wait_for_change(10)  # subscribed
        before = (reg.pointer(), reg.list_versions(), reg.history())

        server.stop()
        calls = {
            "pointer": reg.pointer,
            "ping": reg.ping,
            "list_versions": reg.list_versions,
            "get": lambda: reg.get(v1),
            "history": reg.history,
            "activate": lambda: reg.activate(v2, actor="op"),
            "rollback": lambda: reg.rollback(actor="op"),
            "reject": lambda: reg.reject(v2, "x"),
            "publish": lambda: reg.publish(adapter_dir, base_model=base_model, parent=None, metrics={}, lineage={}),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                call()
            assert time.monotonic() - started < FAST_S, name
        # A wait does not fail while Redis is away: it is a hint, and the caller polls anyway.
        assert 0.25 <= _timed(reg.wait_for_change, 0.3) < 0.3 + FAST_S

        server.start()
        # The same handle works again and finds everything as it was (append-only file).
        assert (reg.pointer(), reg.list_versions(), reg.history()) == before
        reg.verify_files(v1)
        # The subscription is renewed by itself; the renewal wakes waiters, who re-read.
        assert _timed(reg.wait_for_change, 10) < 5
        other = open_registry(url, root)
        thread, woke = _wait_in_thread(reg, 30)
        changed_at = time.monotonic()
        other.activate(v2, actor="op")
        thread.join(10)
        assert woke and woke[0] - changed_at < 2.0
        assert reg.pointer() == (2, v2)
        # Nothing half-made was left by the publish that failed while Redis was down.
        info = reg.publish(adapter_dir, base_model=base_model, parent=v2, metrics={}, lineage={})
        assert info.version == "v0003"
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["v0001", "v0002", "v0003"]
    finally:
        for r in (reg, other):
            if r is not None:
                r.close()
        server.stop()


def test_lost_metadata_never_clobbers_existing_files(services, tmp_path, adapter_dir, base_model):
    """A registry whose keys are gone (a Redis without persistence restarted, or a second registry
    pointed at the same adapter root) allocates v0001 again: that must fail, not overwrite."""
    root, key = tmp_path / "adapters", uuid.uuid4().hex
    first = open_registry(f"{services.registry_url}?prefix=first:{key}:", root)
    second = open_registry(f"{services.registry_url}?prefix=second:{key}:", root)
    try:
        info = first.publish(adapter_dir, base_model=base_model, parent=None, metrics={}, lineage={})
        with pytest.raises(RegistryError, match="already exists"):
            second.publish(adapter_dir, base_model=base_model, parent=None, metrics={}, lineage={})
        first.verify_files(info.version)  # untouched
        assert second.list_versions() == []
    finally:
        first.close()
        second.close()
