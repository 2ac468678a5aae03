"""The learner's loop on real embedded backends: publish with lineage, follow the active version,
survive a SIGKILL mid-update without losing or double-counting a rating."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid

import pytest

from foundation.models import render_prompt
from ingest.bus import open_bus
from ingest.events import FeedbackEvent, ResponseEvent, SamplingParams, Topics, encode_event
from learner.buffer import ReplayBuffer
from learner.settings import LearnerSettings
from registry import BASE, open_registry
from testkit import processes
from testkit.waiting import wait_for
from tests.learner.conftest import quick_learner
from tests.tiny import TINY_MODEL_ID

WAIT_S = 120.0
"""Seconds a wait for the learner allows (an update on a loaded 2-core box)."""


def publish_ratings(settings: LearnerSettings, tokenizer, n: int, seed: int, implicit: bool = False) -> list[str]:
    """n answered-and-rated chats, as the server would log them; returns the feedback event ids.
    ``implicit``: rated by signals instead of thumbs (copy the good ones, regenerate the others)."""
    rng = random.Random(seed)
    topics = Topics(settings.topic_prefix)
    bus = open_bus(settings.bus_url)
    bus.create_topics(topics.all)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "hello"}])
    ids = []
    for _ in range(n):
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        completion = [rng.randrange(10, len(tokenizer)) for _ in range(rng.randint(1, 6))]
        response = ResponseEvent(
            response_id=rid,
            user="u",
            base_model=TINY_MODEL_ID,
            adapter_version=None,
            messages=[{"role": "user", "content": "hello"}],
            prompt_token_ids=prompt,
            completion="",
            completion_token_ids=completion,
            finish_reason="length",
            sampling=SamplingParams(max_tokens=6, temperature=1.0, top_p=1.0),
        )
        label = "desirable" if completion[0] % 2 == 0 else "undesirable"
        feedback = FeedbackEvent(response_id=rid, user="u", label=label)
        if implicit:
            signal = "copy" if label == "desirable" else "regenerate"
            feedback = FeedbackEvent(response_id=rid, user="u", label=label, source="implicit", signal=signal)
        bus.publish(topics.responses, rid, encode_event(response))
        bus.publish(topics.feedback, rid, encode_event(feedback))
        ids.append(feedback.event_id)
    bus.close()
    return ids


@pytest.fixture
def learner_settings(tmp_path, tiny_model_dir) -> LearnerSettings:
    return quick_learner(tmp_path, tiny_model_dir, canary_share=0.0)  # live at once (canaries: test_canary.py)


def test_publishes_with_lineage_and_builds_on_the_active_version(learner_settings, tiny_model):
    from learner.loop import main

    registry = open_registry(learner_settings.registry_url)
    trained_ids = publish_ratings(learner_settings, tiny_model.tokenizer, 40, seed=1)
    stop = threading.Event()
    thread = threading.Thread(target=main, args=(learner_settings, stop), daemon=True)
    thread.start()
    try:
        first = wait_for(lambda: registry.list_versions(), what="a first version", timeout_s=WAIT_S)[0]
        assert first.parent is None and first.status == "ready" and first.base_model == TINY_MODEL_ID
        lineage = first.lineage
        assert set(lineage["feedback_event_ids"]) <= set(trained_ids) and lineage["feedback_event_ids"]
        assert lineage["labels"]["desirable"] + lineage["labels"]["undesirable"] == len(lineage["feedback_event_ids"])
        assert lineage["hyperparameters"]["beta"] == learner_settings.beta
        assert lineage["labels_by_source"] == {"human": len(lineage["feedback_event_ids"])}
        assert first.metrics["steps"] >= 4 and first.metrics["gate"]["passed"] is True
        assert len(lineage["feedback_event_ids"]) == lineage["fresh_examples"]  # every fresh label trained
        wait_for(lambda: registry.active() == first.version, what="auto activation", timeout_s=WAIT_S)

        # the operator rolls back to the base: the next version must start from the base again
        registry.rollback(to=BASE, actor="operator", reason="test")
        publish_ratings(learner_settings, tiny_model.tokenizer, 20, seed=2, implicit=True)
        later = wait_for(
            lambda: [
                v
                for v in registry.list_versions()
                if v.created_at > first.created_at and v.lineage["parent"] is None and v.status == "ready"
            ],
            what="a version on the base",
            timeout_s=WAIT_S,
        )
        assert later[0].parent is None
        # The new labels were signals: a version's lineage counts them by signal (as the metric does).
        signals = {"implicit:copy", "implicit:regenerate"}
        trained = wait_for(
            lambda: [v for v in registry.list_versions() if signals & set(v.lineage["labels_by_source"])],
            what="a version trained on the signals",
            timeout_s=WAIT_S,
        )
        assert set(trained[0].lineage["labels_by_source"]) <= {"human", *signals}
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_a_first_version_with_no_held_out_labels_still_has_its_kl_checked(learner_settings, tiny_model):
    """Before any label is held out the gate measures KL on the fresh labels: a first version
    that drifted too far must not become the head every later version inherits."""
    from learner.loop import main

    settings = LearnerSettings(**{**learner_settings.model_dump(), "held_out_fraction": 0.0, "max_kl": 1e-6})
    registry = open_registry(settings.registry_url)
    publish_ratings(settings, tiny_model.tokenizer, 20, seed=4)
    stop = threading.Event()
    thread = threading.Thread(target=main, args=(settings, stop), daemon=True)
    thread.start()
    try:
        first = wait_for(lambda: registry.list_versions(), what="a first version", timeout_s=WAIT_S)[0]
    finally:
        stop.set()
        thread.join(timeout=60)
    gate = first.metrics["gate"]
    assert gate["candidate"]["n"] == 0 and gate["candidate"]["kl_per_token"] > 1e-6
    assert not gate["passed"] and gate["codes"] == ["kl"] and first.status == "rejected"
    assert registry.active() is None


def test_sigkill_mid_update_loses_nothing_and_counts_nothing_twice(learner_settings, tiny_model):
    n = 48
    publish_ratings(learner_settings, tiny_model.tokenizer, n, seed=3)
    env = {
        "KTO_DATA_DIR": str(learner_settings.data_dir),
        "KTO_MODEL": learner_settings.model,
        "KTO_MODEL_ID": TINY_MODEL_ID,
        "KTO_MIN_NEW_LABELS": str(n - 8),
        "KTO_MICRO_BATCH": "8",
        "KTO_STEPS_PER_UPDATE": "100000",
        "KTO_POLL_TIMEOUT_S": "0.1",
    }
    log = learner_settings.data_dir / "learn.log"
    learner = processes.start("learn", env, log, log_level="info")
    try:

        def updating() -> bool:  # "update starting" is logged as the first optimizer step begins
            processes.assert_running(learner)
            return "update starting" in log.read_text()

        with processes.log_on_failure(log):
            wait_for(updating, what="the learner's first update", timeout_s=WAIT_S)
        time.sleep(1.0)  # deliberate, no condition: well inside an update of 100000 steps, where the kill lands
        assert learner.poll() is None
        learner.send_signal(signal.SIGKILL)
        learner.wait(timeout=30)
    finally:
        processes.stop(learner)
    registry = open_registry(learner_settings.registry_url)
    assert registry.list_versions() == []  # nothing half-written is visible

    restarted = LearnerSettings(**{**learner_settings.model_dump(), "min_new_labels": n - 8})
    from learner.loop import main

    stop = threading.Event()
    thread = threading.Thread(target=main, args=(restarted, stop), daemon=True)
    thread.start()
    try:
        version = wait_for(lambda: registry.list_versions(), what="the version after restart", timeout_s=WAIT_S)[0]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert version.parent is None  # resumed from the active version (the base)
    registry.verify_files(version.version)
    buffer = ReplayBuffer(learner_settings.data_dir / "learner" / "buffer.sqlite3")
    counts = buffer.counts()
    buffer.close()
    assert counts["desirable"] + counts["undesirable"] == n  # every rating once, none twice
