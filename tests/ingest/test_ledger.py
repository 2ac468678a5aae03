"""The response ledger: ownership, vote changes, TTL, concurrent votes across processes."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.ledger import (
    LedgerEntry,
    NotResponseOwnerError,
    SqliteLedger,
    UnknownResponseError,
    open_ledger,
)


def test_recorded_response_can_be_looked_up(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", "alice")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, None, None)
    assert ledger.lookup("nope") is None


def test_recording_twice_changes_nothing(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", "alice")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    ledger.record_response("r1", "mallory")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")


def test_first_repeated_and_changed_votes(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", "alice")
    assert ledger.set_vote("r1", "alice", "desirable", "e1") is None
    # Same vote again: reported as such, and the first event stays the one on record.
    assert ledger.set_vote("r1", "alice", "desirable", "e2") == "desirable"
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")
    assert ledger.set_vote("r1", "alice", "undesirable", "e3") == "desirable"
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "undesirable", "e3")


def test_votes_on_unknown_responses_are_refused(ledger: SqliteLedger) -> None:
    with pytest.raises(UnknownResponseError):
        ledger.set_vote("never-served", "alice", "desirable", "e1")
    assert ledger.lookup("never-served") is None


def test_only_the_receiver_may_vote(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", "alice")
    with pytest.raises(NotResponseOwnerError):
        ledger.set_vote("r1", "mallory", "undesirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, None, None)


def test_an_anonymous_response_cannot_be_rated(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", None)
    assert ledger.lookup("r1") == LedgerEntry("r1", None, None, None, None)
    with pytest.raises(NotResponseOwnerError):
        ledger.set_vote("r1", "bob", "undesirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", None, None, None, None)


def test_the_version_that_answered_is_kept(ledger: SqliteLedger) -> None:
    ledger.record_response("r1", "alice", "v0003")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", "v0003", "desirable", "e1")


@pytest.mark.parametrize(
    ("user", "label", "event_id"), [("a", "meh", "e"), ("", "desirable", "e"), ("a", "desirable", "")]
)
def test_bad_votes_are_rejected(ledger: SqliteLedger, user: str, label: str, event_id: str) -> None:
    ledger.record_response("r1", "a")
    with pytest.raises(ValueError):
        ledger.set_vote("r1", user, label, event_id)
    assert ledger.lookup("r1") == LedgerEntry("r1", "a", None, None, None)


def test_entries_expire_after_the_ttl(ledger: SqliteLedger, clock: Any) -> None:
    ledger.record_response("r1", "alice")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    clock.advance(3599.0)
    assert ledger.lookup("r1") is not None
    clock.advance(2.0)
    assert ledger.lookup("r1") is None
    with pytest.raises(UnknownResponseError):
        ledger.set_vote("r1", "alice", "undesirable", "e2")
    # The same id served again starts a fresh entry.
    ledger.record_response("r1", "carol")
    assert ledger.lookup("r1") == LedgerEntry("r1", "carol", None, None, None)


def test_expired_entries_are_purged_from_the_file(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path, ttl_s=100.0, clock=clock)
    for i in range(5):
        ledger.record_response(f"old{i}", "u")
    clock.advance(200.0)
    ledger.record_response("new", "u")
    ledger.close()
    rows = sqlite3.connect(path).execute("SELECT response_id FROM responses").fetchall()
    assert rows == [("new",)]


def test_the_ledger_persists_and_is_shared_between_instances(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with SqliteLedger(path) as one, SqliteLedger(path) as two:
        one.record_response("r1", "alice")
        assert two.set_vote("r1", "alice", "desirable", "e1") is None
        assert one.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")
    with SqliteLedger(path) as reopened:
        assert reopened.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")


def test_concurrent_votes_from_processes_serialise(tmp_path: Path, spawn_worker: Callable) -> None:
    path = tmp_path / "ledger.sqlite3"
    go = tmp_path / "go"
    with SqliteLedger(path) as ledger:
        ledger.record_response("r1", "alice")
    voters = [spawn_worker("voter", path, "r1", "alice", 40, seed, go) for seed in range(3)]
    for child in voters:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    go.touch()
    votes: list[tuple[str, str]] = []
    for child in voters:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        votes += [tuple(line.split()) for line in out.splitlines()]  # type: ignore[misc]
    assert len(votes) == 120

    with SqliteLedger(path) as ledger:
        final = ledger.lookup("r1").label  # type: ignore[union-attr]
    # In any serial order each vote's "previous" is the vote before it: exactly one first vote,
    # and every label is cast as often as it is reported as previous, bar the final one.
    previous = Counter(p for p, _ in votes)
    cast = Counter(label for _, label in votes)
    assert previous["None"] == 1
    for label in ("desirable", "undesirable"):
        assert cast[label] - previous[label] == (1 if label == final else 0)


def test_open_ledger_urls(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/sub/ledger.sqlite3")
    assert isinstance(ledger, SqliteLedger)
    ledger.close()
    assert (tmp_path / "sub" / "ledger.sqlite3").is_file()
    with pytest.raises(ValueError, match="not available yet"):
        open_ledger("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="sqlite"):
        open_ledger("postgres://db")
