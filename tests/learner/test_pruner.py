"""The learner's pruning (learner.pruner): with the default policy, a canary's lineage never
leaves more than the rollback depth plus two versions' files on disk."""

from __future__ import annotations

import pytest

from learner.pruner import Pruner
from registry import open_registry
from registry.retention import DEFAULT_DEPTH, Policy
from tests import lora_adapters


@pytest.fixture(scope="module")
def make_adapter(tmp_path_factory):
    return lora_adapters.adapter_factory(tmp_path_factory)


def test_a_canary_lineage_keeps_at_most_depth_plus_two_versions(tmp_path, make_adapter):
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
    pruner, on_disk = Pruner(registry, Policy()), []
    adapter = make_adapter()
    try:
        for _promotion in range(DEFAULT_DEPTH + 3):
            head = registry.active()
            candidate = None
            for _update in range(4):  # the learner's updates while the canary runs: each advances it
                version = registry.publish(
                    adapter, base_model=lora_adapters.BASE_MODEL, parent=candidate or head, metrics={}, lineage={}
                ).version
                if candidate is None:
                    registry.start_canary(version, 0.1, actor="learner")
                else:
                    registry.advance_canary(candidate, version, actor="learner")
                candidate = version
                pruner.after_publish()
                on_disk.append(registry.disk_usage().versions)
            registry.promote_canary(candidate, actor="canary-controller")
            pruner.after_publish()
        assert max(on_disk) <= DEFAULT_DEPTH + 2
        pruned = sum(e.action == "prune" for e in registry.history())
        assert pruned == len(registry.list_versions()) - registry.disk_usage().versions
        for _ in range(DEFAULT_DEPTH):  # every rollback the depth promises still loads
            entry = registry.rollback(actor="op")
            assert entry.version is None or registry.get(entry.version).pruned_at is None
    finally:
        registry.close()
