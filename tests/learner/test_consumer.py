"""The event joiner on the real embedded bus: joins, dead letters, crashes and restarts."""

from __future__ import annotations

import base64
import json
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.bus import BusUnavailable
from ingest.sqlite_bus import SqliteBus
from learner.buffer import ReplayBuffer
from learner.consumer import EventJoiner
from testkit.waiting import wait_for
from tests.learner.test_buffer import stored

Stream = Any  # conftest's EventStream
MakeJoiner = Callable[..., EventJoiner]


def test_response_then_feedback_gives_one_example_with_the_exact_tokens(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner
) -> None:
    stream.response("r1", prompt=[11, 0, 4095], completion=[17, 2, 2, 9])
    vote = stream.feedback("r1", "desirable")
    result = stream.join_all(make_joiner(buffer))
    assert (result.records, result.new_examples, result.dead_lettered) == (2, 1, 0)
    example = buffer.get("r1")
    assert example is not None
    assert (example.prompt_ids, example.completion_ids, example.desirable) == ([11, 0, 4095], [17, 2, 2, 9], True)
    assert example.feedback_event_id == vote.event_id
    assert stream.dead_letters() == []


def test_feedback_before_its_response_waits_for_it(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner
) -> None:
    joiner = make_joiner(buffer)
    stream.feedback("r1", "undesirable")
    assert stream.join_all(joiner).parked == 1
    assert buffer.get("r1") is None and buffer.counts()["pending"] == 1
    stream.response("r1")
    result = stream.join_all(joiner)
    assert (result.resolved, result.new_examples) == (1, 1)
    assert stored(buffer, "r1").desirable is False and buffer.counts()["pending"] == 0


def test_an_event_published_twice_counts_once(buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner) -> None:
    response = stream.response("r1")
    vote = stream.feedback("r1")
    stream.publish(vote)
    stream.publish(response)
    result = stream.join_all(make_joiner(buffer))
    assert (result.new_examples, result.duplicates) == (1, 2)
    assert buffer.counts()["desirable"] == 1


def test_a_changed_vote_replaces_the_label(buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner) -> None:
    joiner = make_joiner(buffer)
    stream.response("r1")
    stream.feedback("r1", "desirable")
    stream.join_all(joiner)
    first = buffer.get("r1")
    assert first is not None
    stream.feedback("r1", "undesirable")
    assert stream.join_all(joiner).relabeled == 1
    changed = buffer.get("r1")
    assert changed is not None
    assert changed.desirable is False and changed.seq > first.seq
    counts = buffer.counts()
    assert (counts["desirable"], counts["undesirable"]) == (0, 1)  # still one example


def test_an_older_vote_arriving_late_does_not_override(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner
) -> None:
    joiner = make_joiner(buffer)
    stream.response("r1")
    newer = stream.feedback("r1", "undesirable", created_at=2_000.0)
    assert stream.join_all(joiner).new_examples == 1
    seq = stored(buffer, "r1").seq
    stream.feedback("r1", "desirable", created_at=1_000.0)
    assert stream.join_all(joiner).stale == 1
    example = buffer.get("r1")
    assert example is not None
    assert example.seq == seq
    assert (example.desirable, example.feedback_event_id) == (False, newer.event_id)


def test_a_rating_whose_response_never_comes_is_dead_lettered_after_the_ttl(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner, join_clock: Any
) -> None:
    joiner = make_joiner(buffer, pending_ttl_s=60.0)
    vote = stream.feedback("lost")
    stream.join_all(joiner)
    join_clock.advance(30)
    assert stream.join_all(joiner).expired == 0 and stream.dead_letters() == []
    join_clock.advance(31)
    assert joiner.poll_once(timeout_s=0).expired == 1
    [letter] = stream.dead_letters()
    assert letter["reason"] == f"response lost never arrived within 60 s of its feedback {vote.event_id}"
    assert (letter["source_topic"], letter["offset"]) == (stream.topics.feedback, 0)
    assert json.loads(letter["value"])["event_id"] == vote.event_id
    assert buffer.counts()["pending"] == 0
    # The response turns up after all and an operator replays the dead letter: it counts now.
    stream.response("lost")
    stream.publish_raw(stream.topics.feedback, letter["value"].encode(), key="lost")
    assert stream.join_all(joiner).new_examples == 1
    assert stored(buffer, "lost").feedback_event_id == vote.event_id


