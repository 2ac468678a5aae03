"""The server's Prometheus metrics: base units, `_seconds` and `_total`, low-cardinality labels.

Each app gets its own CollectorRegistry so several servers can live in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_seconds = Histogram(
            "kto_request_duration_seconds", "Chat completion duration, end to end.", ["stream"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram(
            "kto_time_to_first_token_seconds", "Time from request to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_seconds = Histogram(
            "kto_inter_token_latency_seconds", "Mean time between tokens of one completion.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kto_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("kto_generation_tokens_total", "Tokens generated.", registry=r)
        self.running = Gauge("kto_requests_running", "Sequences in the decoding batch.", registry=r)
        self.waiting = Gauge("kto_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.responses = Counter(
            "kto_responses_total", "Chat completions by outcome.", ["status"], registry=r)
        self.feedback = Counter(
            "kto_feedback_total", "Ratings recorded, by label and the version that was rated.",
            ["label", "version"], registry=r)
        self.active_version = Info("kto_active_version", "The adapter version serving new requests.", registry=r)
        self.swaps = Counter("kto_adapter_swaps_total", "Adapter versions made active here.", registry=r)
        self.swap_failures = Counter(
            "kto_adapter_swap_failures_total", "Versions refused at load, by reason.", ["reason"], registry=r)
        self.swap_seconds = Histogram(
            "kto_adapter_swap_duration_seconds", "Pointer change seen to new version serving.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load_seconds = Histogram(
            "kto_adapter_load_duration_seconds", "Time to load one adapter's weights.",
            buckets=LATENCY_BUCKETS, registry=r)

    def set_active(self, version: str | None, base_model: str) -> None:
        self.active_version.info({"version": version or "base", "base_model": base_model})
