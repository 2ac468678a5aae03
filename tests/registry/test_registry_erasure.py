"""Erasures in the registry (registry.erasure), on every backend: versions trained on erased
feedback are flagged, the erasure is in the history, a repeat changes nothing, and a registry
written before erasures existed (layout 2) is migrated."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from registry import UnknownVersion, open_registry


def _publish(reg, make_adapter, base_model, parent=None) -> str:
    return reg.publish(make_adapter(), base_model=base_model, parent=parent, metrics={}, lineage={}).version


def test_an_erasure_flags_the_versions_and_is_in_the_history(reg, make_adapter, base_model):
    v1 = _publish(reg, make_adapter, base_model)
    v2 = _publish(reg, make_adapter, base_model, v1)
    v3 = _publish(reg, make_adapter, base_model, v2)
    reg.activate(v2, actor="op")
    counter = reg.pointer()[0]

    entry = reg.record_erasure(
        "req-1",
        [v2, v1, v2],
        actor="learner",
        reason="user data erased on request",
        evidence={"removed": {"examples": 3}},
    )
    assert (entry.action, entry.version, entry.previous, entry.actor) == ("erasure", None, None, "learner")
    assert entry.evidence == {"removed": {"examples": 3}, "request_id": "req-1", "flagged_versions": [v1, v2]}
    assert reg.history()[-1] == entry
    assert reg.pointer() == (counter + 1, v2)  # a history entry like any other; the pointer stays
    flags = {v.version: v.flags for v in reg.list_versions()}
    assert flags[v3] == () and reg.get(v3).to_json()["flags"] == []
    for version in (v1, v2):
        [flag] = reg.get(version).flags
        assert flag["erasure"] == "req-1" and flag["reason"] == "user data erased on request"
        assert flags[version] == reg.get(version).flags
    assert entry.names(v1) and entry.names(v2) and not entry.names(v3)


def test_a_repeated_erasure_returns_the_first_entry_and_writes_nothing(reg, make_adapter, base_model):
    v1 = _publish(reg, make_adapter, base_model)
    first = reg.record_erasure("req-1", [v1], actor="learner")
    pointer, history = reg.pointer(), reg.history()
    assert reg.record_erasure("req-1", [v1], actor="learner") == first
    assert reg.pointer() == pointer and reg.history() == history and len(reg.get(v1).flags) == 1
    reg.record_erasure("req-2", [v1], actor="learner")  # another request flags it again
    assert [f["erasure"] for f in reg.get(v1).flags] == ["req-1", "req-2"]


def test_an_erasure_naming_an_unknown_version_writes_nothing(reg, make_adapter, base_model):
    v1 = _publish(reg, make_adapter, base_model)
    before = reg.history()
    with pytest.raises(UnknownVersion):
        reg.record_erasure("req-1", [v1, "v9999"], actor="learner")
    assert reg.history() == before and reg.get(v1).flags == ()
    # An erasure of someone whose feedback trained nothing is still recorded.
    assert reg.record_erasure("req-2", [], actor="learner").evidence["flagged_versions"] == []


def test_concurrent_erasures_keep_every_flag(open_reg, make_adapter, base_model):
    first = open_reg()
    v1 = _publish(first, make_adapter, base_model)
    clients = [open_reg() for _ in range(4)]
    threads = [
        threading.Thread(
            target=lambda c=c, i=i: [c.record_erasure(f"req-{i}-{j}", [v1], actor="learner") for j in range(5)]
        )
        for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(first.get(v1).flags) == 20
    assert sum(e.action == "erasure" for e in first.history()) == 20


def test_a_layout_2_sqlite_registry_is_migrated(tmp_path, make_adapter, base_model):
    db = tmp_path / "registry.sqlite3"
    reg = open_registry(f"sqlite:///{db}")
    v1 = _publish(reg, make_adapter, base_model)
    reg.start_canary(v1, 0.2, actor="op", evidence={"n": 1})
    reg.close()
    with sqlite3.connect(db) as conn:  # back to layout 2: no flags, a history without erasures
        conn.executescript(
            "DROP TABLE flags; ALTER TABLE versions DROP COLUMN pinned; ALTER TABLE versions DROP COLUMN pruned_at;"
            "CREATE TABLE history_old AS SELECT * FROM history; DROP TABLE history;"
            "CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL"
            " CHECK (action IN ('activate', 'rollback', 'canary_start')), version TEXT, previous TEXT,"
            " actor TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT);"
            "INSERT INTO history SELECT * FROM history_old; DROP TABLE history_old; PRAGMA user_version = 2;"
        )
    conn.close()
    reg = open_registry(f"sqlite:///{db}")
    try:
        [start] = reg.history()
        assert (start.action, start.version, start.evidence) == ("canary_start", v1, {"n": 1})
        entry = reg.record_erasure("req-1", [v1], actor="learner")
        assert reg.history() == [start, entry] and reg.get(v1).flags[0]["erasure"] == "req-1"
    finally:
        reg.close()
