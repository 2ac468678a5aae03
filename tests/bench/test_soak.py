"""The soak benchmark (bench.soak): its fits on hand-made samples, /proc and data-directory
reading on this very process and a directory built here, latency windows, and a short run of
the whole suite against `kto-loop up`."""

from __future__ import annotations

import json
import math
import os
import subprocess
from argparse import Namespace

import pytest

from bench import soak, soak_report
from bench import soak_sampler as sampler
from testkit.waiting import wait_for


def test_slope_is_the_least_squares_fit():
    assert sampler.slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert sampler.slope([0, 1, 2, 3], [0, 2, 0, 2]) == pytest.approx(0.4)  # noisy: the fit, not end - start
    assert math.isnan(sampler.slope([5, 5], [1, 2]))
    with pytest.raises(ValueError):
        sampler.slope([0, 1], [0])


def test_rss_slope_is_per_hour_and_leaves_out_the_warm_up():
    ts = [0, 10, 20, 30, 40, 50, 60]
    mib = [100, 400, 400.0 + 1 / 6, 400 + 2 / 6, 400 + 3 / 6, 400 + 4 / 6, 400 + 5 / 6]  # +1 MiB a minute after 10 s
    assert sampler.mib_per_hour(ts, mib, warmup_s=10) == pytest.approx(60.0)
    assert sampler.mib_per_hour(ts, mib, warmup_s=0) > 1000  # the start-up jump, had it been kept


def test_a_warm_up_that_leaves_under_three_samples_keeps_them_all():
    assert sampler.after_warmup([0, 1, 2, 3], 2.5) == [0, 1, 2, 3]
    assert sampler.after_warmup([0, 1, 2, 3, 4], 2) == [2, 3, 4]


def test_growth_per_1000_ratings_follows_the_ratings_not_the_clock():
    ratings = [0, 100, 150, 400, 800, 1000]  # an uneven pace
    sizes = [4096 + 500 * r for r in ratings]
    ts = [0, 1, 2, 3, 4, 5]
    assert sampler.per_1000_ratings(ratings, sizes, ts, warmup_s=0) == pytest.approx(500_000)
    pruned = [4096, 9000, 4096, 9000, 4096]  # a store that is pruned as it goes: teeth, no trend
    assert sampler.per_1000_ratings([0, 250, 500, 750, 1000], pruned, ts[:5], 0) == pytest.approx(0)


def test_rss_is_read_from_proc_for_this_process_and_none_for_a_gone_one():
    mib = sampler.rss_mib(os.getpid())
    assert mib is not None and 10 < mib < 64 * 1024
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in sampler.children(os.getpid())
        # between fork and exec the child is a copy of this process, then it becomes `sleep`
        wait_for(lambda: sampler.role(child.pid) == "other: sleep", what="the child to exec sleep", timeout_s=10)
        assert sampler.process_tree(os.getpid())[child.pid] == "other: sleep"
    finally:
        child.kill()
        child.wait()
    assert sampler.rss_mib(child.pid) is None


def test_a_scan_groups_files_by_store_and_counts_version_directories(tmp_path):
    files = {
        "bus.sqlite3": 100,
        "bus.sqlite3-wal": 50,
        "bus.sqlite3-shm": 7,
        "learner/state.pt": 30,
        "learner/state.tmp": 3,
        "registry/registry.sqlite3": 20,
        "registry/versions/v0001/adapter_model.safetensors": 1000,
        "registry/versions/v0001/adapter_config.json": 10,
        "registry/versions/v0002/adapter_model.safetensors": 1000,
        "registry/versions/.staging/tmp-1/adapter_model.safetensors": 400,
        "registry/versions/.publish.lock": 0,
    }
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    disk = sampler.scan(tmp_path)
    assert disk.stores == {
        "bus": 157,
        "learner/state": 33,
        "registry/registry": 20,
        "registry/versions": 2410,  # a half-written version in .staging takes disk too
    }
    assert disk.files["bus"] == {"bus.sqlite3", "bus.sqlite3-wal", "bus.sqlite3-shm"}
    assert disk.versions == {"v0001": 1010, "v0002": 1000}


def test_latency_is_reported_per_window_with_failures_counted_apart():
    requests = [
        soak.Request("chat", 1.0, 0.5, "ok"),
        soak.Request("feedback", 1.5, 0.01, "ok"),
        soak.Request("chat", 12.0, 2.0, "ok"),
        soak.Request("chat", 13.0, 0.1, "503"),
        soak.Request("feedback", 19.9, 0.02, "ok"),
    ]
    out = soak_report.latency(requests, duration=20.0, windows=2)
    assert out["run"]["chat"]["n"] == 2 and out["run"]["errors"] == 1
    first, second = out["windows"]
    assert (first["from_s"], first["to_s"]) == (0, 10)
    assert first["chat"]["p50_s"] == 0.5 and first["feedback"]["n"] == 1 and first["errors"] == 0
    assert second["chat"] == {"n": 1, "p50_s": 2.0, "p99_s": 2.0} and second["errors"] == 1


def test_a_short_soak_of_the_whole_loop_reports_every_field(tmp_path):
    options = Namespace(quick=True, minutes=20 / 60, model=None, model_id=None, results_dir=tmp_path)
    path = soak.run(options)
    assert path == tmp_path / "soak-cpu-quick.json" or path.name.startswith("soak-cuda")
    result = json.loads(path.read_text())["results"]
    assert result["ratings"] > 0 and result["chats"] >= result["ratings"]
    assert result["server_errors_5xx"] == 0, result["errors"]
    assert result["up_exited_early"] is None
    assert {"server", "learner", "labeler"} <= set(result["processes"])
    for row in result["processes"].values():
        assert {"pids", "start_mib", "end_mib", "max_mib", "slope_mib_per_hour"} <= set(row)
        assert row["start_mib"] > 0
    assert {"bus", "ledger", "registry/registry", "registry/versions", "learner/buffer"} <= set(result["stores"])
    for store in result["stores"].values():
        assert {"final_bytes", "max_bytes", "bytes_per_1000_ratings"} <= set(store)
    registry = result["registry"]
    assert {
        "versions_published",
        "versions_on_disk_at_end",
        "max_version_dirs",
        "one_version_bytes",
        "max_versions_bytes",
        "max_versions_worth",
        "rollback_depth",
    } <= set(registry)
    latency = result["latency"]
    assert latency["run"]["chat"]["n"] > 0 and latency["run"]["feedback"]["n"] > 0
    assert len(latency["windows"]) == soak.Plan.windows
    assert len(result["samples"]) >= 10
