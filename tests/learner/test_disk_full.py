"""The learner on a full disk: it waits and tries again (one warning an episode, a metric), never
dies, and once space is freed it trains on every rating that arrived meanwhile."""

from __future__ import annotations

import logging
import threading

import pytest

from foundation.disk import DiskFull, DiskProbe
from learner.disk_wait import DiskWait
from learner.metrics import LearnerMetrics
from registry import open_registry
from testkit.waiting import wait_for
from tests.learner.conftest import quick_learner
from tests.learner.test_loop import WAIT_S, publish_ratings
from tests.tmpfs import MiB, fill, small_disk


def no_wait() -> threading.Event:
    stopped = threading.Event()
    stopped.set()  # a set stop event ends every wait at once
    return stopped


def test_errors_of_a_full_disk_are_waited_out_once_an_episode(tmp_path, caplog):
    metrics = LearnerMetrics()
    wait = DiskWait(DiskProbe([tmp_path], reserve_bytes=0), metrics, no_wait())
    caplog.set_level(logging.INFO, logger="learner.disk_wait")
    for _ in range(3):
        with wait:
            raise OSError(28, "No space left on device")
        assert wait.interrupted
    assert metrics.disk_full._value.get() == 3 and metrics.waiting_for_disk._value.get() == 1
    with wait:
        pass
    assert not wait.interrupted and metrics.waiting_for_disk._value.get() == 0
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]  # began, ended

    with pytest.raises(ValueError), wait:  # with room on the disk, other errors are not its business
        raise ValueError("a bug")


def test_under_the_reserve_a_turn_waits_before_writing_and_any_error_counts_as_the_disk(tmp_path):
    with small_disk(tmp_path / "disk", 8 * MiB) as disk:
        metrics = LearnerMetrics()
        wait = DiskWait(DiskProbe([disk], reserve_bytes=MiB), metrics, no_wait())
        ballast = fill(disk)
        with pytest.raises(DiskFull):
            wait.check()
        with wait:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # torch.save's way of saying it
        assert wait.interrupted
        ballast.unlink()
        wait.check()


def test_the_learner_waits_out_a_full_disk_and_trains_on_what_came_meanwhile(tmp_path, tiny_model_dir, tiny_model):
    from learner.loop import main

    with small_disk(tmp_path / "data", 64 * MiB) as disk:
        settings = quick_learner(
            disk,
            tiny_model_dir,
            bus_url=f"sqlite:///{tmp_path / 'bus.sqlite3'}",  # elsewhere: ratings go on arriving
            disk_reserve_mb=0,  # no reserve: the learner's own writes meet the full disk
            canary_share=0.0,
        )
        registry = open_registry(settings.registry_url)
        publish_ratings(settings, tiny_model.tokenizer, 40, seed=1)
        metrics, stop = LearnerMetrics(), threading.Event()
        thread = threading.Thread(target=main, args=(settings, stop, metrics), daemon=True)
        thread.start()
        try:
            wait_for(lambda: registry.list_versions(), what="a first version", timeout_s=WAIT_S)
            ballast = fill(disk)
            later = set(publish_ratings(settings, tiny_model.tokenizer, 40, seed=2))

            def waiting() -> bool:
                assert thread.is_alive(), "the learner died on a full disk"
                return metrics.waiting_for_disk._value.get() == 1

            wait_for(waiting, what="the learner to wait for space", timeout_s=WAIT_S)
            ballast.unlink()

            def trained_later() -> set[str]:
                assert thread.is_alive(), "the learner died on a full disk"
                return later & {i for v in registry.list_versions() for i in v.lineage["feedback_event_ids"]}

            wait_for(
                trained_later, what="a version trained on the ratings sent while the disk was full", timeout_s=WAIT_S
            )
            wait_for(lambda: metrics.waiting_for_disk._value.get() == 0, what="the episode to end", timeout_s=WAIT_S)
        finally:
            stop.set()
            thread.join(timeout=60)
            registry.close()
        assert not thread.is_alive() and metrics.disk_full._value.get() >= 1
