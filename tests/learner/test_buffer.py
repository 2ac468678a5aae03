"""The replay buffer on its own: batches applied directly, no bus (see test_consumer.py for that)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from learner.buffer import ReplayBuffer
from learner.example import Example

Stream = Any  # conftest's EventStream


def label(buffer: ReplayBuffer, stream: Stream, response_id: str, desirable: bool = True, **kw: Any) -> None:
    """A response and its rating, applied as one batch."""
    buffer.apply(
        stream.polled(
            stream.response(response_id, publish=False, **kw),
            stream.feedback(response_id, "desirable" if desirable else "undesirable", publish=False),
        ),
        now=0.0,
    )


def stored(buffer: ReplayBuffer, response_id: str) -> Example:
    """``buffer.get`` of an example that the test expects to be there."""
    example = buffer.get(response_id)
    assert example is not None, f"no example for {response_id}"
    return example


def reference_all(buffer: ReplayBuffer) -> None:
    buffer.set_reference([(e.response_id, -1.0, -2.0) for e in buffer.unreferenced(1000)])


def test_a_rated_response_becomes_one_example_with_the_served_tokens(buffer: ReplayBuffer, stream: Stream) -> None:
    response = stream.response("r1", prompt=[5, 0, 9], completion=[3, 3, 1], adapter_version="v7", publish=False)
    vote = stream.feedback("r1", "undesirable", publish=False)
    result = buffer.apply(stream.polled(response, vote), now=10.0)
    assert (result.records, result.responses, result.new_examples, result.parked) == (2, 1, 1, 0)
    example = buffer.get("r1")
    assert example is not None
    assert (example.prompt_ids, example.completion_ids) == ([5, 0, 9], [3, 3, 1])
    assert (example.user, example.adapter_version, example.desirable) == ("alice", "v7", False)
    assert (example.feedback_event_id, example.labeled_at) == (vote.event_id, vote.created_at)
    assert (example.ref_logp, example.kl_ref_logp, example.kl_partner, example.times_trained) == (None, None, None, 0)
    assert example.seq > 0


def test_feedback_before_its_response_is_parked_then_joined(buffer: ReplayBuffer, stream: Stream) -> None:
    vote = stream.feedback("r1", publish=False)
    assert buffer.apply(stream.polled(vote), now=0.0).parked == 1
    assert buffer.get("r1") is None and buffer.counts()["pending"] == 1
    result = buffer.apply(stream.polled(stream.response("r1", publish=False)), now=1.0)
    assert (result.resolved, result.new_examples) == (1, 1)
    assert buffer.counts()["pending"] == 0
    assert stored(buffer, "r1").feedback_event_id == vote.event_id


def test_parked_votes_resolve_in_time_order(buffer: ReplayBuffer, stream: Stream) -> None:
    newer = stream.feedback("r1", "undesirable", created_at=20.0, publish=False)
    older = stream.feedback("r1", "desirable", created_at=10.0, publish=False)
    buffer.apply(stream.polled(newer, older), now=0.0)
    result = buffer.apply(stream.polled(stream.response("r1", publish=False)), now=1.0)
    assert (result.resolved, result.new_examples, result.relabeled) == (2, 1, 1)  # oldest first
    assert stored(buffer, "r1").desirable is False


def test_a_repeated_event_counts_once(buffer: ReplayBuffer, stream: Stream) -> None:
    response, vote = stream.response("r1", publish=False), stream.feedback("r1", publish=False)
    first = buffer.apply(stream.polled(response, vote, vote), now=0.0)
    again = buffer.apply(stream.polled(response, vote), now=1.0)
    assert (first.new_examples, first.duplicates) == (1, 1)
    assert (again.duplicates, again.new_examples, again.responses) == (2, 0, 0)
    assert buffer.counts()["desirable"] == 1


def test_the_kl_partner_is_the_previous_example(buffer: ReplayBuffer, stream: Stream) -> None:
    label(buffer, stream, "a", completion=[1])
    # Alone, the first example has no partner, so it cannot be referenced yet.
    assert stored(buffer, "a").kl_partner is None and buffer.unreferenced(10) == []
    label(buffer, stream, "b", completion=[2])
    label(buffer, stream, "c", completion=[3])
    partners = {e.response_id: (e.kl_partner, e.kl_partner_completion_ids) for e in buffer.unreferenced(10)}
    assert partners == {"a": ("b", [2]), "b": ("a", [1]), "c": ("b", [2])}
    assert [e.response_id for e in buffer.unreferenced(2)] == ["a", "b"]  # oldest first


def test_set_reference_round_trips_and_survives_a_relabel(buffer: ReplayBuffer, stream: Stream) -> None:
    label(buffer, stream, "a")
    label(buffer, stream, "b")
    assert buffer.set_reference([("a", -3.5, -7.25), ("gone", -1.0, -1.0)]) == 1
    a = buffer.get("a")
    assert a is not None
    assert (a.ref_logp, a.kl_ref_logp) == (-3.5, -7.25)
    assert [e.response_id for e in buffer.unreferenced(10)] == ["b"]
    buffer.apply(stream.polled(stream.feedback("a", "undesirable", publish=False)), now=1.0)
    relabeled = buffer.get("a")
    assert relabeled is not None
    assert relabeled.desirable is False and relabeled.seq > a.seq
    assert (relabeled.ref_logp, relabeled.kl_ref_logp) == (-3.5, -7.25)
    with pytest.raises(ValueError, match="finite"):
        buffer.set_reference([("b", math.nan, -1.0)])
    assert stored(buffer, "b").ref_logp is None


def test_fresh_and_max_seq_follow_the_watermark(buffer: ReplayBuffer, stream: Stream) -> None:
    assert buffer.max_seq() == 0 and buffer.fresh(0) == []
    for rid in "abc":
        label(buffer, stream, rid)
    buffer.set_reference([("b", -1.0, -1.0), ("c", -1.0, -1.0)])
    assert [e.response_id for e in buffer.fresh(0)] == ["b", "c"]  # only referenced ones
    watermark = buffer.max_seq()
    assert buffer.fresh(watermark) == []
    # "a" was labeled before the watermark but referenced after it: it must still come as fresh.
    buffer.set_reference([("a", -1.0, -1.0)])
    assert [e.response_id for e in buffer.fresh(watermark)] == ["a"]
    watermark = buffer.max_seq()
    buffer.apply(stream.polled(stream.feedback("c", "undesirable", publish=False)), now=1.0)
    assert [(e.response_id, e.desirable) for e in buffer.fresh(watermark)] == [("c", False)]
    assert [e.response_id for e in buffer.referenced()] == ["a", "b", "c"]


def test_the_index_is_light_and_load_fetches_the_picked_examples(buffer: ReplayBuffer, stream: Stream) -> None:
    for i in range(6):
        user = f"u{i % 2}"
        buffer.apply(
            stream.polled(
                stream.response(f"r{i}", user=user, completion=[i], publish=False),
                stream.feedback(f"r{i}", "desirable" if i % 2 == 0 else "undesirable", user=user, publish=False),
            ),
            now=0.0,
        )
    buffer.set_reference([(f"r{i}", -1.0, -2.0) for i in range(1, 6)])  # r0 stays unreferenced
    index = buffer.index()
    assert [(r.response_id, r.user, r.desirable) for r in index] == [
        (f"r{i}", f"u{i % 2}", i % 2 == 0) for i in range(1, 6)
    ]
    assert [r.seq for r in index] == [stored(buffer, r.response_id).seq for r in index]
    loaded = buffer.load(["r4", "r2", "nope", "r4"])
    assert [(e.response_id, e.completion_ids) for e in loaded] == [("r4", [4]), ("r2", [2])]
    assert loaded == [e for e in buffer.referenced() if e.response_id in ("r4", "r2")][::-1]


def test_mark_trained_and_counts(buffer: ReplayBuffer, stream: Stream) -> None:
    label(buffer, stream, "a", desirable=True)
    label(buffer, stream, "b", desirable=False)
    label(buffer, stream, "c", desirable=False)
    buffer.apply(stream.polled(stream.response("unrated", publish=False), stream.feedback("x", publish=False)), now=1.0)
    reference_all(buffer)
    buffer.mark_trained(["a", "a", "b"])
    assert [stored(buffer, r).times_trained for r in "abc"] == [2, 1, 0]
    assert buffer.counts() == {
        "desirable": 1,
        "undesirable": 2,
        "pending": 1,
        "unreferenced": 0,
        "unrated_responses": 1,
        "dead_letters_queued": 0,
    }


def test_expired_feedback_moves_to_the_outbox_in_one_step(buffer_path: Path, stream: Stream) -> None:
    buffer = ReplayBuffer(buffer_path)
    vote = stream.feedback("lost", publish=False)
    buffer.apply(stream.polled(vote), now=100.0)
    assert buffer.expire_pending(now=159.0, ttl_s=60.0) == []
    [letter] = buffer.expire_pending(now=160.0, ttl_s=60.0)
    assert "never arrived within 60 s" in letter.reason and vote.event_id in letter.reason
    assert (letter.topic, letter.partition, letter.offset) == (stream.topics.feedback, 0, 0)
    assert letter.raw == stream.polled(vote)[0][0].value
    assert buffer.counts()["pending"] == 0
    buffer.close()
    # Queued, not yet sent: it survives a restart until the consumer says it went out.
    buffer = ReplayBuffer(buffer_path)
    assert buffer.dead_letters_to_send() == [letter]
    buffer.dead_letters_sent([letter.id])
    assert buffer.dead_letters_to_send() == []
    buffer.close()


def test_feedback_on_a_rejected_response_is_dead_lettered(buffer: ReplayBuffer, stream: Stream) -> None:
    vote = stream.feedback("r1", publish=False)
    buffer.apply(stream.polled(vote), now=0.0)  # parked
    [(record, event, _)] = stream.polled(stream.response("r1", completion=[], publish=False))
    result = buffer.apply([(record, event, "response r1 has no completion token ids")], now=1.0)
    assert (result.resolved, result.dead_lettered, result.new_examples) == (1, 2, 0)
    reasons = sorted(d.reason for d in buffer.dead_letters_to_send())
    assert reasons[0].startswith(f"feedback {vote.event_id} on response r1: the response was rejected")
    assert reasons[1] == "response r1 has no completion token ids"
    assert buffer.counts()["unrated_responses"] == 0
    # Replayed from the dead letters once fixed, the response and then the vote count after all.
    fixed = buffer.apply(stream.polled(stream.response("r1", completion=[4], publish=False), vote), now=2.0)
    assert (fixed.responses, fixed.new_examples, fixed.duplicates) == (1, 1, 0)
    assert stored(buffer, "r1").completion_ids == [4]


def test_the_buffer_survives_reopening_and_never_reuses_a_seq(buffer_path: Path, stream: Stream) -> None:
    with ReplayBuffer(buffer_path) as buffer:
        label(buffer, stream, "a")
        label(buffer, stream, "b")
        buffer.apply(stream.polled(stream.feedback("parked", publish=False)), now=0.0)
        before = {e.response_id: e for e in buffer.unreferenced(10)}
    with ReplayBuffer(buffer_path) as buffer:
        assert {e.response_id: e for e in buffer.unreferenced(10)} == before
        assert buffer.counts()["pending"] == 1
        label(buffer, stream, "c")
        assert stored(buffer, "c").seq > max(e.seq for e in before.values())


def test_unrated_responses_are_dropped_after_the_retention(buffer_path: Path, stream: Stream) -> None:
    with ReplayBuffer(buffer_path, retention_s=1000.0) as buffer:
        buffer.apply(
            stream.polled(stream.response("rated", publish=False), stream.response("unrated", publish=False)), now=0.0
        )
        buffer.apply(stream.polled(stream.feedback("rated", publish=False)), now=500.0)
        buffer.apply([], now=2000.0)
        assert buffer.counts()["unrated_responses"] == 0
        assert buffer.get("rated") is not None


def test_a_persons_label_outranks_a_rules_whatever_their_times(buffer: ReplayBuffer, stream: Stream) -> None:
    buffer.apply(stream.polled(stream.response("r1", publish=False)), now=0.0)
    person = stream.feedback("r1", "desirable", created_at=10.0, publish=False)
    later_rule = stream.feedback("r1", "undesirable", created_at=20.0, source="rule:no-x", publish=False)
    buffer.apply(stream.polled(person, later_rule), now=1.0)
    held = stored(buffer, "r1")
    assert (held.desirable, held.source, held.feedback_event_id) == (True, "human", person.event_id)

    earlier_rule = stream.feedback("r2", "undesirable", created_at=10.0, source="rule:no-x", publish=False)
    later_person = stream.feedback("r2", "desirable", created_at=5.0, publish=False)  # an older clock
    buffer.apply(stream.polled(stream.response("r2", publish=False), earlier_rule, later_person), now=2.0)
    held = stored(buffer, "r2")
    assert (held.desirable, held.source) == (True, "human")


def test_labels_rank_thumb_annotator_implicit_then_labelers_whatever_their_times(
    buffer: ReplayBuffer, stream: Stream
) -> None:
    # Sent lowest rank last, each a second later than the one before: none may replace a higher one.
    buffer.apply(stream.polled(stream.response("r1", publish=False)), now=0.0)
    votes = [
        stream.feedback("r1", "desirable", created_at=10.0, publish=False),
        stream.feedback("r1", "undesirable", created_at=11.0, source="annotator", rater="ann-1", publish=False),
        stream.feedback("r1", "undesirable", created_at=12.0, source="implicit", signal="regenerate", publish=False),
        stream.feedback("r1", "undesirable", created_at=13.0, source="rule:no-x", publish=False),
    ]
    buffer.apply(stream.polled(*votes), now=1.0)
    assert (stored(buffer, "r1").desirable, stored(buffer, "r1").source) == (True, "human")

    # Sent lowest rank first: each replaces the one before, and the stored source names the signal.
    buffer.apply(stream.polled(stream.response("r2", publish=False)), now=2.0)
    held = []
    for source, signal in (("rule:no-x", None), ("implicit", "copy"), ("annotator", None), ("human", None)):
        label = "desirable" if source in ("implicit", "human") else "undesirable"
        buffer.apply(stream.polled(stream.feedback("r2", label, source=source, signal=signal, publish=False)), now=3.0)
        held.append(stored(buffer, "r2").source)
    assert held == ["rule:no-x", "implicit:copy", "annotator", "human"]


def test_between_labelers_the_latest_label_wins(buffer: ReplayBuffer, stream: Stream) -> None:
    label(buffer, stream, "r0")  # a KL partner, so that r1 can be referenced
    first = stream.feedback("r1", "undesirable", source="rule:a", publish=False)
    second = stream.feedback("r1", "desirable", source="judge:b", weight=2.5, publish=False)
    # Parked before the response arrives: the source survives the wait.
    buffer.apply(stream.polled(first, second), now=0.0)
    buffer.apply(stream.polled(stream.response("r1", publish=False)), now=1.0)
    held = stored(buffer, "r1")
    assert (held.desirable, held.source, held.weight) == (True, "judge:b", 2.5)
    reference_all(buffer)
    assert [(r.response_id, r.source) for r in buffer.index()] == [("r0", "human"), ("r1", "judge:b")]


def test_a_buffer_written_before_sources_reads_its_labels_as_peoples(buffer_path: Path, stream: Stream) -> None:
    with ReplayBuffer(buffer_path) as buffer:
        label(buffer, stream, "old")
        buffer.apply(stream.polled(stream.feedback("parked", publish=False)), now=0.0)
    conn = sqlite3.connect(buffer_path)  # back to layout 2, which had no source columns
    conn.executescript(
        "ALTER TABLE examples DROP COLUMN source; ALTER TABLE pending DROP COLUMN source;"
        "ALTER TABLE examples DROP COLUMN weight; ALTER TABLE pending DROP COLUMN weight; PRAGMA user_version = 2;"
    )
    conn.close()
    with ReplayBuffer(buffer_path) as buffer:
        assert (stored(buffer, "old").source, stored(buffer, "old").weight) == ("human", 1.0)
        buffer.apply(stream.polled(stream.response("parked", publish=False)), now=1.0)
        assert (stored(buffer, "parked").source, stored(buffer, "parked").weight) == ("human", 1.0)
