"""The server's /metrics: every metric the operators' issue lists, with its type, and an exposition
that `promtool check metrics` accepts after real traffic."""

from __future__ import annotations

import json
import time

from prometheus_client.parser import text_string_to_metric_families

from ingest.spooled_bus import SpoolStatus
from tests.prometheus import check_metrics
from tests.serve.conftest import ADMIN
from tests.tiny import TINY_MODEL_ID

ALICE = {"X-User-Id": "alice"}
HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# name (as the parser reports the family) -> type: the list, in its order.
EXPECTED = {
    "kto_request_duration_seconds": "histogram",
    "kto_time_to_first_token_seconds": "histogram",
    "kto_inter_token_latency_seconds": "histogram",
    "kto_prompt_tokens": "counter",
    "kto_generation_tokens": "counter",
    "kto_requests_running": "gauge",
    "kto_requests_waiting": "gauge",
    "kto_responses": "counter",
    "kto_feedback": "counter",
    "kto_active_version_info": "gauge",  # an Info metric: a gauge of 1 in the text format
    "kto_adapter_swaps": "counter",
    "kto_adapter_swap_duration_seconds": "histogram",
    "kto_adapter_swap_failures": "counter",
    "kto_adapter_rollbacks": "counter",
    "kto_spool_depth": "gauge",
}


def traffic(client) -> None:
    """A plain answer rated up, a streamed one rated down, and a changed vote."""
    plain = client.post("/v1/chat/completions", json=HELLO, headers=ALICE).json()["id"]
    with client.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}, headers=ALICE) as reply:
        chunks = [line for line in reply.iter_lines() if line.startswith("data: {")]
    streamed = json.loads(chunks[0].removeprefix("data: "))["id"]
    for rid, label in ((plain, "up"), (streamed, "down"), (plain, "down")):
        assert client.post("/v1/feedback", json={"response_id": rid, "label": label}, headers=ALICE).status_code == 202


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_every_listed_metric_is_exported_with_its_type(client, state):
    traffic(client)
    # The spool's metrics exist on a server that spools (Kafka); this one is on the embedded bus.
    state.metrics.watch_spool(lambda: SpoolStatus(3, 100, 1.5, 10, 0, True, None))
    text = client.get("/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert families.get(name) == kind, f"{name}: {families.get(name)}, expected {kind}"
    values = samples(text)
    assert values[("kto_feedback_total", (("label", "desirable"), ("version", "base")))] == 1
    assert values[("kto_feedback_total", (("label", "undesirable"), ("version", "base")))] == 2
    assert values[("kto_request_duration_seconds_count", (("stream", "true"),))] == 1
    assert values[("kto_request_duration_seconds_count", (("stream", "false"),))] == 1
    # Both answers finished: at max_tokens, or (a random tiny model may say so early) at its EOS.
    assert sum(values[("kto_responses_total", (("status", status),))] for status in ("length", "stop")) == 2
    assert values[("kto_active_version_info", (("base_model", state.settings.base_model_id), ("version", "base")))] == 1
    assert values[("kto_spool_depth", ())] == 3


def test_the_exposition_passes_promtool(client, state):
    traffic(client)
    state.metrics.watch_spool(lambda: SpoolStatus(3, 100, 1.5, 10, 0, False, "broker away"))
    check_metrics(client.get("/metrics").text)


def test_known_label_values_start_at_zero(client):
    """So that increase() sees a version's first rating and a replica's first refused adapter."""
    values = samples(client.get("/metrics").text)
    for label in ("desirable", "undesirable"):
        assert values[("kto_feedback_total", (("label", label), ("version", "base")))] == 0
    for reason in ("verification", "load"):
        assert values[("kto_adapter_swap_failures_total", (("reason", reason),))] == 0


def test_activating_a_version_starts_its_feedback_series(client, state, make_adapter):
    version = state.registry.publish(
        make_adapter(1), base_model=TINY_MODEL_ID, parent=None, metrics={}, lineage={}
    ).version
    assert client.post(f"/v1/adapters/{version}/activate", headers=ADMIN).status_code == 200
    values = samples(client.get("/metrics").text)
    assert values[("kto_feedback_total", (("label", "desirable"), ("version", version)))] == 0
    assert values[("kto_adapter_swaps_total", ())] == 1
    assert client.post("/v1/adapters/rollback", headers=ADMIN).status_code == 200
    assert samples(client.get("/metrics").text)[("kto_adapter_rollbacks_total", ())] == 1


def test_a_version_idle_past_the_ledger_ttl_loses_its_feedback_series(client, state, monkeypatch):
    """No rating of it can arrive any more, so its series would only grow the label set."""
    traffic(client)  # base answers and is rated
    feedback = lambda: {k: v for k, v in samples(client.get("/metrics").text).items() if k[0] == "kto_feedback_total"}
    assert feedback()[("kto_feedback_total", (("label", "undesirable"), ("version", "base")))] == 2
    metrics = state.metrics
    metrics.track_version("v0007", now=time.monotonic() - 7200)  # a version that last answered 2 h ago
    assert ("kto_feedback_total", (("label", "desirable"), ("version", "v0007"))) in feedback()
    monkeypatch.setattr(state.settings, "ledger_ttl_s", 3600.0)
    assert all(version != "v0007" for (_, labels) in feedback() for name, version in labels if name == "version")
    assert feedback()[("kto_feedback_total", (("label", "undesirable"), ("version", "base")))] == 2  # answered now
    metrics.track_version("v0007")  # answers again: back at zero
    assert feedback()[("kto_feedback_total", (("label", "desirable"), ("version", "v0007")))] == 0
