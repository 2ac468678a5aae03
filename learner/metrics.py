"""The learner's Prometheus metrics: base units, `_seconds` and `_total`, low-cardinality labels.

Every name starts with `kto_learner_` (the server's start with `kto_`). Each ``LearnerMetrics``
has its own CollectorRegistry, so several learners can live in one test process;
``learner.endpoint`` serves it over HTTP (`kto-loop learn --port`).

Labelled counters are created with every known label value at zero: a series that appears for
the first time at 1 has no earlier sample, so `increase()` and alerts built on it would miss that
first event.

What is read when:
- the loop records each update when it finishes (``observe_update``): steps, loss, z0, rewards,
  outcome, gate failures, and the time from each fresh rating to the version that contains it;
- consumer lag is measured by the loop between polls (the consumer is not thread-safe), at most
  every ``LAG_EVERY_S``, so it is stale by up to that much, or by one update while one runs;
- buffer sizes are read from the buffer at each scrape (it is thread-safe), never stale;
- bus and buffer retention's counts are recorded at each of its passes (``learner.retention``),
  so what groups hold back is stale by up to ``KTO_RETENTION_EVERY_S``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from foundation.disk import DiskCollector

logger = logging.getLogger(__name__)

LABELS = ("desirable", "undesirable")
UPDATE_OUTCOMES = ("published", "rejected")
"""published: passed the gate, a `ready` version; rejected: failed it, recorded as `rejected`."""
GATE_REASONS = ("nonfinite", "kl", "accuracy")
"""The codes of ``learner.gate.GateResult.codes``."""
CANARY_DECISIONS = ("promote", "rollback")
"""Decisions known in advance; others the canary makes appear when first made."""

LAG_EVERY_S = 5.0  # end offsets cost a broker round trip on Kafka: not at every poll
UPDATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FRESHNESS_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class LearnerMetrics:
    def __init__(self, *, lag_every_s: float = LAG_EVERY_S) -> None:
        """``lag_every_s``: least time between two measurements of the consumer lag (seconds)."""
        self.registry = r = CollectorRegistry()
        self.updates = Counter(
            "kto_learner_updates_total",
            "Updates finished, by outcome: published (passed the gate) or rejected.",
            ["outcome"],
            registry=r,
        )
        self.steps = Counter("kto_learner_steps_total", "KTO optimizer steps taken.", registry=r)
        self.examples_trained = Counter(
            "kto_learner_examples_trained_total",
            "Examples in the micro-batches of all steps (with repeats).",
            registry=r,
        )
        self.labels_trained = Counter(
            "kto_learner_labels_trained_total",
            "Labeled examples that updates trained on (each once per update), by the source of the label.",
            ["source"],
            registry=r,
        )
        self.loss = Gauge(
            "kto_learner_loss", "Mean KTO loss over the steps of the last update (NaN before one).", registry=r
        )
        self.z0 = Gauge(
            "kto_learner_z0", "Mean KL reference point z0 of the last update, in nats (NaN before one).", registry=r
        )
        self.reward = Gauge(
            "kto_learner_reward",
            "Mean implicit reward beta*(log pi - log pi_ref) of the last update, by label.",
            ["label"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "kto_learner_consumer_lag_records",
            "Records on the response and feedback topics not yet consumed.",
            registry=r,
        )
        self.feedback_to_publish = Histogram(
            "kto_learner_feedback_to_publish_seconds",
            "From a rating's created_at to the publication of the first version trained on it (gate passed).",
            buckets=FRESHNESS_BUCKETS,
            registry=r,
        )
        self.update_seconds = Histogram(
            "kto_learner_update_duration_seconds",
            "One update: evaluation, steps, gate and publication.",
            buckets=UPDATE_BUCKETS,
            registry=r,
        )
        self.last_update = Gauge(
            "kto_learner_last_update_timestamp_seconds",
            "Unix time the last update finished (0 before one).",
            registry=r,
        )
        self.gate_failures = Counter(
            "kto_learner_gate_failures_total",
            "Gate checks failed, by reason: nonfinite, kl, accuracy.",
            ["reason"],
            registry=r,
        )
        self.canary_decisions = Counter(
            "kto_learner_canary_decisions_total",
            "Canary decisions, by decision (promote, rollback, ...).",
            ["decision"],
            registry=r,
        )
        self.bus_retention_deleted = Counter(
            "kto_learner_bus_retention_deleted_records_total",
            "Records the embedded bus's retention deleted, by topic.",
            ["topic"],
            registry=r,
        )
        self.bus_retention_held_back = Gauge(
            "kto_learner_bus_retention_held_back_records",
            "Records past the embedded bus's retention kept because a consumer group has not committed"
            " past them, by topic and group (at the last pass).",
            ["topic", "group"],
            registry=r,
        )
        self.buffer_dropped = Counter(
            "kto_learner_examples_dropped_total",
            "Examples the replay buffer's bound dropped (not erasures).",
            registry=r,
        )
        self.versions_pruned = Counter(
            "kto_learner_versions_pruned_total",
            "Adapter versions whose files the learner's retention deleted (registry.retention).",
            registry=r,
        )
        self.disk_full = Counter(
            "kto_learner_disk_full_total", "Turns of the loop cut short by a full disk (learner.disk_wait).", registry=r
        )
        self.waiting_for_disk = Gauge(
            "kto_learner_waiting_for_disk", "1 while the learner waits for disk space, else 0.", registry=r
        )
        self.disk = DiskCollector()  # its probe is set by the loop
        r.register(self.disk)
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome=outcome)
        for reason in GATE_REASONS:
            self.gate_failures.labels(reason=reason)
        for decision in CANARY_DECISIONS:
            self.canary_decisions.labels(decision=decision)
        self.loss.set(math.nan)
        self.z0.set(math.nan)
        self._lag_every_s = lag_every_s
        self._lag_at = -math.inf

    def watch_buffer(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export the replay buffer's sizes, read at each scrape (``ReplayBuffer.counts``)."""
        self.registry.register(_BufferCollector(counts))

    def observe_bus_retention(self, deleted: dict[str, int], held_back: dict[tuple[str, str], int]) -> None:
        """Record one pass of bus retention: records ``deleted`` per topic (every topic, 0 included,
        so each series starts at 0) and records ``held_back`` per (topic, group)."""
        for topic, count in deleted.items():
            self.bus_retention_deleted.labels(topic=topic).inc(count)
        self.bus_retention_held_back.clear()  # a group no longer behind leaves, rather than stay at its last value
        for (topic, group), count in held_back.items():
            self.bus_retention_held_back.labels(topic=topic, group=group).set(count)

    def refresh_lag(self, lag: Callable[[], int]) -> None:
        """Set the consumer lag from ``lag()`` (``EventJoiner.lag``), at most every ``lag_every_s``.

        Call it from the thread that owns the consumer. A failure (the bus away) keeps the last
        value: the poll itself will fail loudly if the bus is really gone."""
        now = time.monotonic()
        if now - self._lag_at < self._lag_every_s:
            return
        self._lag_at = now
        try:
            self.consumer_lag.set(lag())
        except Exception as exc:
            logger.warning("could not measure the consumer lag: %s", exc)

    def observe_update(
        self,
        summary: dict,
        *,
        passed: bool,
        reason_codes: Iterable[str],
        seconds: float,
        fresh_labeled_at: Iterable[float],
        published_at: float,
        labels_by_source: dict[str, int] | None = None,
    ) -> None:
        """Record one finished update.

        ``summary``: ``UpdateStats.summary()``; ``seconds``: the update's wall time;
        ``fresh_labeled_at``: created_at (unix seconds) of the fresh ratings it trained on, counted
        only when it ``passed`` (a rejected version reaches no one); ``published_at``: unix seconds;
        ``labels_by_source``: the examples it trained on, by the source of their label.
        """
        for source, count in (labels_by_source or {}).items():
            self.labels_trained.labels(source=source).inc(count)
        self.updates.labels(outcome="published" if passed else "rejected").inc()
        for code in reason_codes:
            self.gate_failures.labels(reason=code).inc()
        self.steps.inc(summary["steps"])
        self.examples_trained.inc(summary["examples"])
        for gauge, value in ((self.loss, summary["loss"]), (self.z0, summary["z0"])):
            gauge.set(math.nan if value is None else value)
        for label in LABELS:
            if summary[f"reward_{label}"] is not None:  # no example of that label in this update
                self.reward.labels(label=label).set(summary[f"reward_{label}"])
        self.update_seconds.observe(seconds)
        self.last_update.set(published_at)
        if passed:
            for labeled_at in fresh_labeled_at:
                # A server's clock ahead of ours must not make a negative observation.
                self.feedback_to_publish.observe(max(0.0, published_at - labeled_at))


class _BufferCollector(Collector):
    """Reads the buffer at each scrape; a buffer that cannot answer (closing) exports nothing."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.counts()
        except Exception as exc:
            logger.warning("could not read the replay buffer for metrics: %s", exc)
            return
        examples = GaugeMetricFamily(
            "kto_learner_buffer_examples", "Labelled examples in the replay buffer, by label.", labels=["label"]
        )
        for label in LABELS:
            examples.add_metric([label], counts[label])
        yield examples
        yield GaugeMetricFamily(
            "kto_learner_buffer_pending_ratings",
            "Ratings waiting in the buffer for the response they rate.",
            value=counts["pending"],
        )
        yield GaugeMetricFamily(
            "kto_learner_buffer_unreferenced_examples",
            "Examples waiting for their reference log-probs.",
            value=counts["unreferenced"],
        )

    def describe(self) -> Iterator[Metric]:
        # Names known without reading the buffer (register() would otherwise call collect()).
        yield GaugeMetricFamily("kto_learner_buffer_examples", "", labels=["label"])
        yield GaugeMetricFamily("kto_learner_buffer_pending_ratings", "")
        yield GaugeMetricFamily("kto_learner_buffer_unreferenced_examples", "")
