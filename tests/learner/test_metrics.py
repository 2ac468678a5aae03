"""The learner's metrics and its HTTP endpoint: what an update records, and the exposition of a
real loop after an update, checked by `promtool check metrics`."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from learner.endpoint import MetricsEndpoint
from learner.metrics import LearnerMetrics
from testkit.ports import free_port
from testkit.waiting import wait_for
from tests.learner.conftest import quick_learner
from tests.learner.test_loop import WAIT_S, publish_ratings
from tests.prometheus import check_metrics

SUMMARY = {
    "steps": 4,
    "examples": 32,
    "tokens": 300,
    "seconds": 0.5,
    "loss": 0.45,
    "z0": 0.02,
    "reward_desirable": 0.3,
    "reward_undesirable": None,
}


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def exposition(metrics: LearnerMetrics) -> dict[tuple[str, tuple], float]:
    return values(generate_latest(metrics.registry).decode())


def test_before_any_update_loss_is_nan_and_known_labels_are_zero():
    got = exposition(LearnerMetrics())
    assert math.isnan(got[("kto_learner_loss", ())]) and math.isnan(got[("kto_learner_z0", ())])
    for outcome in ("published", "rejected"):
        assert got[("kto_learner_updates_total", (("outcome", outcome),))] == 0
    for reason in ("nonfinite", "kl", "accuracy"):
        assert got[("kto_learner_gate_failures_total", (("reason", reason),))] == 0
    assert got[("kto_learner_canary_decisions_total", (("decision", "rollback"),))] == 0


def test_a_published_update_records_steps_loss_rewards_and_freshness():
    metrics = LearnerMetrics()
    metrics.observe_update(
        SUMMARY,
        passed=True,
        reason_codes=[],
        seconds=2.0,
        fresh_labeled_at=[90.0, 95.0, 101.0],
        published_at=100.0,
        labels_by_source={"human": 20, "rule:no-refunds": 12},
    )
    got = exposition(metrics)
    assert got[("kto_learner_labels_trained_total", (("source", "human"),))] == 20
    assert got[("kto_learner_labels_trained_total", (("source", "rule:no-refunds"),))] == 12
    assert got[("kto_learner_updates_total", (("outcome", "published"),))] == 1
    assert got[("kto_learner_steps_total", ())] == 4
    assert got[("kto_learner_examples_trained_total", ())] == 32
    assert got[("kto_learner_loss", ())] == 0.45 and got[("kto_learner_z0", ())] == 0.02
    assert got[("kto_learner_reward", (("label", "desirable"),))] == 0.3
    assert ("kto_learner_reward", (("label", "undesirable"),)) not in got  # none in this update
    assert got[("kto_learner_feedback_to_publish_seconds_count", ())] == 3
    assert got[("kto_learner_feedback_to_publish_seconds_sum", ())] == 15.0  # 10 + 5 + 0 (a clock ahead)
    assert got[("kto_learner_update_duration_seconds_sum", ())] == 2.0
    assert got[("kto_learner_last_update_timestamp_seconds", ())] == 100.0


def test_a_rejected_update_counts_its_gate_failures_and_no_freshness():
    metrics = LearnerMetrics()
    metrics.observe_update(
        SUMMARY, passed=False, reason_codes=["kl", "accuracy"], seconds=1.0, fresh_labeled_at=[90.0], published_at=100.0
    )
    got = exposition(metrics)
    assert got[("kto_learner_updates_total", (("outcome", "rejected"),))] == 1
    assert got[("kto_learner_updates_total", (("outcome", "published"),))] == 0
    assert got[("kto_learner_gate_failures_total", (("reason", "kl"),))] == 1
    assert got[("kto_learner_gate_failures_total", (("reason", "accuracy"),))] == 1
    assert got[("kto_learner_gate_failures_total", (("reason", "nonfinite"),))] == 0
    assert got[("kto_learner_feedback_to_publish_seconds_count", ())] == 0


def test_buffer_sizes_are_read_at_each_scrape_and_a_failing_buffer_exports_nothing():
    counts = {"desirable": 3, "undesirable": 5, "pending": 1, "unreferenced": 2}
    metrics = LearnerMetrics()
    metrics.watch_buffer(lambda: dict(counts))
    assert exposition(metrics)[("kto_learner_buffer_examples", (("label", "undesirable"),))] == 5
    counts["undesirable"] = 6
    assert exposition(metrics)[("kto_learner_buffer_examples", (("label", "undesirable"),))] == 6

    def closed():
        raise RuntimeError("the replay buffer is closed")

    broken = LearnerMetrics()
    broken.watch_buffer(closed)
    got = exposition(broken)
    assert not any(name.startswith("kto_learner_buffer") for name, _ in got)
    assert ("kto_learner_steps_total", ()) in got  # the rest of the scrape still works


def test_lag_is_measured_at_most_every_few_seconds():
    metrics = LearnerMetrics(lag_every_s=3600)
    calls: list[int] = []

    def counted(value: int) -> Callable[[], int]:
        def lag() -> int:
            calls.append(1)
            return value

        return lag

    metrics.refresh_lag(counted(7))
    metrics.refresh_lag(counted(9))  # too soon: not called
    assert len(calls) == 1 and exposition(metrics)[("kto_learner_consumer_lag_records", ())] == 7


def test_a_failed_lag_measurement_keeps_the_last_value():
    metrics = LearnerMetrics(lag_every_s=0)
    metrics.refresh_lag(lambda: 7)
    metrics.refresh_lag(lambda: 1 // 0)
    assert exposition(metrics)[("kto_learner_consumer_lag_records", ())] == 7


def test_endpoint_serves_metrics_and_health_and_nothing_else():
    metrics = LearnerMetrics()
    alive = threading.Event()
    alive.set()
    with MetricsEndpoint(metrics.registry, "127.0.0.1", 0, alive=alive.is_set) as endpoint:
        url = f"http://127.0.0.1:{endpoint.port}"
        reply = httpx.get(f"{url}/metrics")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        assert "kto_learner_steps_total 0.0" in reply.text
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/nothing").status_code == 404
        alive.clear()
        assert httpx.get(f"{url}/healthz").status_code == 503
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


def test_a_running_learner_exposes_its_update_over_http(tmp_path, tiny_model_dir, tiny_model):
    from learner.loop import main

    settings = quick_learner(tmp_path, tiny_model_dir, metrics_port=free_port())
    url = f"http://127.0.0.1:{settings.metrics_port}"
    publish_ratings(settings, tiny_model.tokenizer, 40, seed=1)
    stop = threading.Event()
    thread = threading.Thread(target=main, args=(settings, stop), daemon=True)
    thread.start()

    def scrape() -> dict[tuple[str, tuple], float] | None:
        try:
            return values(httpx.get(f"{url}/metrics").text)
        except httpx.HTTPError:  # not listening yet
            return None

    def updated() -> dict[tuple[str, tuple], float] | None:
        got = scrape()
        return got if got and got[("kto_learner_updates_total", (("outcome", "published"),))] >= 1 else None

    try:
        got = wait_for(updated, what="a published update in the metrics", timeout_s=WAIT_S)
        assert got is not None  # wait_for returns only what is truthy
        assert got[("kto_learner_steps_total", ())] >= settings.steps_per_update
        assert math.isfinite(got[("kto_learner_loss", ())]) and got[("kto_learner_loss", ())] > 0
        assert math.isfinite(got[("kto_learner_z0", ())])
        assert got[("kto_learner_feedback_to_publish_seconds_count", ())] >= 1
        examples = sum(
            got[("kto_learner_buffer_examples", (("label", label),))] for label in ("desirable", "undesirable")
        )
        assert examples == 40

        def lag_is_zero() -> bool:
            now = scrape()
            assert now is not None  # listening since the update above
            return now[("kto_learner_consumer_lag_records", ())] == 0

        wait_for(lag_is_zero, what="the lag to reach 0", timeout_s=WAIT_S)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        check_metrics(httpx.get(f"{url}/metrics").text)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")
