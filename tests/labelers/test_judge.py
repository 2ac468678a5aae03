"""The judge: strict verdicts from a real server (a second `kto-loop serve` of a tiny judge model),
abstentions on replies it cannot parse, and a judge that is down costing labels, not the loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.bus import open_bus
from ingest.events import FeedbackEvent, Topics, decode_event, encode_event
from labelers.judge import Judge, parse_verdict
from labelers.labeler import Labeler, LabelerMetrics, LabelerSettings
from labelers.rules import RuleSet
from registry import open_registry
from testkit.ports import free_port
from testkit.processes import start, stop, wait_ready
from testkit.waiting import wait_for
from tests.labelers.judge_model import answer, build_judge_model

RULES = RuleSet.model_validate(
    {
        "rules": [
            {
                "name": "fine",
                "kind": "judge",
                "question": "is it fine",
                "label": "desirable",
                "otherwise": "undesirable",
            },
            {"name": "bad", "kind": "judge", "question": "is it bad", "label": "undesirable", "otherwise": "desirable"},
            {"name": "odd", "kind": "judge", "question": "is it odd", "label": "undesirable"},
            {"name": "long", "kind": "max_chars", "chars": 10, "label": "undesirable"},
        ]
    }
)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("yes", True),
        ("No", False),
        (" YES.\n", True),
        ("no!", False),
        ("yes, because", None),
        ("nope", None),
        ("", None),
        ("maybe", None),
        ("yes no", None),
    ],
)
def test_only_a_plain_yes_or_no_is_a_verdict(reply: str, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`kto-loop serve` of the tiny judge model; `stop()` takes it down (for the outage tests)."""
    root = tmp_path_factory.mktemp("judge")
    model = build_judge_model(root / "model")
    port = free_port()
    log = root / "serve.log"
    process = start("serve", {"KTO_MODEL": str(model), "KTO_DATA_DIR": str(root / "data"), "KTO_PORT": str(port)}, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, log)
    yield {"url": f"{url}/v1", "stop": lambda: stop(process)}
    stop(process)


def test_verdicts_from_a_live_judge_label_or_abstain_strictly(judge_server: dict[str, Any]) -> None:
    judge = Judge(judge_server["url"], timeout_s=30, retries=1)
    rules = [r for r in RULES.rules if r.kind == "judge"]
    try:
        asks = [
            (rule, answer(i, text)) for i, text in enumerate(["some answer", "zz qq", "hi there"]) for rule in rules
        ]
        verdicts = judge.verdicts(asks)
    finally:
        judge.close()
    outcomes = []
    for (rule, _), verdict in zip(asks, verdicts):
        assert verdict.outcome != "failed", verdict
        said = parse_verdict(verdict.reply or "")
        expected = None if said is None else (rule.label if said else rule.otherwise)
        assert (verdict.outcome, verdict.label) == (("label", expected) if expected else ("abstain", None)), verdict
        outcomes.append(verdict.outcome)
    assert "label" in outcomes and "abstain" in outcomes  # the tiny judge replies "hmm" to "is it odd"


def test_a_judge_that_is_down_costs_its_labels_not_the_rules(judge_server: dict[str, Any], tmp_path: Path) -> None:
    settings = LabelerSettings(data_dir=tmp_path, rules_poll_s=60)
    bus = open_bus(settings.bus_url)
    registry = open_registry(settings.registry_url)
    registry.put_rules(RULES.model_dump(mode="json", exclude_none=True), actor="test")
    topics = Topics(settings.topic_prefix)
    judge = Judge(judge_server["url"], timeout_s=30, retries=1, backoff_s=0.05)
    metrics = LabelerMetrics()
    stop_labeler = threading.Event()
    labeler = threading.Thread(target=Labeler(settings, bus, registry, metrics, judge).run, args=(stop_labeler,))
    reader = bus.consumer("check", [topics.feedback])
    seen: list[FeedbackEvent] = []

    def labeled(count: int) -> bool:
        seen.extend(e for r in reader.poll(timeout_s=0.2) if isinstance(e := decode_event(r.value), FeedbackEvent))
        return len({e.response_id for e in seen}) >= count

    def publish(first: int, n: int) -> None:
        items: list[tuple[str | None, bytes]] = [
            (f"resp-{i}", encode_event(answer(i, "a long answer here"))) for i in range(first, first + n)
        ]
        bus.publish_many(topics.responses, items)

    labeler.start()
    try:
        publish(0, 5)
        wait_for(lambda: labeled(5), what="labels while the judge is up", timeout_s=120)
        sources = {e.source for e in seen}
        assert "rule:long" in sources and any(s.startswith("judge:") for s in sources), sources
        judge_server["stop"]()
        before = len(seen)
        publish(5, 5)
        wait_for(lambda: labeled(10), what="labels while the judge is down", timeout_s=120)
    finally:
        stop_labeler.set()
        labeler.join(timeout=60)
        judge.close()
        reader.close()
        registry.close()
        bus.close()
    after = seen[before:]
    assert {e.source for e in after} == {"rule:long"} and len(after) == 5  # the rules go on; the judge's wait
    failed = metrics.verdicts.labels(source="judge:fine", outcome="failed")._value.get()
    assert failed == 5  # one per answer asked while it was down, counted


