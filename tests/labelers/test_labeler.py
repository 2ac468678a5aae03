"""The rule labeler: what it writes, and as a process on each bus (a SIGKILL mid-stream neither
loses nor doubles a label)."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from ingest.bus import open_bus
from ingest.events import FeedbackEvent, ResponseEvent, SamplingParams, Topics, decode_event, encode_event
from labelers.labeler import labels_for
from labelers.rules import RuleSet
from registry import open_registry
from testkit import processes
from testkit.waiting import wait_for

RULES = RuleSet.model_validate(
    {
        "rules": [
            {"name": "no-x", "kind": "contains", "phrases": ["x"], "label": "undesirable", "otherwise": "desirable"},
            {"name": "short", "kind": "max_chars", "chars": 6, "label": "undesirable", "weight": 0.5},
        ]
    }
)


def response(i: int, text: str, user: str | None = "u1") -> ResponseEvent:
    return ResponseEvent(
        response_id=f"resp-{i}",
        user=user,
        base_model="tiny",
        adapter_version=None,
        messages=[],
        prompt_token_ids=[1],
        completion=text,
        completion_token_ids=[2],
        finish_reason="stop",
        sampling=SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0),
    )


def test_each_rule_labels_an_answer_once_per_rule_set_version() -> None:
    labels = labels_for(RULES, 3, response(1, "an x too long"), now=5.0)
    assert [(e.source, e.label, e.user, e.response_id, e.weight) for e in labels] == [
        ("rule:no-x", "undesirable", "u1", "resp-1", 1.0),
        ("rule:short", "undesirable", "u1", "resp-1", 0.5),
    ]
    assert labels_for(RULES, 3, response(1, "an x too long"), now=9.0)[0].event_id == labels[0].event_id
    assert labels_for(RULES, 4, response(1, "an x too long"), now=5.0)[0].event_id != labels[0].event_id
    assert [(e.source, e.label) for e in labels_for(RULES, 3, response(2, "fine"), now=5.0)] == [
        ("rule:no-x", "desirable")
    ]
    assert labels_for(RULES, 3, response(3, "an x", user=None), now=5.0) == []  # anonymous: nobody's answer


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_a_killed_labeler_loses_and_doubles_no_label(backend: str, tmp_path: Path, request: Any) -> None:
    prefix = f"lab-{uuid.uuid4().hex[:8]}"
    bus_url = request.getfixturevalue("services").bus_url if backend == "kafka" else f"sqlite:///{tmp_path / 'bus.db'}"
    registry_url = f"sqlite:///{tmp_path / 'registry' / 'registry.sqlite3'}"
    topics = Topics(prefix)
    env = {
        "KTO_BUS_URL": bus_url,
        "KTO_REGISTRY_URL": registry_url,
        "KTO_TOPIC_PREFIX": prefix,
        "KTO_DATA_DIR": str(tmp_path),
        "KTO_RULES_POLL_S": "0.2",
        "KTO_LABELER_BATCH": "20",
    }
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "rules:\n  - {name: no-x, kind: contains, phrases: [x], label: undesirable, otherwise: desirable}\n"
    )
    env["KTO_RULES_PATH"] = str(rules_file)
    texts = {f"resp-{i}": ("say x" if i % 3 == 0 else "say y") for i in range(600)}
    bus = open_bus(bus_url)
    reader = bus.consumer(f"check-{uuid.uuid4().hex}", [topics.feedback])
    seen: dict[str, set[str]] = {}  # response_id → the event ids of its labels

    def labeled() -> int:
        while batch := reader.poll(timeout_s=0.2):
            for record in batch:
                event = decode_event(record.value)
                assert isinstance(event, FeedbackEvent) and event.source == "rule:no-x"
                assert event.label == ("undesirable" if "x" in texts[event.response_id] else "desirable")
                seen.setdefault(event.response_id, set()).add(event.event_id)
        return len(seen)

    def publish(ids: list[str]) -> None:
        for start in range(0, len(ids), 50):
            chunk = ids[start : start + 50]
            bus.publish_many(topics.responses, [(i, encode_event(response(int(i[5:]), texts[i]))) for i in chunk])

    ids = list(texts)
    publish(ids[:400])
    log = tmp_path / "labeler.log"
    with processes.log_on_failure(log):
        labeler = processes.start("label", env, log, log_level="info")
        try:
            wait_for(lambda: labeled() >= 50, what="the first labels", timeout_s=120)
            os.killpg(labeler.pid, signal.SIGKILL)  # mid-stream (20 answers a batch): some labeled, not committed
            labeler.wait()
            publish(ids[400:])
            labeler = processes.start("label", env, log, log_level="info")
            wait_for(lambda: labeled() == len(texts), what="every answer labeled", timeout_s=120)
        finally:
            processes.stop(labeler)
            reader.close()
            bus.close()
    doubled = {r: ids for r, ids in seen.items() if len(ids) != 1}
    assert not doubled  # a repeat carries the same event id, which the learner's join drops
    with open_registry(registry_url) as registry:
        stored = registry.rules()
        assert stored is not None and stored.version == 1 and stored.actor == "rules-file"  # once, not per start


def embedded_with_answers(tmp_path: Path, n: int) -> tuple[Any, Any, Any, Topics]:
    """Settings (10 answers a batch), the embedded bus holding `n` answers, and a registry with RULES."""
    from labelers.labeler import LabelerSettings

    settings = LabelerSettings(data_dir=tmp_path, labeler_batch=10, rules_poll_s=60)
    bus = open_bus(settings.bus_url)
    registry = open_registry(settings.registry_url)
    registry.put_rules(RULES.model_dump(mode="json", exclude_none=True), actor="test")
    topics = Topics(settings.topic_prefix)
    bus.publish_many(topics.responses, [(f"resp-{i}", encode_event(response(i, f"an x answer {i}"))) for i in range(n)])
    return settings, bus, registry, topics


class Crash(Exception):
    """The process dying between publishing a batch's labels and committing it."""


