"""Erasing a user's data in the learner (learner.erasure): the buffer forgets them, stays
forgotten across replays, other users' training pairs lose the erased completions, and the
versions trained on them are flagged in the registry with a history entry."""

from __future__ import annotations

import sqlite3
from typing import Any

from learner import erasure
from learner.buffer import ReplayBuffer
from learner.consumer import EventJoiner
from tests.learner.test_buffer import label, reference_all, stored

Stream = Any  # conftest's EventStream


def rated(buffer: ReplayBuffer, stream: Stream, response_id: str, user: str, **kw: Any) -> None:
    buffer.apply(
        stream.polled(
            stream.response(response_id, user=user, publish=False, **kw),
            stream.feedback(response_id, user=user, publish=False),
        ),
        now=0.0,
    )


def rows(buffer: ReplayBuffer, sql: str) -> list[tuple]:
    with sqlite3.connect(buffer.path) as conn:
        return conn.execute(sql).fetchall()


def test_an_erasure_removes_the_users_responses_ratings_and_parked_votes(buffer: ReplayBuffer, stream: Stream):
    label(buffer, stream, "a1")
    rated(buffer, stream, "b1", "bob")
    label(buffer, stream, "a2", desirable=False)
    parked = stream.feedback("a3", publish=False)  # alice's rating, its response not here yet
    unrated = stream.response("a4", publish=False)
    buffer.apply(stream.polled(parked, unrated), now=0.0)
    assert buffer.counts()["pending"] == 1

    result = buffer.apply(stream.polled(stream.erasure("alice", publish=False)), now=0.0)
    assert result.erasures == 1
    assert rows(buffer, "SELECT response_id FROM examples") == [("b1",)]
    assert buffer.counts()["pending"] == 0 and buffer.counts()["unrated_responses"] == 0
    assert rows(buffer, "SELECT user FROM responses") == [("bob",)]
    [done] = buffer.erasures_to_report()
    assert done.removed == {"examples": 2, "pending_ratings": 1, "responses": 3}
    assert done.user_hash == erasure.user_hash("alice") and "alice" not in repr(done)


def test_the_users_older_events_stay_out_on_replay_and_newer_ones_count(buffer: ReplayBuffer, stream: Stream):
    old_response, old_vote = stream.response("a1", publish=False), stream.feedback("a1", publish=False)
    buffer.apply(stream.polled(old_response, old_vote), now=0.0)
    buffer.apply(stream.polled(stream.erasure("alice", publish=False)), now=0.0)
    # A replay (e.g. after a restart before the offsets were committed) brings them again.
    again = buffer.apply(stream.polled(old_response, old_vote), now=1.0)
    assert (again.erased, again.new_examples, again.responses) == (2, 0, 0)
    assert buffer.get("a1") is None
    # Alice comes back after the erasure: that is new data.
    label(buffer, stream, "a2")
    assert buffer.get("a2") is not None


def test_events_older_than_an_erasure_in_the_same_batch_are_dropped(buffer: ReplayBuffer, stream: Stream):
    response, vote = stream.response("a1", publish=False), stream.feedback("a1", publish=False)
    result = buffer.apply(stream.polled(stream.erasure("alice", publish=False), response, vote), now=0.0)
    assert (result.erased, result.new_examples) == (2, 0) and buffer.get("a1") is None


def test_other_users_pairs_no_longer_use_an_erased_completion(buffer: ReplayBuffer, stream: Stream):
    rated(buffer, stream, "b1", "bob", completion=[1])
    label(buffer, stream, "a1", completion=[2])
    rated(buffer, stream, "c1", "carol", completion=[3])
    reference_all(buffer)
    # The first example took the second as its partner; every later one takes the one before.
    assert (stored(buffer, "b1").kl_partner, stored(buffer, "c1").kl_partner) == ("a1", "a1")
    watermark = buffer.max_seq()

    buffer.apply(stream.polled(stream.erasure("alice", publish=False)), now=0.0)
    bob, carol = stored(buffer, "b1"), stored(buffer, "c1")
    assert (carol.kl_partner, carol.kl_partner_completion_ids, carol.ref_logp) == ("b1", [1], None)
    assert (bob.kl_partner, bob.kl_partner_completion_ids, bob.ref_logp) == ("c1", [3], None)
    reference_all(buffer)  # computed again for the new pairs, so they are fresh again
    assert [e.response_id for e in buffer.fresh(watermark)] == ["b1", "c1"]


def test_the_versions_trained_on_the_user_are_flagged_once_reported(
    buffer: ReplayBuffer, stream: Stream, registry, publish
):
    label(buffer, stream, "a1")
    rated(buffer, stream, "b1", "bob")
    v1, v2, v3 = (publish() for _ in range(3))
    buffer.mark_trained(["a1", "b1"], v1)
    buffer.mark_trained(["b1"], v2)
    buffer.mark_trained(["a1"], v3)
    event = stream.erasure("alice", publish=False)
    buffer.apply(stream.polled(event), now=0.0)

    assert erasure.report(buffer, registry) == 1
    assert erasure.report(buffer, registry) == 0  # reported once
    assert [f["erasure"] for f in registry.get(v1).flags] == [event.event_id]
    assert registry.get(v2).flags == () and registry.get(v3).flags[0]["erasure"] == event.event_id
    entry = registry.history()[-1]
    assert (entry.action, entry.evidence["request_id"], entry.evidence["flagged_versions"]) == (
        "erasure",
        event.event_id,
        [v1, v3],
    )
    assert entry.evidence["removed"]["examples"] == 1 and "alice" not in str(entry.to_json())
    assert rows(buffer, "SELECT response_id, version FROM trained ORDER BY version") == [("b1", v1), ("b1", v2)]


def test_the_consumer_reads_erasures_from_the_bus(buffer: ReplayBuffer, stream: Stream, event_bus, topics):
    stream.response("a1")
    stream.feedback("a1")
    stream.erasure("alice")
    with EventJoiner(event_bus, topics, buffer, group_id="erasure-test") as joiner:
        total = joiner.poll_once(timeout_s=0.5)
        while joiner.lag():
            total += joiner.poll_once(timeout_s=0.5)
    assert total.erasures == 1 and buffer.get("a1") is None
