"""Custom labelers found through the `kto_loop.labelers` entry point group of an installed package
(a real distribution on sys.path, as pip would leave it), and the labeler running them."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ingest.bus import open_bus
from ingest.events import FeedbackEvent, Topics, decode_event, encode_event
from labelers.labeler import Labeler, LabelerMetrics, LabelerSettings
from labelers.plugins import PluginError, load_plugins
from registry import open_registry
from testkit.waiting import wait_for
from tests.labelers.judge_model import answer

PLUGIN = '''
class Shouting:
    """Answers in capitals are undesirable; it cannot judge an answer saying "boom"."""

    def label(self, response):
        if "boom" in response.completion:
            raise RuntimeError("cannot judge this one")
        return "undesirable" if response.completion.isupper() else None
'''


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution `shouty-plugin 1.2` with the entry point `shouting`, importable from sys.path."""
    site = tmp_path / "site"
    (site / "shouty_plugin.py").parent.mkdir(parents=True)
    (site / "shouty_plugin.py").write_text(PLUGIN)
    meta = site / "shouty_plugin-1.2.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: shouty-plugin\nVersion: 1.2\n")
    (meta / "entry_points.txt").write_text("[kto_loop.labelers]\nshouting = shouty_plugin:Shouting\nbroken = nope:X\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_an_enabled_labeler_is_loaded_and_a_missing_one_named(installed: Path) -> None:
    (plugin,) = load_plugins(["shouting"])
    assert (plugin.name, plugin.version, plugin.source) == ("shouting", "1.2", "rule:shouting")
    assert load_plugins([]) == []
    with pytest.raises(PluginError, match=r"'nope' is not installed .*broken, shouting"):
        load_plugins(["nope"])
    with pytest.raises(PluginError, match=r"'broken' .* failed to load"):
        load_plugins(["broken"])


def test_the_labeler_runs_it_and_survives_its_errors(installed: Path, tmp_path: Path) -> None:
    settings = LabelerSettings(data_dir=tmp_path / "data", labelers="shouting")
    assert settings.labelers == ["shouting"]
    bus = open_bus(settings.bus_url)
    registry = open_registry(settings.registry_url)
    topics = Topics(settings.topic_prefix)
    texts = ["CALM DOWN", "all fine", "boom", "STOP IT"]
    bus.publish_many(topics.responses, [(f"resp-{i}", encode_event(answer(i, t))) for i, t in enumerate(texts)])
    metrics = LabelerMetrics()
    stop = threading.Event()
    labeler = Labeler(settings, bus, registry, metrics, plugins=load_plugins(settings.labelers))
    thread = threading.Thread(target=labeler.run, args=(stop,))
    thread.start()
    reader = bus.consumer("check", [topics.feedback])
    seen: list[FeedbackEvent] = []

    def two_labels() -> bool:
        seen.extend(e for r in reader.poll(timeout_s=0.2) if isinstance(e := decode_event(r.value), FeedbackEvent))
        return len(seen) >= 2

    try:
        wait_for(two_labels, what="the plugin's labels")
        wait_for(lambda: metrics.responses._value.get() == 4, what="every answer read")
    finally:
        stop.set()
        thread.join(timeout=30)
        reader.close()
        registry.close()
        bus.close()
    assert sorted((e.response_id, e.label, e.source) for e in seen) == [
        ("resp-0", "undesirable", "rule:shouting"),
        ("resp-3", "undesirable", "rule:shouting"),
    ]
    assert metrics.skipped.labels(reason="labeler_error:shouting")._value.get() == 1  # "boom", logged and skipped


def test_an_uninstalled_labeler_stops_the_process_at_start(tmp_path: Path) -> None:
    env = {"KTO_DATA_DIR": str(tmp_path), "KTO_LABELERS": "toxicity", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "kto_loop.cli", "label"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "labeler 'toxicity' is not installed" in done.stderr, done.stderr
