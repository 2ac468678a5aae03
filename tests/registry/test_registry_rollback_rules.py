"""The rollback stack rules, as pure functions."""

from __future__ import annotations

import pytest

from registry.errors import NothingToRollBack
from registry.rollback import MAX_DEPTH, pop_for_rollback, push_on_activate, truncate_for_rollback_to


def never(_: str) -> bool:
    return False


def test_push_only_on_change():
    assert push_on_activate([], None, "v1") == [None]
    assert push_on_activate([None], "v1", "v1") == [None]
    assert push_on_activate([None], "v1", "v2") == [None, "v1"]


def test_pop_skips_active_and_rejected():
    assert pop_for_rollback([None, "v1", "v2"], "v3", never) == ("v2", [None, "v1"])
    assert pop_for_rollback([None, "v1", "v2"], "v3", lambda v: v == "v2") == ("v1", [None])
    assert pop_for_rollback([None, "v1", "v3"], "v3", never) == ("v1", [None])


def test_pop_floor_is_the_base():
    assert pop_for_rollback([], "v1", never) == (None, [])
    assert pop_for_rollback(["v1"], "v2", lambda v: True) == (None, [])
    with pytest.raises(NothingToRollBack):
        pop_for_rollback([], None, never)
    with pytest.raises(NothingToRollBack):
        pop_for_rollback([None], None, never)


def test_truncate_at_newest_entry():
    assert truncate_for_rollback_to([None, "v1", "v2", "v1", "v3"], "v1") == [None, "v1", "v2"]
    assert truncate_for_rollback_to([None, "v1"], None) == []
    assert truncate_for_rollback_to([None, "v1"], "v9") == [None, "v1"]


def test_depth_is_capped_and_the_base_stays_the_floor():
    stack: list[str | None] = []
    active = None
    for i in range(MAX_DEPTH + 5):
        stack = push_on_activate(stack, active, f"v{i}")
        active = f"v{i}"
    assert len(stack) == MAX_DEPTH and None not in stack
    while stack:
        active, stack = pop_for_rollback(stack, active, never)
    assert pop_for_rollback(stack, active, never) == (None, [])
