"""The bound on the replay buffer (learner.buffer_retention): what stays, and that dropping keeps the
rest whole: KL pairs, the watermark, erasure of a user later, and a file that shrinks."""

from __future__ import annotations

import sqlite3
from typing import Any

from foundation.sqlite import file_bytes
from learner.buffer import ReplayBuffer
from learner.buffer_retention import Bound
from learner.loop import held_out
from tests.learner.test_buffer import label, reference_all, stored

Stream = Any  # conftest's EventStream


def rate_many(buffer: ReplayBuffer, stream: Stream, ids: list[str], user: str = "alice") -> None:
    """A response and its user's rating for each id, in one batch (one commit), in this order."""
    events = []
    for i, response_id in enumerate(ids):
        events.append(stream.response(response_id, user=user, completion=[i % 50, 1], publish=False))
        label = "desirable" if i % 3 else "undesirable"
        events.append(stream.feedback(response_id, label, user=user, publish=False))
    buffer.apply(stream.polled(*events), now=0.0)


def kept(buffer: ReplayBuffer) -> list[str]:
    return [row[0] for row in rows(buffer, "SELECT response_id FROM examples ORDER BY position")]


def rows(buffer: ReplayBuffer, sql: str) -> list[tuple]:
    with sqlite3.connect(buffer.path) as conn:
        return conn.execute(sql).fetchall()


def test_the_newest_stay_with_an_even_sample_of_the_older_ones(buffer: ReplayBuffer, stream: Stream) -> None:
    ids = [f"r{i:04d}" for i in range(2000)]
    rate_many(buffer, stream, ids)
    assert buffer.enforce_retention(Bound(max_examples=400, recent_share=0.5)) == 1600
    left = kept(buffer)
    assert len(left) == 400 and left[-200:] == ids[-200:]
    older = [ids.index(i) for i in left[:-200]]
    for quarter in range(4):  # the sample spreads over the whole past, not its start or its end
        assert 25 <= sum(quarter * 450 <= i < (quarter + 1) * 450 for i in older) <= 75
    # Independent of the held-out split (a hash too): about a tenth of the sample is held out.
    assert sum(held_out(stored(buffer, ids[i]), 0.1) for i in older) < 40
    # At the bound already, nothing more goes; 100 newcomers push out 100.
    assert buffer.enforce_retention(Bound(max_examples=400)) == 0
    rate_many(buffer, stream, [f"n{i}" for i in range(100)])
    assert buffer.enforce_retention(Bound(max_examples=400)) == 100
    again = kept(buffer)
    assert len(again) == 400 and again[-200:] == ids[-100:] + [f"n{i}" for i in range(100)]


def test_the_same_stream_keeps_the_same_examples(tmp_path: Any, stream: Stream) -> None:
    def run(name: str) -> list[str]:
        with ReplayBuffer(tmp_path / name) as buffer:
            rate_many(buffer, stream, [f"r{i}" for i in range(300)])
            buffer.enforce_retention(Bound(max_examples=60, recent_share=0.25))
            return kept(buffer)

    assert run("a.sqlite3") == run("b.sqlite3")


def test_examples_older_than_the_age_go_and_a_running_canarys_stay(buffer: ReplayBuffer, stream: Stream) -> None:
    rate_many(buffer, stream, [f"old{i}" for i in range(5)])  # created at 1001..1010
    rate_many(buffer, stream, [f"new{i}" for i in range(5)])  # created at 1011..1020
    assert buffer.enforce_retention(Bound(max_age_s=100.0), now=1110.5) == 5
    assert kept(buffer) == [f"new{i}" for i in range(5)]
    # Over the count, but the canary started at 1015: the labels it counts stay.
    assert buffer.enforce_retention(Bound(max_examples=1, recent_share=1.0), keep_since=1015.0, now=1110.5) == 2
    assert kept(buffer) == [f"new{i}" for i in range(2, 5)]


