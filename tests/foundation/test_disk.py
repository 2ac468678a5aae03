"""A full disk recognised in every shape it takes, and the free-space probe with its reserve."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from foundation.disk import SMALL_DISK_SHARE, DiskFull, DiskProbe, is_disk_full
from ingest.bus import BusUnavailable
from ingest.sqlite_bus import SqliteBus
from tests.tmpfs import MiB, fill, small_disk


def wrapped(inner: BaseException) -> BusUnavailable:
    """`inner` as the embedded bus reports it: a domain error raised from it."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise BusUnavailable("cannot publish") from exc
    except BusUnavailable as outer:
        return outer


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_is_recognised_through_wrapping(code):
    assert is_disk_full(OSError(code, "no room"))
    assert is_disk_full(wrapped(OSError(code, "no room")))


def test_other_errors_are_not_a_full_disk():
    assert not is_disk_full(OSError(errno.EACCES, "permission denied"))
    assert not is_disk_full(wrapped(sqlite3.OperationalError("database is locked")))
    assert not is_disk_full(ValueError("no space left on device"))  # text a client could choose counts for nothing
    assert not is_disk_full(None)


def test_the_real_errors_of_a_full_disk_are_recognised(tmp_path):
    with small_disk(tmp_path / "disk", 4 * MiB) as disk:
        bus = SqliteBus(disk / "bus.sqlite3")
        conn = sqlite3.connect(disk / "other.sqlite3")
        conn.execute("CREATE TABLE t (v BLOB)")
        try:
            fill(disk)
            with pytest.raises(OSError) as written:
                (disk / "more").write_bytes(b"x" * 8192)
            with pytest.raises(sqlite3.OperationalError) as inserted:
                conn.execute("INSERT INTO t VALUES (?)", (b"x" * 65536,))
            with pytest.raises(BusUnavailable) as published:
                for i in range(100):  # the WAL may hold a page's slack
                    bus.publish("t", str(i), b"x" * 4096)
        finally:
            conn.close()
            bus.close()
    assert is_disk_full(written.value) and is_disk_full(inserted.value) and is_disk_full(published.value)


def test_the_probe_refuses_writes_under_the_reserve_and_takes_them_again_once_space_is_freed(tmp_path):
    with small_disk(tmp_path / "disk", 8 * MiB) as disk:
        probe = DiskProbe([disk / "not" / "made" / "yet", disk], reserve_bytes=64 * MiB)
        (space,) = probe.spaces()  # both paths: one filesystem
        # 64 MiB of an 8 MiB disk would refuse it outright: a small disk keeps a share of itself
        assert space.reserve_bytes == int(8 * MiB * SMALL_DISK_SHARE)
        assert space.writable and not probe.full()
        probe.check()

        ballast = fill(disk)
        assert [s.free_bytes < s.reserve_bytes for s in probe.full()] == [True]
        with pytest.raises(DiskFull) as refused:
            probe.check()
        assert is_disk_full(refused.value) and "KTO_DISK_RESERVE_MB" in str(refused.value)

        ballast.unlink()
        assert not probe.full()
        probe.check()


def test_the_probe_names_each_filesystem_once(tmp_path):
    probe = DiskProbe([tmp_path / "a", tmp_path / "b" / "c", tmp_path], reserve_bytes=0)
    assert [s.path for s in probe.spaces()] == [tmp_path / "a"]
