"""The learner's retention pass (learner.retention): the embedded bus and the buffer bounded on a
schedule, what groups hold back in the metrics, a running canary's examples kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest.sqlite_bus import SqliteBus
from learner.buffer import ReplayBuffer
from learner.metrics import LearnerMetrics
from learner.retention import Retention
from learner.settings import LearnerSettings
from tests.learner.test_buffer_retention import kept, rate_many
from tests.learner.test_canary import rate
from tests.tiny import TINY_MODEL_ID


def settings(tmp_path: Path, **kw: Any) -> LearnerSettings:
    return LearnerSettings(data_dir=tmp_path, model_id=TINY_MODEL_ID, **kw)


def sample(metrics: LearnerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_bus_retention_reports_what_a_lagging_group_holds_back(
    tmp_path: Path, event_bus: SqliteBus, buffer: ReplayBuffer, registry: Any
) -> None:
    event_bus.publish_many("t.responses", [(None, b"x" * 100) for _ in range(5)])
    labeler = event_bus.consumer("labeler", ["t.responses"])
    labeler.commit({("t.responses", 0): 2})
    metrics = LearnerMetrics()
    retention = Retention(event_bus, buffer, registry, settings(tmp_path, bus_retention_bytes=1), metrics)
    retention.tick()
    held = "kto_learner_bus_retention_held_back_records"
    assert sample(metrics, held, topic="t.responses", group="labeler") == 3
    assert sample(metrics, "kto_learner_bus_retention_deleted_records_total", topic="t.responses") == 2
    # At most every KTO_RETENTION_EVERY_S: a tick right after does nothing.
    labeler.commit({("t.responses", 0): 5})
    retention.tick()
    assert sample(metrics, held, topic="t.responses", group="labeler") == 3
    retention.run_bus()  # as the next tick due would
    assert sample(metrics, held, topic="t.responses", group="labeler") is None  # no longer behind
    assert sample(metrics, "kto_learner_bus_retention_deleted_records_total", topic="t.responses") == 5
    labeler.close()


def test_buffer_retention_keeps_a_running_canarys_examples_and_counts_the_rest(
    tmp_path: Path, event_bus: SqliteBus, buffer: ReplayBuffer, stream: Any, registry: Any, publish: Any
) -> None:
    rate_many(buffer, stream, [f"old{i}" for i in range(6)])
    v1 = publish()
    registry.start_canary(v1, 0.5, actor="admin")
    rate(buffer, stream, v1, 4, 2)  # served after the canary started: its evidence
    evidence = buffer.rated_since([v1], since=registry.canary().since)
    metrics = LearnerMetrics()
    bound = {"buffer_max_examples": 2, "buffer_recent_share": 1.0}
    Retention(event_bus, buffer, registry, settings(tmp_path, **bound), metrics).tick()
    assert len(kept(buffer)) == 4 and not any(i.startswith("old") for i in kept(buffer))
    assert buffer.rated_since([v1], since=registry.canary().since) == evidence == {v1: (4, 2)}
    assert sample(metrics, "kto_learner_examples_dropped_total") == 6
