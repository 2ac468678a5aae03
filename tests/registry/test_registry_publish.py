"""Publishing versions into the registry (every backend) and reading them back."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest

from registry import (
    InvalidAdapter,
    Registry,
    RegistryError,
    RegistryUnavailable,
    SqliteRegistry,
    UnknownVersion,
    VerificationError,
    open_registry,
)
from registry.redis_keys import parse_url
from registry.redis_registry import RedisRegistry
from registry.store import sha256_file

WEIGHTS = "adapter_model.safetensors"


def test_publish_get_and_list(reg, adapter_dir, base_model):
    info = reg.publish(
        adapter_dir, base_model=base_model, parent=None, metrics={"loss": 0.5}, lineage={"events": ["e1", "e2"]}
    )
    assert info.version == "v0001"
    assert info.status == "ready" and info.rejected_reason is None
    assert info.base_model == base_model and info.parent is None
    assert info.sha256 == sha256_file(adapter_dir / WEIGHTS)
    assert info.metrics == {"loss": 0.5} and info.lineage == {"events": ["e1", "e2"]}
    assert reg.adapter_path("v0001") == info.path
    assert (info.path / WEIGHTS).read_bytes() == (adapter_dir / WEIGHTS).read_bytes()
    assert (info.path / "adapter_config.json").is_file()
    assert reg.get("v0001") == info

    child = reg.publish(adapter_dir, base_model=base_model, parent="v0001", metrics={}, lineage={})
    assert child.version == "v0002" and child.parent == "v0001"
    assert [v.version for v in reg.list_versions()] == ["v0001", "v0002"]
    assert set(info.to_json()) == {
        "version",
        "status",
        "parent",
        "created_at",
        "base_model",
        "sha256",
        "metrics",
        "lineage",
        "rejected_reason",
        "flags",
        "pinned",
        "pruned_at",
    }
    json.dumps(child.to_json())  # the admin API serializes it as is


def test_unknown_version(reg):
    with pytest.raises(UnknownVersion) as err:
        reg.get("v0042")
    assert err.value.version == "v0042"
    with pytest.raises(UnknownVersion):
        reg.adapter_path("v0042")
    with pytest.raises(UnknownVersion):
        reg.verify_files("v0042")


def test_versions_are_immutable_copies(reg, publish, adapter_dir):
    v1 = publish()
    original = reg.get(v1)
    (adapter_dir / WEIGHTS).write_bytes(b"changed after publish")
    v2 = publish()
    assert v2 != v1
    reg.verify_files(v1)  # the first version still holds what was published
    assert reg.get(v1) == original
    assert reg.get(v2).sha256 == sha256_file(adapter_dir / WEIGHTS) != original.sha256
    mode = os.stat(reg.adapter_path(v1) / WEIGHTS).st_mode
    assert mode & 0o222 == 0  # published files are read-only


def test_parent_must_exist(reg, publish):
    with pytest.raises(UnknownVersion):
        publish(parent="v0007")
    assert reg.list_versions() == []


@pytest.mark.parametrize("missing", ["adapter_config.json", WEIGHTS])
def test_publish_refuses_incomplete_dir(reg, publish, adapter_dir, missing):
    (adapter_dir / missing).unlink()
    with pytest.raises(InvalidAdapter):
        publish()
    assert reg.list_versions() == []


def test_publish_refuses_bad_config_and_status(reg, publish, adapter_dir):
    with pytest.raises(ValueError):
        publish(status="active")
    with pytest.raises(ValueError):
        publish(status="rejected")  # without a reason
    with pytest.raises(ValueError):
        publish(metrics={"when": object()})
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter):
        publish()
    assert reg.list_versions() == []


def test_publish_rejected_version_and_non_finite_metrics(reg, publish):
    v = publish(
        status="rejected", rejected_reason="gate: loss is NaN", metrics={"loss": math.nan, "kl": [1.0, math.inf]}
    )
    info = reg.get(v)
    assert info.status == "rejected" and info.rejected_reason == "gate: loss is NaN"
    assert info.metrics == {"loss": None, "kl": [1.0, None]}
    json.dumps(info.to_json(), allow_nan=False)


def test_failed_publish_burns_its_name(reg, publish, adapter_dir, monkeypatch):
    import registry.publishing as publishing

    def boom(stage: str) -> None:
        if stage == "staged":
            raise OSError("disk full")

    monkeypatch.setattr(publishing, "_checkpoint", boom)
    with pytest.raises(OSError):
        publish()
    monkeypatch.undo()
    assert reg.list_versions() == []
    assert not (reg.adapter_root / "v0001").exists()
    assert publish() == "v0002"  # names are never reused


@pytest.mark.parametrize("applied", [False, True])
def test_failed_commit_keeps_files_only_if_it_applied(reg, publish, monkeypatch, applied):
    """A commit can fail after applying (its reply lost with the connection): that version is
    visible, so its files must stay; one that did not apply leaves nothing behind."""
    real_commit = reg._catalog.commit

    def commit_then_fail(*args) -> None:
        if applied:
            real_commit(*args)
        raise RegistryUnavailable("connection lost")

    monkeypatch.setattr(reg._catalog, "commit", commit_then_fail)
    with pytest.raises(RegistryUnavailable):
        publish()
    monkeypatch.undo()
    if applied:
        [info] = reg.list_versions()
        reg.verify_files(info.version)
    else:
        assert reg.list_versions() == []
        assert not (reg.adapter_root / "v0001").exists()
    assert publish() == "v0002"


def test_verify_files_catches_tampering(reg, publish):
    v = publish()
    reg.verify_files(v)
    weights = reg.adapter_path(v) / WEIGHTS
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as err:
        reg.verify_files(v)
    assert err.value.version == v and "sha256" in err.value.reason


def test_verify_files_catches_missing_file(reg, publish):
    v = publish()
    (reg.adapter_path(v) / "adapter_config.json").unlink()
    with pytest.raises(VerificationError) as err:
        reg.verify_files(v)
    assert "adapter_config.json" in err.value.reason


def test_reopen_keeps_everything(open_reg, publish, reg):
    v = publish(metrics={"acc": 0.75})
    reg.activate(v, actor="op")
    again = open_reg()
    assert again.get(v) == reg.get(v)
    assert again.pointer() == reg.pointer()
    assert again.history() == reg.history()
    again.ping()


def test_adapter_root_option(tmp_path, adapter_dir, base_model):
    reg = open_registry(f"sqlite:///{tmp_path / 'db' / 'r.sqlite3'}", tmp_path / "shared")
    try:
        info = reg.publish(adapter_dir, base_model=base_model, parent=None, metrics={}, lineage={})
        assert info.path == tmp_path / "shared" / "v0001"
        assert (info.path / WEIGHTS).is_file()
    finally:
        reg.close()


def test_open_registry_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = open_registry("sqlite:///rel/registry.sqlite3")
    try:
        assert isinstance(reg, SqliteRegistry)
        assert reg.db_path.resolve() == (tmp_path / "rel" / "registry.sqlite3").resolve()
        assert reg.adapter_root.resolve() == (tmp_path / "rel" / "versions").resolve()
    finally:
        reg.close()
    with pytest.raises(ValueError, match="adapter_root"):
        open_registry("redis://127.0.0.1:6379/0")  # adapter files need a shared path
    with pytest.raises(ValueError, match="sqlite"):
        open_registry("postgres://db/registry")
    with pytest.raises(ValueError):
        open_registry("sqlite:///")


def test_redis_url_prefix():
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", "kto:registry:", "redis://h:1/2")
    url, prefix, where = parse_url("rediss://u:secret@h:1/0?prefix=a:b:&socket_timeout=9")
    assert (url, prefix) == ("rediss://u:secret@h:1/0?socket_timeout=9", "a:b:")
    assert "secret" not in where
    with pytest.raises(ValueError):
        parse_url("redis://h:1/0?prefix=")


def test_closed_registry_raises(open_reg):
    reg = open_reg()
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(RegistryError):
        reg.ping()


def test_staging_debris_swept_on_open(open_reg, reg, publish):
    debris = reg.adapter_root / ".staging" / "v0099"
    debris.mkdir()
    (debris / WEIGHTS).write_bytes(b"half")
    open_reg().close()
    assert not debris.exists()
    assert publish() == "v0001"


@pytest.mark.parametrize("backend_class", [SqliteRegistry, RedisRegistry])
def test_backends_implement_every_operation_of_the_registry(backend_class):
    members = [name for name in dir(Registry) if not name.startswith("_")]
    assert {"publish", "pointer", "wait_for_change", "promote_canary", "record_erasure"} <= set(members)
    assert not backend_class.__abstractmethods__  # the storage hooks are all there
    for name in members:
        assert inspect.signature(getattr(backend_class, name)) == inspect.signature(getattr(Registry, name)), name


def test_damaged_database_is_unavailable(tmp_path):
    db = tmp_path / "registry.sqlite3"
    db.write_bytes(b"this is not an sqlite database, not even close" * 100)
    with pytest.raises(RegistryUnavailable):
        open_registry(f"sqlite:///{db}")


def test_newer_schema_is_refused(backend, open_reg, reg):
    # As a newer release would leave it:
    if backend == "sqlite":
        reg._conn.execute("PRAGMA user_version = 99")
    else:
        reg._client.set(reg._keys.schema, 99)
    with pytest.raises(RegistryError, match="newer"):
        open_reg()
