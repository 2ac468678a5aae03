"""Liveness, readiness and the metrics exposition."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serve.app import create_app
from serve.processes import ProcessStatus
from tests.serve.conftest import LOCAL


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


def test_processes_beside_the_server_are_reported_but_never_decide_readiness(settings):
    gone = ProcessStatus("learner", up=False, pid=None, restarts=3, last_exit=2, gave_up="a restart cannot fix it")
    with TestClient(create_app(settings, processes=lambda: [gone]), client=LOCAL) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200  # serving works without the learner
        assert ready.json()["checks"]["learner"] is False
        assert ready.json()["processes"]["learner"] == {
            "up": False,
            "pid": None,
            "restarts": 3,
            "last_exit": 2,
            "gave_up": "a restart cannot fix it",
        }
        samples = {
            (s.name, s.labels.get("process")): s.value
            for f in text_string_to_metric_families(client.get("/metrics").text)
            for s in f.samples
        }
        assert samples[("kto_process_up", "learner")] == 0 and samples[("kto_process_restarts_total", "learner")] == 3