def test_no_rating_expires_while_its_response_is_still_in_the_backlog(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner, join_clock: Any
) -> None:
    # A learner catching up: the feedback topic is read long before the responses topic is.
    for i in range(12):
        stream.response(f"r{i}")
    stream.feedback("r11")
    joiner = make_joiner(buffer, pending_ttl_s=60.0, max_records=2)
    assert joiner.poll_once(timeout_s=0).records > 0
    while True:
        join_clock.advance(61)
        if joiner.poll_once(timeout_s=0).records == 0:
            break
    assert buffer.get("r11") is not None and stream.dead_letters() == []


def test_malformed_events_are_dead_lettered_and_consumption_goes_on(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner
) -> None:
    topics = stream.topics
    stream.publish_raw(topics.responses, b"\xff\xfe not json")
    future = json.loads(stream.response("r0", publish=False).model_dump_json()) | {"schema_version": 2}
    stream.publish_raw(topics.responses, json.dumps(future).encode())
    stream.response("empty", completion=[])
    stream.feedback("empty")
    stream.response("r1")
    stream.feedback("r1")
    blank = stream.feedback("r1", user="  ")
    result = stream.join_all(make_joiner(buffer))
    assert (result.new_examples, result.dead_lettered) == (1, 5)
    letters = {(d["source_topic"], d["offset"]): d for d in stream.dead_letters()}
    assert len(letters) == 5
    assert letters[(topics.responses, 0)]["reason"].startswith("not UTF-8")
    assert base64.b64decode(letters[(topics.responses, 0)]["value"]) == b"\xff\xfe not json"
    assert letters[(topics.responses, 1)]["reason"] == "schema_version 2 is newer than this reader's 1"
    assert letters[(topics.responses, 2)]["reason"] == "response empty has no completion token ids"
    assert (
        "the response was rejected (response empty has no completion token ids)"
        in letters[(topics.feedback, 0)]["reason"]
    )
    assert letters[(topics.feedback, 2)]["reason"] == f"feedback {blank.event_id} has an unusable user id '  '"
    assert stored(buffer, "r1").desirable is True


def test_feedback_from_another_user_is_dead_lettered(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner
) -> None:
    joiner = make_joiner(buffer)
    stream.response("r1", user="alice")
    stream.response("anon", user=None)
    stream.feedback("r1", user="mallory")
    stream.feedback("anon", user="mallory")
    stream.feedback("later", user="mallory")  # parked: the check happens when its response comes
    stream.join_all(joiner)
    stream.response("later", user="alice")
    result = stream.join_all(joiner)
    assert (result.resolved, result.new_examples) == (1, 0)
    reasons = sorted(d["reason"] for d in stream.dead_letters())
    assert len(reasons) == 3 and all("rated by someone who did not receive it" in r for r in reasons)
    assert buffer.counts()["desirable"] + buffer.counts()["undesirable"] == 0


