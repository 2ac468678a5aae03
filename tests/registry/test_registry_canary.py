"""The canary in the registry (rules: registry.canary), on every backend: start, promote, roll
back, pause, the evidence it keeps, how pointer moves and rejections affect it, and reading a
registry written before canaries existed."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from registry import (
    BASE,
    CanaryRunning,
    InvalidCanary,
    NoCanary,
    NothingToRollBack,
    UnknownVersion,
    VersionRejected,
    in_canary,
    open_registry,
)
from registry.redis_keys import SCHEMA_VERSION

EVIDENCE = {
    "candidate": {"n": 40, "desirable": 4},
    "baseline": {"n": 60, "desirable": 30},
    "interval": [-0.62, -0.18],
    "alpha": 0.05,
}


def _trail(reg) -> list[tuple[str, str | None, str | None]]:
    return [(e.action, e.previous, e.version) for e in reg.history()]


# ---- the routing hash (pure) ----------------------------------------------------------------


def test_in_canary_is_sticky_nested_and_about_the_share():
    users = [f"user-{i}" for i in range(4000)]
    inside = [u for u in users if in_canary(u, "v0007", 0.2)]
    assert 0.17 < len(inside) / len(users) < 0.23
    assert inside == [u for u in users if in_canary(u, "v0007", 0.2)]  # the same every time
    assert all(in_canary(u, "v0007", 0.5) for u in inside)  # a larger share keeps them in
    assert all(in_canary(u, "v0007", 1.0) for u in users)
    other = {u for u in users if in_canary(u, "v0008", 0.2)}
    assert len(other & set(inside)) < len(inside) * 0.4  # each candidate draws its own users


# ---- start ----------------------------------------------------------------------------------


def test_start_records_state_history_and_bumps_the_counter(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    counter, _ = reg.pointer()
    assert reg.canary() is None
    entry = reg.start_canary(v2, 0.25, actor="learner", reason="new version", evidence={"k": 1})
    assert (entry.action, entry.version, entry.previous, entry.actor, entry.reason, entry.evidence) == (
        "canary_start",
        v2,
        v1,
        "learner",
        "new version",
        {"k": 1},
    )
    assert reg.pointer() == (counter + 1, v1)  # the pointer stays; the counter tells pollers
    canary = reg.canary()
    assert (canary.version, canary.share, canary.baseline, canary.paused, canary.actor) == (
        v2,
        0.25,
        v1,
        False,
        "learner",
    )
    assert canary.since == canary.started_at == pytest.approx(entry.at, abs=1.0)
    assert canary.evidence is None
    assert reg.history()[-1] == entry
    assert entry.to_json()["evidence"] == {"k": 1}


def test_start_refusals_change_nothing(reg, publish):
    v1, v2, v3, v4 = publish(), publish(), publish(), publish()
    reg.activate(v1, actor="op")
    with pytest.raises(InvalidCanary):
        reg.start_canary(v1, 0.2, actor="op")  # the active version
    with pytest.raises(UnknownVersion):
        reg.start_canary("v0404", 0.2, actor="op")
    reg.reject(v3, "broken")
    with pytest.raises(VersionRejected):
        reg.start_canary(v3, 0.2, actor="op")
    for share in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            reg.start_canary(v2, share, actor="op")
    before = (reg.pointer(), reg.history())
    assert reg.canary() is None
    reg.start_canary(v2, 1.0, actor="op")
    with pytest.raises(CanaryRunning) as running:
        reg.start_canary(v4, 0.2, actor="op")
    assert running.value.version == v2
    assert len(reg.history()) == len(before[1]) + 1


def test_a_canary_against_the_base_model(reg, publish):
    v1 = publish()
    reg.start_canary(v1, 0.5, actor="op")
    assert reg.canary().baseline is None and reg.active() is None
    reg.promote_canary(v1, actor="op")
    assert reg.active() == v1
    assert reg.rollback(actor="op").version is None


# ---- advance: the canary follows its candidate's lineage ------------------------------------


def test_advance_moves_the_candidate_on_keeping_users_and_evidence(reg, open_reg, publish):
    v1 = publish()
    v2 = publish(parent=v1)
    v3 = publish(parent=v2)
    reg.start_canary(v1, 0.2, actor="learner")
    reg.report_canary(v1, EVIDENCE)
    started, counter = reg.canary(), reg.pointer()[0]
    entry = reg.advance_canary(v1, v2, actor="learner", reason="trained from v0001", evidence={"k": 2})
    assert (entry.action, entry.version, entry.previous, entry.actor, entry.evidence) == (
        "canary_advance",
        v2,
        None,
        "learner",
        {"k": 2},
    )
    moved = reg.canary()
    assert (moved.version, moved.versions, moved.cohort) == (v2, (v1, v2), v1)
    assert (moved.since, moved.started_at, moved.baseline, moved.share) == (
        started.since,
        started.started_at,
        started.baseline,
        started.share,
    )  # the same test goes on
    assert reg.pointer() == (counter + 1, None)  # serving replicas notice it
    reg.advance_canary(v2, v3, actor="learner")
    assert open_reg().canary().versions == (v1, v2, v3)  # what another process reads
    reg.promote_canary(v3, actor="canary-controller")
    assert reg.active() == v3 and reg.canary() is None


def test_advance_refusals_change_nothing(reg, publish):
    v1, v2 = publish(), publish()
    v3 = publish(parent=v2)
    v4 = publish(parent=v1)
    with pytest.raises(NoCanary):
        reg.advance_canary(v1, v4, actor="learner")
    reg.start_canary(v1, 0.2, actor="learner")
    before = (reg.pointer(), reg.history(), reg.canary())
    with pytest.raises(InvalidCanary):
        reg.advance_canary(v1, v3, actor="learner")  # trained from another version
    with pytest.raises(InvalidCanary):
        reg.advance_canary(v1, v2, actor="learner")  # trained from the base model
    with pytest.raises(NoCanary):
        reg.advance_canary(v2, v3, actor="learner")  # a decision about another canary
    with pytest.raises(UnknownVersion):
        reg.advance_canary(v1, "v0404", actor="learner")
    reg.reject(v4, "the gate")
    with pytest.raises(VersionRejected):
        reg.advance_canary(v1, v4, actor="learner")
    assert (reg.pointer(), reg.history(), reg.canary()) == before


def test_the_users_inside_stay_inside_as_the_canary_advances(reg, publish):
    v1 = publish()
    v2 = publish(parent=v1)
    reg.start_canary(v1, 0.3, actor="learner")
    users = [f"user-{i}" for i in range(400)]
    inside = [u for u in users if in_canary(u, reg.canary().cohort, 0.3)]
    reg.advance_canary(v1, v2, actor="learner")
    assert [u for u in users if in_canary(u, reg.canary().cohort, 0.3)] == inside


def test_rolling_back_an_advanced_canary_rejects_its_candidate(reg, publish):
    v1 = publish()
    v2 = publish(parent=v1)
    reg.start_canary(v1, 0.2, actor="learner")
    reg.advance_canary(v1, v2, actor="learner")
    reg.rollback_canary(v2, actor="canary-controller", reason="worse")
    assert reg.canary() is None and reg.get(v2).status == "rejected"
    assert reg.active() is None


# ---- promote and roll back ------------------------------------------------------------------


def test_promote_activates_through_the_stack_rules(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.start_canary(v2, 0.2, actor="learner")
    with pytest.raises(NoCanary):
        reg.promote_canary(v1, actor="op")  # not the candidate: a decision about another canary
    entry = reg.promote_canary(v2, actor="canary-controller", reason="not worse", evidence=EVIDENCE)
    assert (entry.action, entry.previous, entry.version, entry.evidence) == ("canary_promote", v1, v2, EVIDENCE)
    assert reg.active() == v2 and reg.canary() is None
    with pytest.raises(NoCanary):
        reg.promote_canary(v2, actor="op")
    assert reg.rollback(actor="op").version == v1  # promotion pushed v1, like an activation
    assert _trail(reg) == [
        ("activate", None, v1),
        ("canary_start", v1, v2),
        ("canary_promote", v1, v2),
        ("rollback", v2, v1),
    ]


def test_rollback_rejects_the_candidate_forever(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    reg.rollback(actor="op")  # v1 active, v2 left behind
    reg.start_canary(v2, 0.3, actor="op")  # a canary of an old version
    counter = reg.pointer()[0]
    entry = reg.rollback_canary(v2, actor="canary-controller", reason="worse", evidence=EVIDENCE)
    assert (entry.action, entry.previous, entry.version, entry.evidence) == ("canary_rollback", v1, v2, EVIDENCE)
    assert reg.pointer() == (counter + 1, v1) and reg.canary() is None
    info = reg.get(v2)
    assert info.status == "rejected" and "canary-controller" in info.rejected_reason
    with pytest.raises(VersionRejected):
        reg.activate(v2, actor="op")
    with pytest.raises(VersionRejected):
        reg.start_canary(v2, 0.3, actor="op")
    assert reg.rollback(actor="op").version is None  # the stack never returns to it
    with pytest.raises(NoCanary):
        reg.rollback_canary(v2, actor="op")


def test_promote_and_rollback_race_one_wins(reg, open_reg, publish):
    v1 = publish()
    reg.start_canary(v1, 0.5, actor="op")
    clients = [open_reg() for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(clients))

    def decide(n: int) -> None:
        barrier.wait()
        try:
            if n % 2:
                clients[n].promote_canary(v1, actor=f"c{n}")
                outcomes.append("promoted")
            else:
                clients[n].rollback_canary(v1, actor=f"c{n}")
                outcomes.append("rolled back")
        except NoCanary:
            outcomes.append("none")

    threads = [threading.Thread(target=decide, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("none") == len(clients) - 1
    [won] = [o for o in outcomes if o != "none"]
    assert reg.canary() is None
    assert (reg.active() == v1) == (won == "promoted")
    assert (reg.get(v1).status == "rejected") == (won == "rolled back")
    assert [e.action for e in reg.history()] == [
        "canary_start",
        "canary_promote" if won == "promoted" else "canary_rollback",
    ]


# ---- pause, resume, report ------------------------------------------------------------------


def test_pause_and_resume(reg, publish):
    v1 = publish()
    reg.start_canary(v1, 0.2, actor="learner")
    counter = reg.pointer()[0]
    assert reg.pause_canary(v1, True, actor="op", reason="looking").action == "canary_pause"
    assert reg.canary().paused and reg.pointer()[0] == counter + 1
    assert reg.pause_canary(v1, False, actor="op").action == "canary_resume"
    assert not reg.canary().paused
    with pytest.raises(NoCanary):
        reg.pause_canary("v0404", True, actor="op")


def test_report_keeps_evidence_without_a_history_entry(reg, open_reg, publish):
    v1, v2 = publish(), publish()
    assert reg.report_canary(v1, EVIDENCE) is False  # none runs
    reg.start_canary(v1, 0.2, actor="learner")
    before = (reg.pointer(), len(reg.history()))
    assert reg.report_canary(v2, EVIDENCE) is False  # not this candidate
    assert reg.report_canary(v1, {**EVIDENCE, "statistic": float("nan")}) is True
    canary = reg.canary()
    assert canary.evidence == {**EVIDENCE, "statistic": None} and canary.evidence_at >= canary.started_at
    assert (reg.pointer(), len(reg.history())) == before
    assert open_reg().canary() == canary  # what another process reads


def test_evidence_must_be_json(reg, publish):
    v1 = publish()
    with pytest.raises(ValueError):
        reg.start_canary(v1, 0.2, actor="op", evidence={"bad": object()})
    assert reg.canary() is None and reg.history() == []


# ---- pointer moves and rejections during a canary -------------------------------------------


def test_activating_another_version_moves_the_baseline(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    reg.activate(v1, actor="op")
    reg.start_canary(v3, 0.2, actor="learner")
    reg.report_canary(v3, EVIDENCE)
    started = reg.canary()
    reg.activate(v2, actor="op")
    moved = reg.canary()
    assert (moved.version, moved.baseline, moved.started_at) == (v3, v2, started.started_at)
    assert moved.since >= started.since and moved.evidence is None  # evidence starts over
    reg.rollback(actor="op")  # back to v1: the baseline follows
    assert reg.canary().baseline == v1


def test_activating_the_candidate_ends_the_canary(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.start_canary(v2, 0.2, actor="learner")
    reg.activate(v2, actor="op", reason="by hand")
    assert reg.canary() is None and reg.active() == v2
    reg.start_canary(v1, 0.2, actor="op")  # a new one may start
    reg.rollback(to=v1, actor="op")  # the pointer lands on the candidate: over too
    assert reg.canary() is None


def test_rejecting_the_candidate_rolls_the_canary_back(reg, publish):
    v1, v2 = publish(), publish()
    reg.activate(v1, actor="op")
    reg.start_canary(v2, 0.2, actor="learner")
    reg.reject(v2, "checksum mismatch", actor="serve:a")
    last = reg.history()[-1]
    assert (last.action, last.previous, last.version, last.actor) == ("canary_rollback", v1, v2, "serve:a")
    assert "checksum mismatch" in last.reason
    assert reg.canary() is None and reg.active() == v1


def test_rejecting_the_baseline_rolls_back_and_the_canary_follows(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    reg.start_canary(v3, 0.2, actor="learner")
    reg.reject(v2, "NaN weights")
    assert reg.active() == v1
    assert reg.canary().baseline == v1 and reg.canary().version == v3
    assert _trail(reg)[-1] == ("rollback", v2, v1)


def test_a_canary_never_changes_what_rollback_returns_to(reg, publish):
    v1, v2, v3 = publish(), publish(), publish()
    reg.activate(v1, actor="op")
    reg.activate(v2, actor="op")
    reg.start_canary(v3, 0.2, actor="learner")
    reg.pause_canary(v3, True, actor="op")
    reg.pause_canary(v3, False, actor="op")
    reg.rollback_canary(v3, actor="op")
    assert reg.rollback(actor="op").version == v1
    assert reg.rollback(to=BASE, actor="op").version is None
    with pytest.raises(NothingToRollBack):
        reg.rollback(actor="op")


# ---- layouts written before canaries existed ------------------------------------------------

LAYOUT_1 = """
CREATE TABLE versions (seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'rejected', 'abandoned')), parent TEXT,
    created_at REAL NOT NULL, base_model TEXT NOT NULL DEFAULT '', sha256 TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '{}', metrics TEXT NOT NULL DEFAULT '{}',
    lineage TEXT NOT NULL DEFAULT '{}', rejected_reason TEXT);
