"""The learner's settings: what KTO_* variables accept and refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from learner.settings import DEFAULT_SOURCE_WEIGHTS, LearnerSettings


def test_source_weights_from_the_environment_replace_defaults_key_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LearnerSettings().source_weights == DEFAULT_SOURCE_WEIGHTS
    monkeypatch.setenv("KTO_SOURCE_WEIGHTS", '{"rule": 0.5, "rule:no-refunds": 2, "annotator": 0}')
    settings = LearnerSettings()
    assert settings.source_weights == {**DEFAULT_SOURCE_WEIGHTS, "rule": 0.5, "rule:no-refunds": 2.0, "annotator": 0}
    # One source's own weight, else its kind's, else 1.
    assert settings.source_weight("rule:no-refunds") == 2.0
    assert settings.source_weight("rule:other") == 0.5
    assert settings.source_weight("human") == 1.0
    assert settings.source_weight("annotator") == 0.0
    assert settings.source_weight("implicit") == 0.5


def test_implicit_signals_weigh_less_than_a_thumb_by_default_and_each_can_be_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = LearnerSettings()
    assert defaults.source_weight("implicit:regenerate") == defaults.source_weight("implicit:copy") == 0.5
    assert defaults.source_weight("implicit:edit") == 0.3
    assert defaults.source_weight("implicit:share") == 0.5  # a signal it does not know: its kind's
    monkeypatch.setenv("KTO_SOURCE_WEIGHTS", '{"implicit": 0.2, "implicit:copy": 0.8}')
    settings = LearnerSettings()
    assert (settings.source_weight("implicit:copy"), settings.source_weight("implicit:share")) == (0.8, 0.2)


@pytest.mark.parametrize(
    ("weights", "named"),
    [
        ({"robot": 1.0}, "robot"),
        ({"rule:": 1.0}, "rule:"),
        ({"implicit:Copy": 1.0}, "implicit:Copy"),
        ({"judge": -1.0}, "judge"),
        ({"human": float("nan")}, "human"),
    ],
)
def test_a_bad_source_weight_is_refused_by_name(weights: dict[str, float], named: str) -> None:
    with pytest.raises(ValidationError, match=f"source_weights: {named!r}"):
        LearnerSettings(source_weights=weights)


@pytest.mark.parametrize("unset", ["", "none", "-1"])
def test_a_retention_limit_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, unset: str) -> None:
    defaults = LearnerSettings()
    assert (defaults.bus_retention_s, defaults.bus_retention_bytes) == (7 * 24 * 3600.0, 2**30)
    assert (defaults.buffer_max_examples, defaults.buffer_max_age_s) == (100_000, None)
    for name in ("KTO_BUS_RETENTION_S", "KTO_BUS_RETENTION_BYTES", "KTO_BUFFER_MAX_EXAMPLES"):
        monkeypatch.setenv(name, unset)
    settings = LearnerSettings()
    assert (settings.bus_retention_s, settings.bus_retention_bytes, settings.buffer_max_examples) == (None, None, None)


def test_a_retention_of_zero_is_refused_rather_than_deleting_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTO_BUS_RETENTION_S", "0")
    with pytest.raises(ValidationError, match="bus_retention_s"):
        LearnerSettings()
