"""The operator's rule set in the registry (every backend): versions, the current one, history."""

from __future__ import annotations

import threading
from collections.abc import Callable

from registry import Registry

NO_REFUNDS = {"rules": [{"name": "no-refunds", "kind": "contains", "phrases": ["refund"], "label": "undesirable"}]}


def test_rule_sets_are_versioned_with_history(reg: Registry, open_reg: Callable[[], Registry]) -> None:
    assert reg.rules() is None and reg.rule_history() == []
    first = reg.put_rules(NO_REFUNDS, actor="ops", reason="guardrail")
    assert (first.version, first.actor, first.reason, first.rules) == (1, "ops", "guardrail", NO_REFUNDS)
    second = reg.put_rules({"rules": []}, actor="ops")
    other = open_reg()  # as another process sees it
    current = other.rules()
    assert current is not None and (current.version, current.rules) == (2, {"rules": []})
    assert [(v.version, v.rules) for v in other.rule_history()] == [(1, NO_REFUNDS), (2, {"rules": []})]
    assert other.rule_history()[1] == second
    assert first.to_json()["rules"] == NO_REFUNDS


def test_concurrent_puts_get_distinct_versions(reg: Registry, open_reg: Callable[[], Registry]) -> None:
    handles = [open_reg() for _ in range(4)]
    got: list[int] = []

    def put(handle: Registry, i: int) -> None:
        for j in range(5):
            got.append(handle.put_rules({"rules": [], "n": i * 10 + j}, actor=f"w{i}").version)

    threads = [threading.Thread(target=put, args=(h, i)) for i, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == list(range(1, 21))
    history = reg.rule_history()
    assert [v.version for v in history] == list(range(1, 21))
    assert {v.rules["n"] for v in history} == {i * 10 + j for i in range(4) for j in range(5)}
