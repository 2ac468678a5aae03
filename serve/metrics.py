"""The server's Prometheus metrics: base units, `_seconds` and `_total`, low-cardinality labels.

Each app gets its own CollectorRegistry so several servers can live in one test process.

Labelled counters start with their known label values at zero, and the feedback counter with
both labels of each version as it becomes active: a series that first appears at 1 has no
earlier sample, so `increase()`, the desirable rate per version and the alerts built on them
would miss that first event. A version's feedback series go once it has answered nobody for the
ledger's TTL (no rating of it can arrive any more), so the label set does not grow with every
version ever served; a version that answers again starts again at zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from foundation.disk import DiskCollector
from ingest.signals import SIGNALS
from ingest.spooled_bus import SpoolStatus
from registry.pruning import DiskUsage
from serve.agreement import Agreement, agreement
from serve.annotation_queue import AnnotationQueue
from serve.processes import ProcessCollector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)
FEEDBACK_LABELS = ("desirable", "undesirable")
RESPONSE_STATUSES = ("stop", "length", "cancelled", "unrecorded")
"""finish reasons, a client gone before the end, an answer whose event could not be recorded"""
SWAP_FAILURE_REASONS = ("verification", "load")
RATE_LIMIT_SCOPES = ("chat", "feedback", "admin", "auth_failures")
AUTH_FAILURE_REASONS = ("missing", "bad_admin_token", "bad_key", "bad_token", "bad_header", "forbidden")


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_seconds = Histogram(
            "kto_request_duration_seconds",
            "Chat completion duration, end to end.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "kto_time_to_first_token_seconds",
            "Time from request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "kto_inter_token_latency_seconds",
            "Mean time between tokens of one completion.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("kto_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("kto_generation_tokens_total", "Tokens generated.", registry=r)
        self.running = Gauge("kto_requests_running", "Sequences in the decoding batch.", registry=r)
        self.waiting = Gauge("kto_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.responses = Counter("kto_responses_total", "Chat completions by outcome.", ["status"], registry=r)
        self.feedback = Counter(
            "kto_feedback_total",
            "Ratings recorded, by label and the version that was rated.",
            ["label", "version"],
            registry=r,
        )
        self.implicit_signals = Counter(
            "kto_implicit_signals_total",
            "Implicit signals recorded (ingest.signals), by signal.",
            ["signal"],
            registry=r,
        )
        for signal in SIGNALS:
            self.implicit_signals.labels(signal=signal)
        self.annotations = Counter(
            "kto_annotations_total", "Annotators' labels recorded (not repeats), by label.", ["label"], registry=r
        )
        for label in FEEDBACK_LABELS:
            self.annotations.labels(label=label)
        self.active_version = Info("kto_active_version", "The adapter version serving new requests.", registry=r)
        self.swaps = Counter("kto_adapter_swaps_total", "Adapter versions made active here.", registry=r)
        self.swap_failures = Counter(
            "kto_adapter_swap_failures_total", "Versions refused at load, by reason.", ["reason"], registry=r
        )
        self.swap_seconds = Histogram(
            "kto_adapter_swap_duration_seconds",
            "Pointer change seen to new version serving.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "kto_adapter_load_duration_seconds",
            "Time to load one adapter's weights.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rollbacks = Counter(
            "kto_adapter_rollbacks_total", "Rollbacks requested through this replica's admin API.", registry=r
        )
        self.rate_limited = Counter(
            "kto_rate_limited_total",
            "Requests refused with 429, by scope and what was limited.",
            ["scope", "by"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "kto_rate_limit_errors_total", "Requests let through uncounted: the limits' storage failed.", registry=r
        )
        self.auth_failures = Counter(
            "kto_auth_failures_total", "Requests refused with 401 or 403, by reason.", ["reason"], registry=r
        )
        for scope in RATE_LIMIT_SCOPES:
            for by in ("user", "address"):
                self.rate_limited.labels(scope=scope, by=by)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason=reason)
        for stream in ("true", "false"):
            self.request_seconds.labels(stream=stream)
        for status in RESPONSE_STATUSES:
            self.responses.labels(status=status)
        for reason in SWAP_FAILURE_REASONS:
            self.swap_failures.labels(reason=reason)
        self._answered_at: dict[str, float] = {}  # version → when it last answered (monotonic s)
        # Read at each scrape: the free space where this server writes (its probe is set once the
        # state is built), and the processes `kto-loop up` runs beside it (none under `serve`).
        self.disk, self.processes = DiskCollector(), ProcessCollector()
        r.register(self.disk)
        r.register(self.processes)

    def set_active(self, version: str | None, base_model: str) -> None:
        self.active_version.info({"version": version or "base", "base_model": base_model})
        self.track_version(version)

    def track_version(self, version: str | None, now: float | None = None) -> None:
        """Note that `version` answers now; the first time, start its feedback series at zero, so
        that its first rating is counted by increase() (see the module docstring)."""
        name = version or "base"
        if name not in self._answered_at:
            for label in FEEDBACK_LABELS:
                self.feedback.labels(label=label, version=name)
        self._answered_at[name] = time.monotonic() if now is None else now

    def forget_idle_versions(self, idle_s: float, now: float | None = None) -> list[str]:
        """Drop the feedback series of versions that answered nobody for `idle_s` seconds."""
        now = time.monotonic() if now is None else now
        gone = [name for name, at in list(self._answered_at.items()) if now - at > idle_s]
        for name in gone:
            for label in FEEDBACK_LABELS:
                self.feedback.remove(label, name)
            del self._answered_at[name]
        return gone

    def watch_ledger(self, backlog: Callable[[], int]) -> None:
        """Export how many responses wait for an unreachable ledger (serve.ledger_backlog)."""
        Gauge(
            "kto_ledger_backlog",
            "Responses not yet recorded in the ledger (it is unreachable).",
            registry=self.registry,
        ).set_function(backlog)

    def watch_registry(self, usage: Callable[[], DiskUsage]) -> None:
        """Export what the registry's adapter files take on disk (a walk of its version
        directories at each scrape: retention keeps them few)."""
        self.registry.register(_RegistryDiskCollector(usage))

    def watch_annotations(self, queue: AnnotationQueue) -> None:
        """Export the annotation queue's depth and the annotators' agreement (serve.agreement)."""
        self.registry.register(_AnnotationCollector(queue))

    def watch_spool(self, status: Callable[[], SpoolStatus]) -> None:
        """Export the event spool's state (only servers that spool, i.e. on Kafka, have these)."""
        self.registry.register(_SpoolCollector(status))


