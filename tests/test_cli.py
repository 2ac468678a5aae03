"""The `kto-loop` command: settings validation and the adapters subcommands against a live server."""

from __future__ import annotations

import json

import pytest

from kto_loop.cli import main
from testkit.background_server import BackgroundServer
from tests.serve.conftest import ADMIN_TOKEN
from tests.tiny import TINY_MODEL_ID


def test_invalid_setting_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("KTO_MAX_BATCH", "zero")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err and "KTO_MAX_BATCH" in err


@pytest.mark.parametrize("command", ["serve", "up"])
def test_header_mode_on_a_public_address_is_refused_before_anything_starts(command, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("KTO_TRUSTED_PROXIES", raising=False)
    assert main([command, "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KTO_TRUSTED_PROXIES" in err and "KTO_AUTH=api-key" in err
    assert not any(tmp_path.iterdir())  # no model built, no child started


def test_adapters_commands(monkeypatch, capsys, tmp_path, tiny_model_dir, make_adapter):
    from serve.settings import ServeSettings

    settings = ServeSettings(
        data_dir=tmp_path,
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        registry_poll_s=0.05,
    )
    with BackgroundServer(settings) as server:
        registry = server.state.registry
        v1 = registry.publish(
            make_adapter(1), base_model=TINY_MODEL_ID, parent=None, metrics={"loss": 0.3}, lineage={}
        ).version
        v2 = registry.publish(make_adapter(2), base_model=TINY_MODEL_ID, parent=v1, metrics={}, lineage={}).version
        monkeypatch.setenv("KTO_ADMIN_TOKEN", ADMIN_TOKEN)
        port = ["--port", str(server.port)]

        assert main(["adapters", "activate", v1, "--reason", "first", *port]) == 0
        assert main(["adapters", "activate", v2, *port]) == 0
        assert f"active: {v2}" in capsys.readouterr().out
        assert main(["adapters", "list", *port]) == 0
        listing = capsys.readouterr().out
        assert f"* {v2}" in listing and f"parent={v1}" in listing and '"loss": 0.3' in listing
        assert main(["adapters", "rollback", *port]) == 0
        assert f"active: {v1}" in capsys.readouterr().out
        assert server.state.hotswap.serving == v1
        assert main(["adapters", "history", *port]) == 0
        assert "rollback" in capsys.readouterr().out
        assert main(["adapters", "show", v1, *port]) == 0
        page = json.loads(capsys.readouterr().out)
        assert (page["version"], page["children"], page["served"]["responses"]) == (v1, [v2], 0)
        assert main(["users", "erase", "team/al?ce#1", "--reason", "ticket 9", *port]) == 0
        assert json.loads(capsys.readouterr().out)["user"] == "team/al?ce#1"
        server.state.registry.record_erasure("req-1", [v1], actor="learner")
        assert main(["adapters", "history", *port]) == 0
        assert f"erasure         req-1 flagged {v1} by learner" in capsys.readouterr().out

        # retention: v1 is active, v2 the newest; a third, older than neither, is the one to go
        assert main(["adapters", "pin", v2, "--reason", "keep", *port]) == 0
        assert capsys.readouterr().out.strip() == f"{v2} pinned"
        assert main(["adapters", "prune", "--dry-run", *port]) == 0
        dry = capsys.readouterr().out
        assert "would prune: nothing" in dry and f"kept {v1}: active" in dry and f"kept {v2}: pinned" in dry
        assert main(["adapters", "unpin", v2, *port]) == 0
        assert main(["adapters", "activate", v2, *port]) == 0
        assert main(["adapters", "rollback", "base", *port]) == 0  # stack emptied past v1 and v2
        capsys.readouterr()
        server.state.settings.retention_grace_s = 0.0  # the server's policy decides
        assert main(["adapters", "prune", *port]) == 0
        assert f"pruned: {v1}" in capsys.readouterr().out  # v2 stays: the newest ready version
        assert main(["adapters", "history", *port]) == 0
        assert f"prune           {v1} files deleted" in capsys.readouterr().out

        assert main(["adapters", "activate", "v9999", *port]) == 1
        assert "unknown adapter version" in capsys.readouterr().err
        monkeypatch.setenv("KTO_ADMIN_TOKEN", "wrong")
        assert main(["adapters", "list", *port]) == 1
        assert "401" in capsys.readouterr().err


def test_adapters_needs_a_token_and_a_server(monkeypatch, capsys):
    monkeypatch.delenv("KTO_ADMIN_TOKEN", raising=False)
    assert main(["adapters", "list"]) == 2
    monkeypatch.setenv("KTO_ADMIN_TOKEN", "t")
    assert main(["adapters", "list", "--port", "9"]) == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["adapters"], ["serve", "--port", "x"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def test_the_learners_port_is_its_metrics_port_not_the_servers(monkeypatch):
    from kto_loop.cli import _overrides, build_parser
    from learner.settings import LearnerSettings

    assert _overrides(build_parser().parse_args(["learn", "--port", "9101"])) == {"metrics_port": 9101}
    assert _overrides(build_parser().parse_args(["serve", "--port", "9101"])) == {"port": 9101}
    monkeypatch.setenv("KTO_PORT", "8000")  # the image sets it for every container
    assert LearnerSettings().metrics_port is None
    monkeypatch.setenv("KTO_METRICS_PORT", "8001")
    assert LearnerSettings().metrics_port == 8001


def test_up_keeps_the_servers_port_from_its_learner():
    from kto_loop.cli import _without_port

    assert _without_port(["learn", "--port", "8000", "--data-dir", "d"]) == ["learn", "--data-dir", "d"]
    assert _without_port(["learn", "--port=8000", "--model", "m"]) == ["learn", "--model", "m"]


def test_adapters_canary_commands(monkeypatch, capsys, tmp_path, tiny_model_dir, make_adapter):
    from serve.settings import ServeSettings

    settings = ServeSettings(
        data_dir=tmp_path,
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        registry_poll_s=0.05,
    )
    with BackgroundServer(settings) as server:
        registry = server.state.registry
        v1 = registry.publish(make_adapter(1), base_model=TINY_MODEL_ID, parent=None, metrics={}, lineage={}).version
        v2 = registry.publish(make_adapter(2), base_model=TINY_MODEL_ID, parent=v1, metrics={}, lineage={}).version
        registry.activate(v1, actor="op")
        monkeypatch.setenv("KTO_ADMIN_TOKEN", ADMIN_TOKEN)
        port = ["--port", str(server.port)]

        assert main(["adapters", "canary", "show", *port]) == 0
        assert "canary: none running" in capsys.readouterr().out
        assert main(["adapters", "canary", "start", v2, "--share", "0.3", "--reason", "try", *port]) == 0
        out = capsys.readouterr().out
        assert f"canary: {v2} for 30% of users against {v1}" in out and "canary_start" in out
        registry.report_canary(
            v2,
            {
                "decision": "continue",
                "candidate": {"n": 10, "desirable": 2, "rate": 0.2},
                "baseline": {"n": 30, "desirable": 15, "rate": 0.5},
                "interval": [-0.9, 0.4],
                "alpha": 0.05,
                "margin": 0.05,
            },
        )
        assert main(["adapters", "canary", "pause", *port]) == 0
        assert "(PAUSED)" in capsys.readouterr().out
        assert main(["adapters", "canary", "show", *port]) == 0
        assert "candidate 2/10 desirable, baseline 15/30" in capsys.readouterr().out
        assert main(["adapters", "canary", "resume", *port]) == 0
        v3 = registry.publish(make_adapter(3), base_model=TINY_MODEL_ID, parent=v2, metrics={}, lineage={}).version
        registry.advance_canary(v2, v3, actor="learner", reason="gate passed")
        assert main(["adapters", "canary", "show", *port]) == 0
        out = capsys.readouterr().out
        assert f"canary: {v3} for 30% of users" in out and f"lineage: {v2} -> {v3}" in out
        assert main(["adapters", "canary", "promote", "--version", "v9999", *port]) == 1
        assert "no canary of v9999" in capsys.readouterr().err
        assert main(["adapters", "canary", "rollback", "--reason", "bad", *port]) == 0
        assert "canary: none running" in capsys.readouterr().out
        assert registry.get(v3).status == "rejected"
        assert main(["adapters", "history", *port]) == 0
        history = capsys.readouterr().out
        assert f"canary_advance  {v3} (active {v1}) by learner" in history
        assert f"canary_rollback {v3} (active {v1}) by admin: bad" in history
        assert main(["adapters", "canary", "promote", *port]) == 1
        assert "409" in capsys.readouterr().err


def test_keys_commands(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import httpx

    from serve.settings import ServeSettings

    settings = ServeSettings(
        data_dir=tmp_path, model=str(tiny_model_dir), model_id=TINY_MODEL_ID, admin_token=ADMIN_TOKEN, auth="api-key"
    )
    with BackgroundServer(settings) as server:
        monkeypatch.setenv("KTO_ADMIN_TOKEN", ADMIN_TOKEN)
        port = ["--port", str(server.port)]
        assert main(["keys", "create", "ops", "--role", "admin", "--name", "laptop", *port]) == 0
        key = capsys.readouterr().out.splitlines()[0]
        assert httpx.get(f"{server.url}/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["role"] == "admin"
        # the admin key works as the CLI's credential too
        monkeypatch.setenv("KTO_ADMIN_TOKEN", key)
        assert main(["keys", "list", "ops", *port]) == 0
        key_id, role, name = capsys.readouterr().out.split()[:3]
        assert (role, name) == ("admin", "laptop") and key not in key_id
        assert main(["keys", "revoke", "ops", key_id, *port]) == 0
        assert capsys.readouterr().out.strip() == "revoked"
        assert main(["keys", "list", "ops", *port]) == 1  # that key was the credential: now refused
        assert "401" in capsys.readouterr().err


def test_learn_exits_2_with_one_line_on_a_model_that_cannot_load(capsys, tmp_path):
    assert main(["learn", "--data-dir", str(tmp_path), "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kto-loop: the model") and "a restart cannot fix this" in err
    assert "Traceback" not in err


def test_learn_exits_2_with_one_line_on_a_file_of_a_newer_layout(capsys, tmp_path, tiny_model_dir):
    import sqlite3

    (tmp_path / "learner").mkdir()
    with sqlite3.connect(tmp_path / "learner" / "buffer.sqlite3") as newer:
        newer.execute("PRAGMA user_version = 999")
    assert main(["learn", "--data-dir", str(tmp_path), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "newer than this code's" in err and "a restart cannot fix this" in err
    assert "Traceback" not in err


def test_bus_delete_group_forgets_a_group_that_holds_retention_back(tmp_path, capsys):
    from ingest.sqlite_bus import SqliteBus

    with SqliteBus(tmp_path / "bus.sqlite3") as bus:
        bus.publish("kto.responses", None, b"x")
        gone = bus.consumer("old-labeler", ["kto.responses"])
        gone.commit({("kto.responses", 0): 0})
        gone.close()
    data = ["--data-dir", str(tmp_path)]
    assert main(["bus", "delete-group", "old-labeler", *data]) == 0
    assert capsys.readouterr().out.strip() == "deleted group old-labeler"
    assert main(["bus", "delete-group", "old-labeler", *data]) == 0
    assert capsys.readouterr().out.strip() == "no group old-labeler"
    with SqliteBus(tmp_path / "bus.sqlite3") as bus:
        assert bus.enforce_retention(max_age_s=None, max_bytes=1).deleted  # nothing holds it back now


def test_annotations_commands(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import httpx

    from serve.settings import ServeSettings

    settings = ServeSettings(
        data_dir=tmp_path,
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        annotation_overlap=1.0,  # every answer to two annotators
    )
    with BackgroundServer(settings) as server:
        monkeypatch.setenv("KTO_ADMIN_TOKEN", ADMIN_TOKEN)
        port = ["--port", str(server.port)]
        assert main(["annotations", "config", "--strategy", "newest", "--guidelines", "Facts only.", *port]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["strategy"], shown["guidelines"]) == ("newest", "Facts only.")
        assert main(["annotations", "config", *port]) == 0
        assert json.loads(capsys.readouterr().out)["strategy"] == "newest"

        with httpx.Client(base_url=server.url, timeout=60) as client:
            for n in range(2):
                chat = {"messages": [{"role": "user", "content": f"q{n}"}], "max_tokens": 4}
                assert client.post("/v1/chat/completions", json=chat, headers={"X-User-Id": "alice"}).is_success
            for who, thumbs in (("ann", ["up", "down"]), ("bob", ["up", "up"])):
                headers = {"X-User-Id": who, "X-User-Role": "annotator"}
                for thumb in thumbs:
                    item = client.get("/v1/annotations/next", headers=headers).json()["item"]
                    label = {"response_id": item["response_id"], "label": thumb}
                    assert client.post("/v1/annotations", json=label, headers=headers).status_code == 202
        assert main(["annotations", "agreement", *port]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("all annotators") and "on     2 shared answers, pairs agreeing 50%" in lines[0]
        assert [line.split()[0] for line in lines[1:3]] == ["ann", "bob"]
        assert lines[-1] == "4 annotations; 0 answers waiting"
