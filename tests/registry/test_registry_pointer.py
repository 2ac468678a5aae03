"""The active pointer: activate, rollback (the stack rule), history, reject, change waits."""

from __future__ import annotations

import random
import threading
import time

import pytest

from registry import BASE, NothingToRollBack, UnknownVersion, VersionRejected
from registry.rollback import pop_for_rollback, push_on_activate


def _trail(reg) -> list[tuple[str, str | None, str | None]]:
    return [(e.action, e.previous, e.version) for e in reg.history()]


def test_starts_on_the_base(reg):
    assert reg.active() is None
    assert reg.pointer() == (0, None)
    assert reg.history() == []
    with pytest.raises(NothingToRollBack):
        reg.rollback(actor="op")


def test_activate_records_history_and_bumps_counter(reg, publish):
    v1, v2 = publish(), publish()
    e1 = reg.activate(v1, actor="alice", reason="first")
    assert (e1.action, e1.version, e1.previous, e1.actor, e1.reason) == ("activate", v1, None, "alice", "first")
    counter1, active = reg.pointer()
    assert active == v1 and counter1 > 0
    e2 = reg.activate(v2, actor="bob")
    assert reg.pointer() == (counter1 + 1, v2)
    assert e2.seq > e1.seq
    assert reg.history() == [e1, e2]
    assert e1.to_json()["version"] == v1


def test_activate_unknown_or_rejected(reg, publish):
    v1 = publish()
    with pytest.raises(UnknownVersion):
        reg.activate("v0099", actor="op")
    reg.reject(v1, "corrupt weights")
    with pytest.raises(VersionRejected) as err:
        reg.activate(v1, actor="op")
    assert err.value.reason == "corrupt weights"
    assert reg.pointer() == (0, None) and reg.history() == []


def test_stack_rollback_never_ping_pongs(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    first = reg.rollback(actor="op", reason="bad answers")
    assert (first.action, first.previous, first.version) == ("rollback", v2, v1)
    assert reg.active() == v1
    reg.rollback(actor="op")
    assert reg.active() is None
    with pytest.raises(NothingToRollBack):
        reg.rollback(actor="op")
    assert _trail(reg) == [("activate", None, v1), ("activate", v1, v2), ("rollback", v2, v1), ("rollback", v1, None)]


def test_stack_rollback_after_reactivating_an_old_version(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    reg.activate(v1, actor="op")  # v1 again: rolling back undoes that, then unwinds fully
    seen = []
    while True:
        try:
            seen.append(reg.rollback(actor="op").version)
        except NothingToRollBack:
            break
    assert seen == [v2, v1, None]


def test_rollback_from_a_version_with_no_earlier_goes_to_base(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.rollback(to=v2, actor="op")  # a rollback pushes nothing
    assert reg.active() == v2
    assert reg.rollback(actor="op").version is None


def test_rollback_to_named_version_and_base(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    for v in (v1, v2, v3):
        reg.activate(v, actor="op")
    entry = reg.rollback(to=v1, actor="op", reason="skip v2")
    assert (entry.action, entry.previous, entry.version) == ("rollback", v3, v1)
    assert reg.rollback(actor="op").version is None  # v2 and v3 were rolled back past
    reg.activate(v3, actor="op")
    assert reg.rollback(to=BASE, actor="op").version is None
    with pytest.raises(UnknownVersion):
        reg.rollback(to="v0404", actor="op")
    reg.reject(v2, "bad")
    with pytest.raises(VersionRejected):
        reg.rollback(to=v2, actor="op")


def test_rollback_skips_rejected_versions(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    for v in (v1, v2, v3):
        reg.activate(v, actor="op")
    reg.reject(v2, "failed verification")
    assert reg.active() == v3  # rejecting an inactive version leaves the pointer alone
    assert reg.rollback(actor="op").version == v1


def test_rejecting_the_active_version_rolls_back_once(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    reg.reject(v2, "NaN weights", actor="replica-a")
    reg.reject(v2, "other reason", actor="replica-b")  # a second replica finds the same
    assert reg.active() == v1
    assert reg.get(v2).status == "rejected"
    assert reg.get(v2).rejected_reason == "NaN weights"
    last = reg.history()[-1]
    assert (last.action, last.previous, last.version, last.actor) == ("rollback", v2, v1, "replica-a")
    assert len(reg.history()) == 3


def test_reject_unknown(reg):
    with pytest.raises(UnknownVersion):
        reg.reject("v0001", "nope")


def test_activate_same_version_and_base(reg, publish):
    v1 = publish()
    reg.activate(v1, actor="op")
    again = reg.activate(v1, actor="op", reason="retry")
    assert again.previous == v1 and again.version == v1
    assert reg.rollback(actor="op").version is None  # the repeat added no undo step
    reg.activate(v1, actor="op")
    assert reg.activate(None, actor="op").version is None
    assert reg.rollback(actor="op").version == v1


def test_concurrent_activations_from_threads(reg, publish):
    versions = [publish() for _ in range(3)]
    errors: list[BaseException] = []

    def flip(n: int) -> None:
        try:
            for i in range(20):
                reg.activate(versions[(n + i) % 3], actor=f"t{n}")
                reg.pointer()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=flip, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = reg.history()
    assert len(history) == 80
    # Every entry's previous is the version the entry before it set: no lost update.
    for before, after in zip(history, history[1:]):
        assert after.previous == before.version
    assert reg.pointer()[1] == history[-1].version


def test_concurrent_activations_and_rollbacks_from_several_clients(reg, open_reg, publish):
    """Each client is its own handle, as separate replicas are; no step may be lost or torn."""
    versions = [publish() for _ in range(3)]
    clients = [open_reg() for _ in range(4)]
    errors: list[BaseException] = []

    def churn(n: int) -> None:
        rng = random.Random(n)
        try:
            for _ in range(15):
                if rng.random() < 0.6:
                    clients[n].activate(rng.choice(versions), actor=f"c{n}")
                else:
                    try:
                        clients[n].rollback(actor=f"c{n}")
                    except NothingToRollBack:
                        pass
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    # Replaying the history through the stack rules explains every entry...
    history = reg.history()
    stack: list[str | None] = []
    active: str | None = None
    for entry in history:
        assert entry.previous == active  # no lost update
        if entry.action == "activate":
            stack = push_on_activate(stack, active, entry.version)
        else:
            target, stack = pop_for_rollback(stack, active, lambda v: False)
            assert entry.version == target
        active = entry.version
    assert reg.pointer() == (len(history), active)
    # ...and the stack the registry kept is the one the history implies.
    expected = []
    while True:
        try:
            active, stack = pop_for_rollback(stack, active, lambda v: False)
        except NothingToRollBack:
            break
        expected.append(active)
    undone = []
    while True:
        try:
            undone.append(reg.rollback(actor="check").version)
        except NothingToRollBack:
            break
    assert undone == expected


def test_wait_for_change_is_bounded_and_ends_at_close(reg, open_reg):
    for _ in range(3):  # returns (early or at its timeout), never hangs, never raises
        started = time.monotonic()
        reg.wait_for_change(0.2)
        assert time.monotonic() - started < 2.0
    waiter = open_reg()
    finished = threading.Event()

    def wait() -> None:
        waiter.wait_for_change(60)
        finished.set()

    thread = threading.Thread(target=wait)
    thread.start()
    waiter.close()  # whether the wait began before this or not, it ends at once
    assert finished.wait(5.0), "close() must end a wait in progress"