def test_a_batch_labeled_but_not_committed_is_labeled_again_with_the_same_ids(tmp_path: Path) -> None:
    from labelers.labeler import Labeler, LabelerMetrics

    settings, bus, registry, topics = embedded_with_answers(tmp_path, 25)

    class CrashingCommits:
        def consumer(self, group: str, names: list[str]) -> Any:
            inner = bus.consumer(group, names)

            def commit(*args: Any, **kwargs: Any) -> None:
                raise Crash

            inner.commit = commit
            return inner

        def __getattr__(self, name: str) -> Any:
            return getattr(bus, name)

    with pytest.raises(Crash):
        Labeler(settings, CrashingCommits(), registry, LabelerMetrics()).run(threading.Event())
    first = [decode_event(r.value) for r in bus.consumer("check-1", [topics.feedback]).poll(timeout_s=1.0)]
    assert len(first) == 10 * 2  # the first batch: two rules' labels on each of 10 answers, then the crash

    stop = threading.Event()
    again = threading.Thread(target=Labeler(settings, bus, registry, LabelerMetrics()).run, args=(stop,))
    again.start()
    reader = bus.consumer("check-2", [topics.feedback])
    events: list[Any] = []

    def read() -> bool:
        events.extend(decode_event(r.value) for r in reader.poll(timeout_s=0.2))
        return len(events) >= 60

    wait_for(read, what="every answer labeled")
    stop.set()
    again.join(timeout=30)
    assert len(events) == 10 * 2 + 25 * 2  # the uncommitted batch once more, then the rest
    ids = [e.event_id for e in events]
    assert ids[:20] == [e.event_id for e in first]  # the same ids: the learner's join drops the repeats
    assert len(set(ids)) == 50
    registry.close()
    bus.close()


def test_a_bad_rules_file_stops_the_labeler_at_start_naming_line_and_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: ok\n    kind: contains\n    phrases: [a]\n    label: desirable\n"
        "  - name: bad\n    kind: max_chars\n    label: undesirable\n"
    )
    env = {**os.environ, "KTO_DATA_DIR": str(tmp_path), "KTO_RULES_PATH": str(rules)}
    done = subprocess.run(
        [sys.executable, "-m", "kto_loop.cli", "label"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "rules.yaml: line 6: rules.1: Value error, a max_chars rule needs chars" in done.stderr


def test_a_bus_outage_delays_labels_and_loses_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.bus import BusUnavailable
    from labelers import labeler as labeler_module
    from labelers.labeler import Labeler, LabelerMetrics

    settings, bus, registry, topics = embedded_with_answers(tmp_path, 25)
    failures = [2]  # the first two publishes fail, as a broker that is away would

    class Flaky:
        def publish_many(self, topic: str, items: list) -> list:
            if failures[0]:
                failures[0] -= 1
                raise BusUnavailable("broker away")
            return bus.publish_many(topic, items)

        def __getattr__(self, name: str) -> Any:
            return getattr(bus, name)

    stop = threading.Event()
    monkeypatch.setattr(labeler_module, "BUS_RETRY_S", 0.05)
    thread = threading.Thread(target=Labeler(settings, Flaky(), registry, LabelerMetrics()).run, args=(stop,))
    thread.start()
    reader = bus.consumer("check", [topics.feedback])
    events: list[Any] = []

    def read() -> bool:
        events.extend(decode_event(r.value) for r in reader.poll(timeout_s=0.2))
        return len({(e.response_id, e.source) for e in events}) >= 50

    try:
        wait_for(read, what="every answer labeled after the outage")
    finally:
        stop.set()
        thread.join(timeout=30)
        reader.close()
        registry.close()
        bus.close()
    assert failures == [0] and len(events) == 50  # nothing lost, nothing twice: the failed batches were not committed
