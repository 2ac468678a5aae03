"""Admin: the operator's rules (GET/PUT /v1/rules, /v1/rules/history)."""

from __future__ import annotations

from tests.serve.conftest import ADMIN

NO_REFUNDS = {"name": "no-refunds", "kind": "contains", "phrases": ["refund"], "label": "undesirable"}


def test_put_stores_the_whole_set_as_a_new_version(client, state) -> None:
    assert client.get("/v1/rules", headers=ADMIN).json() == {"version": None, "rules": []}
    reply = client.put("/v1/rules", json={"rules": [NO_REFUNDS]}, params={"reason": "guardrail"}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    stored = reply.json()
    assert (stored["version"], stored["actor"], stored["reason"]) == (1, "admin", "guardrail")
    (rule,) = stored["rules"]
    # What was asked, with every default that was in effect filled in.
    assert rule == {
        **NO_REFUNDS,
        "weight": 1.0,
        "sample_rate": 1.0,
        "scope": {},
        "case_sensitive": False,
        "whole_words": True,
    }
    assert client.get("/v1/rules", headers=ADMIN).json() == stored
    current = state.registry.rules()
    assert current is not None and current.version == 1  # where every labeler reads it

    second = client.put("/v1/rules", json={"rules": []}, headers=ADMIN).json()
    assert (second["version"], second["rules"]) == (2, [])
    history = client.get("/v1/rules/history", headers=ADMIN).json()["versions"]
    assert [(v["version"], len(v["rules"])) for v in history] == [(1, 1), (2, 0)]


def test_an_invalid_rule_is_a_422_naming_it_and_nothing_is_stored(client, state) -> None:
    bad = {**NO_REFUNDS, "kind": "regex", "phrases": None, "pattern": r"(a)\1"}
    for body, field in (
        ({"rules": [NO_REFUNDS, bad]}, "rules.1"),
        ({"rules": [{**NO_REFUNDS, "label": "maybe"}]}, "rules.0.label"),
        ({"rules": [NO_REFUNDS, NO_REFUNDS]}, "no-refunds"),
        ({"rulez": []}, "rulez"),
    ):
        reply = client.put("/v1/rules", json=body, headers=ADMIN)
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert field in (error["param"] or "") + error["message"], error
    assert state.registry.rules() is None


def test_rules_are_for_admins_only(client) -> None:
    assert client.get("/v1/rules").status_code == 401
    assert client.put("/v1/rules", json={"rules": []}, headers={"Authorization": "Bearer nope"}).status_code == 401
