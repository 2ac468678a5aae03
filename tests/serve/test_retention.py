"""Retention through the server: the admin API prunes and pins, a pruned version is a 404 naming
it wherever it is asked for, and the registry's disk use is a metric."""

from __future__ import annotations

from tests.serve.conftest import ADMIN
from tests.serve.test_admin import HELLO, publish


def _gauge(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_prune_pin_and_the_404_of_a_pruned_version(client, state, settings, make_adapter):
    settings.rollback_depth, settings.retention_grace_s = 1, 0.0
    v1, v2, v3, v4 = (publish(state, make_adapter(i)).version for i in range(1, 5))
    for version in (v1, v2, v3):
        assert client.post(f"/v1/adapters/{version}/activate", headers=ADMIN).status_code == 200
    assert _gauge(client, "kto_registry_versions_on_disk") == 4
    one_version = _gauge(client, "kto_registry_bytes") / 4

    assert client.put(f"/v1/adapters/{v1}/pin", json={"reason": "launch"}, headers=ADMIN).json()["pinned"]
    dry = client.post("/v1/adapters/prune", json={"dry_run": True}, headers=ADMIN).json()
    assert dry["dry_run"] and dry["pruned"] == [] and dry["on_disk"]["versions"] == 4
    assert dry["kept"] == {v1: "pinned", v2: "rollback", v3: "active", v4: "newest"}

    client.delete(f"/v1/adapters/{v1}/pin", headers=ADMIN)
    pruned = client.post("/v1/adapters/prune", json={"reason": "disk"}, headers=ADMIN).json()
    assert pruned["pruned"] == [v1] and pruned["freed_bytes"] > 0 and pruned["on_disk"]["versions"] == 3
    assert _gauge(client, "kto_registry_versions_on_disk") == 3
    assert abs(_gauge(client, "kto_registry_bytes") - 3 * one_version) < one_version / 2
    page = client.get(f"/v1/adapters/{v1}", headers=ADMIN).json()
    assert page["pruned_at"] is not None and page["lineage"] == {"events": ["e1", "e2"]}
    assert [h["action"] for h in page["history"]][-3:] == ["pin", "unpin", "prune"]

    # every way of asking for it names what happened
    for reply in (
        client.post("/v1/chat/completions", json={**HELLO, "model": v1}),
        client.post(f"/v1/adapters/{v1}/activate", headers=ADMIN),
        client.post("/v1/adapters/rollback", json={"to": v1}, headers=ADMIN),
        client.put(f"/v1/adapters/{v1}/pin", headers=ADMIN),
    ):
        assert reply.status_code == 404, reply.text
        error = reply.json()["error"]
        assert error["code"] == "version_pruned" and v1 in error["message"] and "pruned" in error["message"]
    assert client.post("/v1/chat/completions", json={**HELLO, "model": "v9999"}).json()["error"]["code"] == (
        "model_not_found"
    )
    assert state.registry.get(v1).status == "ready"  # not rejected: its files went on purpose
    assert client.post("/v1/adapters/rollback", headers=ADMIN).json()["active"] == v2


def test_prune_and_pin_need_an_admin(client, state, make_adapter):
    v1 = publish(state, make_adapter(1)).version
    assert client.post("/v1/adapters/prune").status_code == 401
    assert client.put(f"/v1/adapters/{v1}/pin").status_code == 401
    assert client.put("/v1/adapters/v9999/pin", headers=ADMIN).status_code == 404