CREATE TABLE pointer (id INTEGER PRIMARY KEY CHECK (id = 1), counter INTEGER NOT NULL, active TEXT);
CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('activate', 'rollback')), version TEXT, previous TEXT,
    actor TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE rollback_stack (pos INTEGER PRIMARY KEY, version TEXT);
INSERT INTO pointer (id, counter, active) VALUES (1, 2, NULL);
INSERT INTO history (at, action, version, previous, actor, reason) VALUES
    (1.0, 'activate', 'v0009', NULL, 'op', 'old'), (2.0, 'rollback', NULL, 'v0009', 'op', '');
PRAGMA user_version = 1;
"""


def test_a_layout_1_sqlite_registry_is_migrated(tmp_path, make_adapter, base_model):
    db = tmp_path / "registry.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(LAYOUT_1)
    conn.close()
    reg = open_registry(f"sqlite:///{db}")
    try:
        assert [(e.seq, e.action, e.version, e.reason, e.evidence) for e in reg.history()] == [
            (1, "activate", "v0009", "old", None),
            (2, "rollback", None, "", None),
        ]
        assert reg.pointer() == (2, None) and reg.canary() is None
        v1 = reg.publish(make_adapter(), base_model=base_model, parent=None, metrics={}, lineage={}).version
        entry = reg.start_canary(v1, 0.2, actor="op", evidence={"n": 1})
        assert entry.seq == 3 and reg.history()[-1] == entry and reg.pointer()[0] == 3
    finally:
        reg.close()


@pytest.mark.redis
def test_a_layout_1_redis_registry_reads_and_upgrades(services, tmp_path):
    import redis

    prefix = "test:layout1:"
    url = f"{services.registry_url}?prefix={prefix}"
    client = redis.Redis.from_url(services.registry_url, decode_responses=True)
    try:
        client.set(prefix + "schema", 1)
        client.hset(prefix + "pointer", mapping={"counter": 1, "active": ""})
        client.rpush(
            prefix + "history",
            json.dumps(
                {
                    "seq": 1,
                    "at": 1.0,
                    "action": "activate",
                    "version": None,
                    "previous": None,
                    "actor": "op",
                    "reason": "old",
                }
            ),
        )
        reg = open_registry(url, tmp_path / "adapters")
        try:
            [entry] = reg.history()
            assert (entry.action, entry.reason, entry.evidence) == ("activate", "old", None)
            assert reg.canary() is None and reg.pointer() == (1, None)
            assert client.get(prefix + "schema") == str(SCHEMA_VERSION)
        finally:
            reg.close()
    finally:
        for key in client.scan_iter(prefix + "*"):
            client.delete(key)
        client.close()