def test_chat_goes_on_when_the_judge_stops_mid_run(tmp_path: Path) -> None:
    """`kto-loop up` with a judge rule and KTO_JUDGE_URL: judge labels while the judge serves; once
    it is stopped, every chat is still answered and the rule labels go on."""
    from kto_loop.simulate import simulate

    root = tmp_path / "judge"
    judge_port, port = free_port(), free_port()
    judge_log, log = tmp_path / "judge.log", tmp_path / "up.log"
    judge_env = {
        "KTO_MODEL": str(build_judge_model(root / "model")),
        "KTO_DATA_DIR": str(root),
        "KTO_PORT": str(judge_port),
    }
    judge_process = start("serve", judge_env, judge_log)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - {name: fine, kind: judge, question: is it fine, label: desirable, otherwise: undesirable}\n"
        "  - {name: short, kind: min_chars, chars: 1000, label: undesirable}\n"
    )
    data_dir = tmp_path / "data"
    env = {
        "KTO_DATA_DIR": str(data_dir),
        "KTO_PORT": str(port),
        "KTO_RULES_PATH": str(rules),
        "KTO_JUDGE_URL": f"http://127.0.0.1:{judge_port}/v1",
        "KTO_JUDGE_TIMEOUT_S": "5",
        "KTO_JUDGE_RETRIES": "1",
        "KTO_MIN_NEW_LABELS": "1000000",  # the learner stays out of this test's way
        "KTO_MAX_WAIT_S": "1000000",
    }
    from foundation.models import ensure_demo_model

    ensure_demo_model(data_dir)
    process = start("up", env, log, log_level="info")
    url = f"http://127.0.0.1:{port}"
    bus = None
    try:
        wait_ready(judge_process, f"http://127.0.0.1:{judge_port}", judge_log)
        wait_ready(process, url, log, timeout_s=300)
        bus = open_bus(f"sqlite:///{data_dir / 'bus.sqlite3'}")
        reader = bus.consumer("check", [Topics("kto").feedback])
        labels: list[tuple[str, str]] = []  # (source, the response it labels)

        def labeled(source: str, count: int) -> bool:
            events = [decode_event(r.value) for r in reader.poll(timeout_s=0.2)]
            labels.extend((e.source, e.response_id) for e in events)  # type: ignore[union-attr]
            return sum(s == source for s, _ in labels) >= count

        first = simulate(url, ratings=20, users=4, rate=False)
        wait_for(lambda: labeled("judge:fine", 1), what="a judge label through `up`", timeout_s=120)
        wait_for(lambda: labeled("rule:short", 20), what="the first answers' rule labels", timeout_s=120)
        first_answers = {response for source, response in labels if source == "rule:short"}
        stop(judge_process)
        second = simulate(url, ratings=20, users=4, rate=False)
        wait_for(lambda: labeled("rule:short", 40), what="rule labels with the judge down", timeout_s=180)
        reader.close()
    finally:
        stop(process)
        stop(judge_process)
        if bus is not None:
            bus.close()
    assert not first.errors and not second.errors  # every chat answered, the judge up or down
    # Nothing judged while it was down: judge labels (some may land after the stop: they were asked
    # before it) are all of the first answers.
    assert {response for source, response in labels if source == "judge:fine"} <= first_answers
