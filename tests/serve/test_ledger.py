"""The response ledger: ownership, vote changes, TTL, concurrent votes across processes.

Tests taking ``ledger`` or ``ledger_store`` run on both backends (the embedded file and Redis, see
conftest.py); the rest test what only one backend has.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from serve.ledger import (
    LedgerEntry,
    LedgerUnavailable,
    NotResponseOwnerError,
    ResponseLedger,
    SqliteLedger,
    UnknownResponseError,
    VersionTally,
    open_ledger,
)
from serve.redis_ledger import RedisLedger
from testkit.ports import free_port
from tests.serve.ledger_fixtures import LedgerStore
from tests.tiny import FakeClock


def test_recorded_response_can_be_looked_up(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", "alice")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, None, None)
    assert ledger.lookup("nope") is None


def test_recording_twice_changes_nothing(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", "alice")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    ledger.record_response("r1", "mallory")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")


def test_first_repeated_and_changed_votes(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", "alice")
    assert ledger.set_vote("r1", "alice", "desirable", "e1") is None
    # Same vote again: reported as such, and the first event stays the one on record.
    assert ledger.set_vote("r1", "alice", "desirable", "e2") == "desirable"
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")
    assert ledger.set_vote("r1", "alice", "undesirable", "e3") == "desirable"
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, "undesirable", "e3")


def test_votes_on_unknown_responses_are_refused(ledger: ResponseLedger) -> None:
    with pytest.raises(UnknownResponseError):
        ledger.set_vote("never-served", "alice", "desirable", "e1")
    assert ledger.lookup("never-served") is None


def test_only_the_receiver_may_vote(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", "alice")
    with pytest.raises(NotResponseOwnerError):
        ledger.set_vote("r1", "mallory", "undesirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", None, None, None)


def test_an_anonymous_response_cannot_be_rated(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", None)
    assert ledger.lookup("r1") == LedgerEntry("r1", None, None, None, None)
    with pytest.raises(NotResponseOwnerError):
        ledger.set_vote("r1", "bob", "undesirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", None, None, None, None)


def test_the_version_that_answered_is_kept(ledger: ResponseLedger) -> None:
    ledger.record_response("r1", "alice", "v0003")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    assert ledger.lookup("r1") == LedgerEntry("r1", "alice", "v0003", "desirable", "e1")


def test_each_version_tallies_its_responses_and_current_votes(ledger_store: LedgerStore) -> None:
    one, two = ledger_store.open(), ledger_store.open()  # two replicas add to one tally
    for i in range(3):
        one.record_response(f"a{i}", "ann", "v0001")
    two.record_response("a0", "ann", "v0001")  # the same response again is not counted twice
    two.record_response("b0", "bob", None)
    one.set_vote("a0", "ann", "desirable", "e1")
    two.set_vote("a1", "ann", "desirable", "e2")
    two.set_vote("a1", "ann", "desirable", "e3")  # repeated: unchanged
    one.set_vote("a2", "ann", "undesirable", "e4")
    one.set_vote("a2", "ann", "desirable", "e5")  # changed: moves from one label to the other
    two.set_vote("b0", "bob", "undesirable", "e6")
    assert one.tally("v0001") == VersionTally(responses=3, desirable=3, undesirable=0)
    assert two.tally(None) == VersionTally(responses=1, desirable=0, undesirable=1)
    assert one.tally("v0009") == VersionTally()
    assert VersionTally(3, 2, 1).to_json()["desirable_rate"] == 2 / 3


def test_forgetting_a_user_deletes_their_entries_only(ledger: ResponseLedger) -> None:
    for i in range(3):
        ledger.record_response(f"a{i}", "ann", "v0001")
    ledger.record_response("b0", "bob", "v0001")
    ledger.set_vote("a0", "ann", "undesirable", "e1")
    assert ledger.forget_user("ann") == 3
    assert [ledger.lookup(f"a{i}") for i in range(3)] == [None, None, None]
    with pytest.raises(UnknownResponseError):
        ledger.set_vote("a1", "ann", "desirable", "e2")
    assert ledger.lookup("b0") == LedgerEntry("b0", "bob", "v0001", None, None)
    assert ledger.forget_user("ann") == 0
    # The counts stay: they are nobody's data.
    assert ledger.tally("v0001") == VersionTally(responses=4, desirable=0, undesirable=1)


@pytest.mark.parametrize(
    ("user", "label", "event_id"), [("a", "meh", "e"), ("", "desirable", "e"), ("a", "desirable", "")]
)
def test_bad_votes_are_rejected(ledger: ResponseLedger, user: str, label: str, event_id: str) -> None:
    ledger.record_response("r1", "a")
    with pytest.raises(ValueError):
        ledger.set_vote("r1", user, label, event_id)
    assert ledger.lookup("r1") == LedgerEntry("r1", "a", None, None, None)


def test_entries_expire_after_the_ttl(ledger_store: LedgerStore) -> None:
    ledger = ledger_store.open(ttl_s=1.0)  # short: Redis expires keys in real time
    ledger.record_response("r1", "alice")
    ledger.set_vote("r1", "alice", "desirable", "e1")
    ledger_store.pass_time(0.5)
    assert ledger.lookup("r1") is not None
    ledger_store.pass_time(0.6)
    assert ledger.lookup("r1") is None
    with pytest.raises(UnknownResponseError):
        ledger.set_vote("r1", "alice", "undesirable", "e2")
    # The same id served again starts a fresh entry.
    ledger.record_response("r1", "carol")
    assert ledger.lookup("r1") == LedgerEntry("r1", "carol", None, None, None)


def test_a_vote_does_not_extend_the_ttl(ledger_store: LedgerStore) -> None:
    ledger = ledger_store.open(ttl_s=1.0)
    ledger.record_response("r1", "alice")
    ledger_store.pass_time(0.5)
    ledger.set_vote("r1", "alice", "desirable", "e1")
    ledger.record_response("r1", "alice")  # a live entry: not renewed either
    ledger_store.pass_time(0.6)
    assert ledger.lookup("r1") is None


def test_expired_entries_are_purged_from_the_file(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path, ttl_s=100.0, clock=clock)
    for i in range(5):
        ledger.record_response(f"old{i}", "u")
    clock.advance(200.0)
    ledger.record_response("new", "u")
    ledger.close()
    rows = sqlite3.connect(path).execute("SELECT response_id FROM responses").fetchall()
    assert rows == [("new",)]


def test_the_ledger_persists_and_is_shared_between_instances(ledger_store: LedgerStore) -> None:
    one, two = ledger_store.open(), ledger_store.open()
    one.record_response("r1", "alice")
    assert two.set_vote("r1", "alice", "desirable", "e1") is None
    assert one.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")
    one.close()
    two.close()
    reopened = ledger_store.open()
    assert reopened.lookup("r1") == LedgerEntry("r1", "alice", None, "desirable", "e1")


def test_concurrent_votes_from_processes_serialise(
    ledger_store: LedgerStore, tmp_path: Path, spawn_voter: Callable
) -> None:
    # Processes stand for serve replicas: each vote's check-and-set must be atomic in the ledger.
    go = tmp_path / "go"
    ledger_store.open().record_response("r1", "alice")
    voters = [spawn_voter(ledger_store.url, ledger_store.key_prefix, "r1", "alice", 40, seed, go) for seed in range(3)]
    for child in voters:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    go.touch()
    votes: list[tuple[str, str]] = []
    for child in voters:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        votes += [tuple(line.split()) for line in out.splitlines()]
    assert len(votes) == 120

    final = ledger_store.open().lookup("r1").label  # type: ignore[union-attr]
    # In any serial order each vote's "previous" is the vote before it: exactly one first vote,
    # and every label is cast as often as it is reported as previous, bar the final one.
    previous = Counter(p for p, _ in votes)
    cast = Counter(label for _, label in votes)
    assert previous["None"] == 1
    for label in ("desirable", "undesirable"):
        assert cast[label] - previous[label] == (1 if label == final else 0)


def test_an_unreachable_redis_raises_ledger_unavailable_quickly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    ledger = RedisLedger(url, timeout_s=1.0)
    for call in (
        lambda: ledger.lookup("r1"),
        lambda: ledger.record_response("r1", "a"),
        lambda: ledger.set_vote("r1", "a", "desirable", "e1"),
    ):
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match=r"127\.0\.0\.1"):
            call()
        assert time.monotonic() - started < 5
    ledger.close()


def test_open_ledger_urls(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/sub/ledger.sqlite3")
    assert isinstance(ledger, SqliteLedger)
    ledger.close()
    assert (tmp_path / "sub" / "ledger.sqlite3").is_file()
    for url in ("redis://127.0.0.1:1/0", "rediss://user:secret@127.0.0.1:1/2"):
        ledger = open_ledger(url, ttl_s=60.0)  # connects on first use, not here
        assert isinstance(ledger, RedisLedger) and ledger.ttl_s == 60.0
        ledger.close()
    with pytest.raises(ValueError, match="sqlite"):
        open_ledger("postgres://db")
