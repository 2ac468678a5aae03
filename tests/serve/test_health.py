"""Liveness, readiness and the metrics exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"model": True, "adapters": True, "bus": True, "registry": True, "disk": True}
    assert "processes" not in ready.json()  # plain `serve` runs nothing beside it


def test_not_ready_when_the_bus_is_gone(client, state):
    state.bus.close()
    reply = client.get("/readyz")
    assert reply.status_code == 503 and reply.json()["checks"]["bus"] is False


def test_metrics_parse_and_count_requests(client):
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in (
        "kto_request_duration_seconds",
        "kto_time_to_first_token_seconds",
        "kto_generation_tokens",
        "kto_requests_running",
        "kto_active_version_info",
        "kto_adapter_swaps",
        "kto_feedback",
    ):
        assert name in families, name
    generated = [s.value for s in families["kto_generation_tokens"].samples if s.name == "kto_generation_tokens_total"]
    assert generated[0] >= 1