class _RegistryDiskCollector(Collector):
    def __init__(self, usage: Callable[[], DiskUsage]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Metric]:
        try:
            usage = self.usage()
        except OSError:  # the shared adapter directory is away: no number beats a wrong one
            return
        yield GaugeMetricFamily("kto_registry_bytes", "Bytes of adapter files in the registry.", value=usage.bytes)
        yield GaugeMetricFamily(
            "kto_registry_versions_on_disk", "Adapter versions whose files are on disk.", value=usage.versions
        )


class _AnnotationCollector(Collector):
    """Reads the queue at a scrape; agreement at most once a minute (it reads every annotation)."""

    AGREEMENT_EVERY_S = 60.0

    def __init__(self, queue: AnnotationQueue) -> None:
        self.queue = queue
        self._agreement: tuple[float, Agreement, dict[str, Agreement]] | None = None

    def collect(self) -> Iterator[Metric]:
        try:
            waiting = self.queue.open_items()
            now = time.monotonic()
            if self._agreement is None or now - self._agreement[0] > self.AGREEMENT_EVERY_S:
                self._agreement = (now, *agreement(self.queue.annotations()))
        except Exception as exc:  # the queue's store is away: no number beats a wrong one
            logger.warning("annotation metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily("kto_annotation_queue_open", "Answers waiting for annotators.", value=waiting)
        _, overall, per = self._agreement
        alpha = GaugeMetricFamily(
            "kto_annotation_agreement",
            'Krippendorff\'s alpha of annotators on shared answers (overall: annotator="all"); absent until defined.',
            labels=["annotator"],
        )
        for who, measured in [("all", overall), *per.items()]:
            if measured.alpha is not None:
                alpha.add_metric([who], measured.alpha)
        yield alpha
        yield GaugeMetricFamily(
            "kto_annotation_overlap_items", "Answers with two or more annotations.", value=overall.items
        )


class _SpoolCollector(Collector):
    """Reads the spool's status at each scrape, so the numbers are never stale."""

    def __init__(self, status: Callable[[], SpoolStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield GaugeMetricFamily("kto_spool_depth", "Events in the local spool waiting for the bus.", value=s.depth)
        yield GaugeMetricFamily("kto_spool_max_events", "Most events the spool may hold.", value=s.max_events)
        yield GaugeMetricFamily(
            "kto_spool_oldest_age_seconds", "How long the oldest spooled event has waited.", value=s.oldest_age_s
        )
        yield CounterMetricFamily("kto_spool_sent", "Spooled events the bus acknowledged.", value=s.sent)
        yield CounterMetricFamily("kto_spool_rejected", "Events refused because the spool was full.", value=s.rejected)
        yield GaugeMetricFamily(
            "kto_bus_up", "1 if the last send to the bus or health check reached it.", value=1.0 if s.bus_up else 0.0
        )
