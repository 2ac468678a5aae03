"""The `kto-loop` command: settings validation and the adapters subcommands against a live server."""

from __future__ import annotations

import pytest

from kto_loop.cli import main
from serve.background import BackgroundServer
from tests.serve.conftest import ADMIN_TOKEN
from tests.tiny import TINY_MODEL_ID


def test_invalid_setting_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("KTO_MAX_BATCH", "zero")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err and "KTO_MAX_BATCH" in err


def test_adapters_commands(monkeypatch, capsys, tmp_path, tiny_model_dir, make_adapter):
    from serve.settings import ServeSettings

    settings = ServeSettings(data_dir=tmp_path, model=str(tiny_model_dir), model_id=TINY_MODEL_ID,
                             admin_token=ADMIN_TOKEN, registry_poll_s=0.05)
    with BackgroundServer(settings) as server:
        registry = server.state.registry
        v1 = registry.publish(make_adapter(1), base_model=TINY_MODEL_ID, parent=None, metrics={"loss": 0.3}, lineage={}).version
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