def test_kept_examples_keep_their_kl_pairs_and_nothing_becomes_fresh(buffer: ReplayBuffer, stream: Stream) -> None:
    ids = [f"r{i}" for i in range(10)]
    rate_many(buffer, stream, ids)
    reference_all(buffer)
    before = {e.response_id: e for e in buffer.referenced()}
    watermark = buffer.max_seq()
    buffer.enforce_retention(Bound(max_examples=4, recent_share=0.5))
    buffer.apply([], now=365 * 24 * 3600.0)  # the pruning of old unrated responses leaves partners alone
    left = kept(buffer)
    assert len(left) == 4 and left[-2:] == ids[-2:]
    for example in buffer.referenced():
        old = before[example.response_id]
        # The same pair, the same reference log-probs, the same seq: nothing to compute or retrain.
        assert example.kl_partner == old.kl_partner and example.kl_partner_completion_ids is not None
        assert example.kl_partner_completion_ids == old.kl_partner_completion_ids
        assert (example.ref_logp, example.kl_ref_logp, example.seq) == (old.ref_logp, old.kl_ref_logp, old.seq)
    assert buffer.fresh(watermark) == [] and buffer.max_seq() == watermark
    # A partner's response kept only for its pair is no unrated response; it goes with its pair.
    assert buffer.counts()["unrated_responses"] == 0
    buffer.enforce_retention(Bound(max_examples=1, recent_share=1.0))
    assert kept(buffer) == ["r9"]
    assert sorted(r for (r,) in rows(buffer, "SELECT response_id FROM responses")) == ["r8", "r9"]
    assert stored(buffer, "r9").kl_partner_completion_ids == before["r9"].kl_partner_completion_ids


def test_the_watermark_never_goes_back_when_the_newest_seq_is_dropped(buffer: ReplayBuffer, stream: Stream) -> None:
    ids = [f"r{i}" for i in range(6)]
    rate_many(buffer, stream, ids)
    reference_all(buffer)
    label(buffer, stream, "r0", desirable=not stored(buffer, "r0").desirable)  # a changed vote: a new seq
    assert stored(buffer, "r0").seq == buffer.max_seq()
    watermark = buffer.max_seq()
    buffer.enforce_retention(Bound(max_examples=2, recent_share=1.0))
    assert "r0" not in kept(buffer)
    assert buffer.max_seq() == watermark and buffer.fresh(watermark) == []


def test_erasing_a_user_later_still_flags_the_versions_trained_on_dropped_examples(
    buffer: ReplayBuffer, stream: Stream
) -> None:
    rate_many(buffer, stream, ["a1", "a2"], user="alice")
    rate_many(buffer, stream, [f"b{i}" for i in range(4)], user="bob")
    buffer.mark_trained(["a1", "b0"], "v1")
    buffer.mark_trained(["b1"], "v2")
    buffer.enforce_retention(Bound(max_examples=3, recent_share=1.0))
    assert kept(buffer) == ["b1", "b2", "b3"]
    # Only what a version trained on leaves a trace, and only a hash of its user.
    assert rows(buffer, "SELECT response_id FROM retired ORDER BY response_id") == [("a1",), ("b0",)]
    assert "alice" not in str(rows(buffer, "SELECT * FROM retired"))

    buffer.apply(stream.polled(stream.erasure("alice", publish=False)), now=0.0)
    [done] = buffer.erasures_to_report()
    assert done.versions == ["v1"]
    assert rows(buffer, "SELECT response_id FROM retired") == [("b0",)]
    assert rows(buffer, "SELECT response_id, version FROM trained ORDER BY response_id") == [("b0", "v1"), ("b1", "v2")]


def test_erasing_the_user_of_a_response_kept_as_a_partner_repairs_the_pair(
    buffer: ReplayBuffer, stream: Stream
) -> None:
    rate_many(buffer, stream, ["a1"], user="alice")
    rate_many(buffer, stream, ["b1", "b2"], user="bob")
    reference_all(buffer)
    buffer.enforce_retention(Bound(max_examples=2, recent_share=1.0))
    assert kept(buffer) == ["b1", "b2"] and stored(buffer, "b1").kl_partner == "a1"
    buffer.apply(stream.polled(stream.erasure("alice", publish=False)), now=0.0)
    bob = stored(buffer, "b1")
    assert (bob.kl_partner, bob.ref_logp) == ("b2", None)  # a new partner, its reference computed again
    assert rows(buffer, "SELECT COUNT(*) FROM responses WHERE user = 'alice'") == [(0,)]


def test_the_file_shrinks_after_a_big_drop(buffer: ReplayBuffer, stream: Stream) -> None:
    events = []
    for i in range(400):
        events.append(stream.response(f"r{i}", completion=list(range(2000)), publish=False))
        events.append(stream.feedback(f"r{i}", publish=False))
    buffer.apply(stream.polled(*events), now=0.0)
    grown = file_bytes(buffer.path)
    assert grown > 3_000_000
    assert buffer.enforce_retention(Bound(max_examples=10)) == 390
    assert file_bytes(buffer.path) < grown / 5
    assert len(kept(buffer)) == 10
