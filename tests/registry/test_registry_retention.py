"""Retention (registry.retention, registry.pruning) on every backend: what a prune must never
take, what it takes, and that serving-side operations refuse what it took."""

from __future__ import annotations

import itertools
import random

import pytest

from registry import UnknownVersion, VersionPruned
from registry.retention import Candidate, Policy, kept_stack, reasons_to_keep
from registry.rollback import pop_for_rollback

NOW = Policy(depth=2, grace_s=0.0)  # no grace: every version no rule keeps goes at once


def _on_disk(reg) -> set[str]:
    return {v.version for v in reg.list_versions() if v.path.is_dir()}


def test_active_canary_stack_and_pins_survive_and_the_rest_goes(reg, publish):
    v = [publish() for _ in range(7)]
    for version in v[:4]:  # stack: base, v1, v2, v3; v4 active
        reg.activate(version, actor="op")
    reg.pin(v[0], actor="op", reason="the launch version")
    reg.start_canary(v[5], 0.1, actor="op")  # v6 is the newest ready one
    report = reg.prune(NOW, actor="op")

    assert report.kept == {
        v[3]: "active",
        v[5]: "canary",
        v[0]: "pinned",
        v[2]: "rollback",
        v[1]: "rollback",
        v[6]: "newest",
    }
    assert report.pruned == [v[4]] and report.freed_bytes > 0
    assert _on_disk(reg) == set(v) - {v[4]}
    pruned = reg.get(v[4])
    assert pruned.pruned_at is not None and pruned.to_json()["pruned_at"] == pruned.pruned_at
    assert pruned.lineage == {} and pruned.status == "ready"  # the metadata stays
    [entry] = [e for e in reg.history() if e.action == "prune"]
    assert (entry.version, entry.previous, entry.actor) == (v[4], v[3], "op")
    assert entry.evidence == {"bytes": report.freed_bytes}
    assert reg.pointer()[0] == entry.seq  # pollers notice


def test_a_dry_run_changes_nothing(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    reg.activate(v3, actor="op")
    before = (reg.pointer(), reg.history())
    report = reg.prune(NOW, actor="op", dry_run=True)
    assert report.dry_run and report.pruned == [v1, v2] and report.kept == {v3: "active"}
    assert (reg.pointer(), reg.history()) == before
    assert _on_disk(reg) == {v1, v2, v3}


def test_rejected_versions_and_replaced_candidates_have_no_grace(reg, publish):
    grace = Policy(depth=1, grace_s=3600.0)
    rejected = publish(status="rejected", rejected_reason="gate: loss went up")
    c1 = publish()
    reg.start_canary(c1, 0.2, actor="learner")
    c2 = publish(parent=c1)
    reg.advance_canary(c1, c2, actor="learner")
    waiting = publish(parent=c2)  # the newest ready one; a fresh one but older than it is in grace
    report = reg.prune(grace, actor="learner")
    assert sorted(report.pruned) == sorted([rejected, c1])
    assert report.kept == {c2: "canary", waiting: "newest"}


def test_grace_keeps_a_young_ready_version_that_nothing_else_keeps(reg, publish):
    old, young, newest = publish(), publish(), publish()
    assert reg.prune(Policy(depth=0, grace_s=3600.0), actor="op").kept == {
        old: "grace",
        young: "grace",
        newest: "newest",
    }
    assert reg.prune(Policy(depth=0, grace_s=0.0), actor="op").pruned == [old, young]


def test_a_pruned_version_cannot_be_served_again(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    reg.activate(v2, actor="op")
    reg.prune(Policy(depth=0, grace_s=0.0), actor="op")
    for attempt in (
        lambda: reg.activate(v1, actor="op"),
        lambda: reg.rollback(to=v1, actor="op"),
        lambda: reg.start_canary(v1, 0.5, actor="op"),
        lambda: reg.pin(v1, actor="op"),
    ):
        with pytest.raises(VersionPruned) as caught:
            attempt()
        assert caught.value.version == v1 and isinstance(caught.value, UnknownVersion)
        assert "pruned" in str(caught.value)
    assert reg.active() == v2 and reg.get(v3).pruned_at is None


def test_pin_and_unpin_are_history_and_idempotent(reg, publish):
    v1, _ = publish(), publish()
    first = reg.pin(v1, actor="alice", reason="keep it")
    assert reg.pin(v1, actor="alice") is None
    assert reg.get(v1).pinned and first is not None and first.action == "pin"
    unpinned = reg.pin(v1, False, actor="bob")
    assert unpinned is not None and unpinned.action == "unpin" and not reg.get(v1).pinned
    with pytest.raises(UnknownVersion):
        reg.pin("v9999", actor="alice")


@pytest.mark.parametrize("seed", range(3))
def test_rollback_after_a_prune_works_to_the_stack_depth(reg, publish, seed):
    """Any activation history, pruned to depth d after every step: d plain rollbacks in a row
    each land where the stack rule says, on a version whose files are there."""
    rng, depth = random.Random(seed), 3
    for _ in range(8):
        publish()
    for _ in range(12):
        reg.activate(rng.choice(sorted(_on_disk(reg))), actor="op")
        reg.prune(Policy(depth=depth, grace_s=0.0), actor="op")
        assert reg.active() in _on_disk(reg)
    stack, active, expected = reg._transaction(lambda tx: tx.stack()), reg.active(), []
    for _ in range(depth):
        if not stack:
            break
        active, stack = pop_for_rollback(stack, active, lambda v: False)
        expected.append(active)
    landed = [reg.rollback(actor="op").version for _ in expected]
    assert landed == expected
    assert all(v is None or v in _on_disk(reg) for v in landed)


def test_a_prune_killed_before_deleting_is_finished_by_the_next(reg, publish, monkeypatch):
    v1, v2 = publish(), publish()
    reg.activate(v2, actor="op")
    with monkeypatch.context() as m:
        m.setattr(type(reg), "_delete_pruned", lambda self: None)  # "killed" after the commit
        assert reg.prune(NOW, actor="op").pruned == [v1]
    assert v1 in _on_disk(reg) and reg.get(v1).pruned_at is not None
    assert reg.prune(NOW, actor="op").pruned == []
    assert _on_disk(reg) == {v2}


def test_disk_usage_counts_the_versions_on_disk(reg, publish):
    v1, v2 = publish(), publish()
    one = reg.disk_usage()
    assert one.versions == 2 and one.bytes > 0
    reg.activate(v2, actor="op")
    reg.prune(NOW, actor="op")
    assert reg.disk_usage().versions == 1 and reg.disk_usage().bytes == one.bytes // 2
    assert v1 not in _on_disk(reg)


def test_the_rules_never_take_what_must_stay():
    """Exhaustively over small worlds: active, candidate, pinned and the newest `depth` of the
    stack are always kept."""
    names = [f"v{i}" for i in range(1, 5)]
    for states in itertools.product(("ready", "rejected"), repeat=len(names)):
        for active, pinned in itertools.product([None, *names], [None, *names]):
            stack = [None, *names[:2], active]
            candidates = [Candidate(v, s, float(i), v == pinned) for i, (v, s) in enumerate(zip(names, states))]
            why = reasons_to_keep(candidates, active=active, canary=None, stack=stack, policy=Policy(2, 0.0), now=1e9)
            must = {active, pinned, *kept_stack(stack, 2)}
            assert all(why[v] for v in must if v is not None), (states, active, pinned, why)
