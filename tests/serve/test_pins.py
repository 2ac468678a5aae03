"""serve.pins: a version is unloaded only when hot-swap no longer keeps it and no request holds it."""

from __future__ import annotations

import pytest

from serve.pins import VersionPins


def loaded(*versions: str) -> VersionPins:
    pins = VersionPins()
    for version in versions:
        pins.add(version)
    return pins


def test_a_request_cannot_pin_a_version_that_is_not_loaded():
    pins = loaded("v1")
    with pytest.raises(KeyError):
        pins.pin("v2")
    pins.pin(None)  # the base model is always there
    pins.pin("v1")


def test_a_held_version_outlives_retain_until_its_last_request_ends():
    pins = loaded("v1", "v2")
    unloaded: list[str] = []
    pins.pin("v1")
    pins.pin("v1")
    pins.keep({"v2"})
    assert pins.collect(unloaded.append) == [] and pins.loaded == {"v1", "v2"}
    pins.release("v1")
    assert pins.collect(unloaded.append) == []
    pins.release("v1")
    assert pins.collect(unloaded.append) == ["v1"] == unloaded
    assert pins.loaded == {"v2"}
    with pytest.raises(KeyError):
        pins.pin("v1")


def test_kept_versions_stay_and_a_new_load_is_kept_until_the_next_retain():
    pins = loaded("v1", "v2", "v3")
    pins.keep({"v2"})
    pins.add("v4")
    assert sorted(pins.collect(lambda v: None)) == ["v1", "v3"] and pins.loaded == {"v2", "v4"}


def test_keep_one_never_unloads_the_last_version():
    pins = loaded("v1")
    pins.keep(set())
    assert pins.collect(lambda v: None, keep_one=True) == [] and pins.loaded == {"v1"}
    assert pins.collect(lambda v: None) == ["v1"]