def test_a_crash_between_buffer_commit_and_offset_commit_changes_nothing_on_restart(
    buffer_path: Path, stream: Stream, make_joiner: MakeJoiner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        stream.response(f"r{i}")
        stream.feedback(f"r{i}", "desirable" if i % 2 else "undesirable")
    stream.feedback("r0", "desirable")  # a changed vote
    stream.publish_raw(stream.topics.feedback, b"{}")  # and a malformed record
    buffer = ReplayBuffer(buffer_path)
    joiner = make_joiner(buffer)

    def crash(*_: object, **__: object) -> None:
        raise KeyboardInterrupt("crash before the offset commit")

    monkeypatch.setattr(joiner._consumer, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        joiner.poll_once(timeout_s=0)
    joiner.close()
    before = {e.response_id: e for e in buffer.unreferenced(100)}
    assert len(before) == 5 and before["r0"].desirable is True
    buffer.close()

    buffer = ReplayBuffer(buffer_path)
    result = stream.join_all(make_joiner(buffer))
    assert (result.records, result.duplicates, result.new_examples, result.relabeled) == (12, 11, 0, 0)
    assert {e.response_id: e for e in buffer.unreferenced(100)} == before
    # The malformed record was dead-lettered before the crash and again after it: at least once.
    assert [d["offset"] for d in stream.dead_letters()] == [6, 6]
    buffer.close()


def test_dead_letters_queued_before_a_failed_publish_go_out_once_after_restart(
    buffer_path: Path, event_bus: SqliteBus, stream: Stream, make_joiner: MakeJoiner, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream.publish_raw(stream.topics.responses, b"[]")
    stream.response("r1")
    buffer = ReplayBuffer(buffer_path)
    joiner = make_joiner(buffer)
    with monkeypatch.context() as patch:
        patch.setattr(event_bus, "publish_many", lambda *a, **k: (_ for _ in ()).throw(BusUnavailable("down")))
        with pytest.raises(BusUnavailable):
            joiner.poll_once(timeout_s=0)
    joiner.close()
    assert buffer.counts()["dead_letters_queued"] == 1
    assert stream.dead_letters() == []
    result = stream.join_all(make_joiner(buffer))
    assert result.duplicates == 1  # the response; the malformed record was queued already
    [letter] = stream.dead_letters()
    assert letter["reason"] == "not a JSON object but list"
    assert buffer.counts()["dead_letters_queued"] == 0
    buffer.close()


def test_a_failed_apply_reads_the_batch_again(
    buffer: ReplayBuffer, stream: Stream, make_joiner: MakeJoiner, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream.response("r1")
    stream.feedback("r1")
    joiner = make_joiner(buffer)
    with monkeypatch.context() as patch:
        patch.setattr(buffer, "apply", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            joiner.poll_once(timeout_s=0)
    assert stream.join_all(joiner).new_examples == 1
    assert joiner.lag() == 0


def test_sigkill_mid_stream_then_a_fresh_joiner_counts_every_rating_once(
    tmp_path: Path, event_bus: SqliteBus, stream: Stream, spawn_join_worker: Callable[..., subprocess.Popen[str]]
) -> None:
    n = 240
    rng = random.Random(7)
    expected: dict[str, bool] = {}
    for i in range(n):
        rid = f"r{i}"
        first = rng.random() < 0.5
        if i % 5 == 0:
            stream.feedback(rid, "desirable" if first else "undesirable")  # before its response
        stream.response(rid)
        if i % 5 != 0:
            vote = stream.feedback(rid, "desirable" if first else "undesirable")
            if i % 7 == 0:
                stream.publish(vote)  # a producer's retry
        expected[rid] = first
        if i % 3 == 0:  # a changed vote
            stream.feedback(rid, "undesirable" if first else "desirable")
            expected[rid] = not first
    end = sum(event_bus.end_offsets([stream.topics.responses, stream.topics.feedback]).values())

    buffer_path = tmp_path / "buffer.sqlite3"
    child = spawn_join_worker(event_bus.path, buffer_path, stream.topics.prefix, 4, 0.01)
    stdout = child.stdout
    assert stdout is not None

    def a_quarter_joined() -> bool:  # the worker prints its example count after each poll
        line = stdout.readline()
        assert line, f"the worker died: {child.stderr.read() if child.stderr else ''}"
        return int(line) >= n // 4

    wait_for(a_quarter_joined, what=f"the worker to join {n // 4} examples", timeout_s=60, interval_s=0)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)

    with EventJoiner(event_bus, stream.topics, ReplayBuffer(buffer_path)) as joiner:
        lag = joiner.lag()
        assert 0 < lag < end, "the kill should have landed mid-stream"
        buffer = joiner._buffer

        # The dead worker's partitions come free when its lease (1 s) runs out.
        def caught_up() -> bool:
            if joiner.lag() == 0:
                return True
            joiner.poll_once(timeout_s=0.1)
            return False

        wait_for(caught_up, what="the dead worker's partitions to come free", timeout_s=30, interval_s=0)
        labels = {e.response_id: e.desirable for e in buffer.unreferenced(10 * n)}
        counts = buffer.counts()
        buffer.close()
    assert labels == expected
    assert (counts["desirable"] + counts["undesirable"], counts["pending"]) == (n, 0)
    assert stream.dead_letters() == []
