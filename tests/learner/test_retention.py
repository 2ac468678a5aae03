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


def test_a_canary_lineage_keeps_at_most_depth_plus_two_versions_on_disk(
    tmp_path: Path, event_bus: SqliteBus, buffer: ReplayBuffer, registry: Any, publish: Any
) -> None:
    """With the default policy, the learner's publishes (each advancing its canary, then a
    promotion) never leave more than the rollback depth plus two versions' files, and every
    rollback the depth promises still lands on a loadable version."""
    metrics = LearnerMetrics()
    config = settings(tmp_path)
    retention, on_disk = Retention(event_bus, buffer, registry, config, metrics), []
    for _promotion in range(config.rollback_depth + 3):
        candidate = None
        for _update in range(4):
            version = publish(candidate or registry.active())
            if candidate is None:
                registry.start_canary(version, 0.1, actor="learner")
            else:
                registry.advance_canary(candidate, version, actor="learner")
            candidate = version
            retention.after_publish()
            on_disk.append(registry.disk_usage().versions)
        registry.promote_canary(candidate, actor="canary-controller")
        retention.after_publish()
    assert max(on_disk) <= config.rollback_depth + 2
    pruned = sum(e.action == "prune" for e in registry.history())
    assert pruned == len(registry.list_versions()) - registry.disk_usage().versions
    assert sample(metrics, "kto_learner_versions_pruned_total") == pruned
    for _ in range(config.rollback_depth):
        entry = registry.rollback(actor="op")
        assert entry.version is None or registry.get(entry.version).pruned_at is None
