"""The bus shared by processes: concurrent writers (both backends), a writer killed mid-stream
(the embedded file).

Writers are child processes (``workers.py writer``) that print "OFFSET i" for each record only
after ``publish`` has returned: those lines are the acknowledgements the parent checks.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest.bus import Record
from ingest.sqlite_bus import SqliteBus
from tests.ingest.conftest import both_backends
from tests.ingest.helpers import read_all as read_group

Spawn = Callable[..., "subprocess.Popen[str]"]


def read_all(bus: SqliteBus, topic: str) -> list[Record]:
    consumer = bus.consumer("check", [topic])
    records: list[Record] = []
    while batch := consumer.poll(timeout_s=0):
        records.extend(batch)
    consumer.close()
    return records


def await_ready(child: subprocess.Popen[str]) -> None:
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline().strip() == "ready", child.stderr.read()


def parse_ack(line: str) -> tuple[int, int]:
    offset, i = line.split()
    return int(offset), int(i)


def writer_of(record: Record) -> tuple[str, int]:
    """("a", 17) for the record a writer tagged "a" published 17th (counting from 0)."""
    assert record.key is not None and record.value == record.key.encode()
    tag, i = record.key.rsplit("-", 1)
    return tag, int(i)


@both_backends
def test_two_writer_processes_append_every_record_exactly_once(
    bus: Any, bus_url: str, tmp_path: Path, spawn_worker: Spawn
) -> None:
    bus.create_topics(["t"])  # as a deployment would
    topic = bus.real("t") if hasattr(bus, "real") else "t"
    go = tmp_path / "go"
    per_writer = 300
    # One writer publishes one record per request, the other batches of 7.
    writers = {
        "a": spawn_worker("writer", bus_url, topic, "a", per_writer, 1, go),
        "b": spawn_worker("writer", bus_url, topic, "b", per_writer, 7, go),
    }
    for child in writers.values():
        await_ready(child)
    go.touch()
    acked: dict[str, list[tuple[int, int]]] = {}
    for tag, child in writers.items():
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        acked[tag] = [parse_ack(line) for line in out.splitlines()]

    records = read_group(bus, ["t"])
    assert [r.offset for r in records] == list(range(2 * per_writer))
    for tag in writers:
        # All of a writer's records, once each, in its publish order, at the offsets it was told.
        mine = [(r.offset, writer_of(r)[1]) for r in records if writer_of(r)[0] == tag]
        assert [i for _, i in mine] == list(range(per_writer))
        assert mine == acked[tag]


def test_acknowledged_records_survive_sigkill_of_the_writer(
    bus_path: Path, tmp_path: Path, spawn_worker: Spawn
) -> None:
    SqliteBus(bus_path).close()
    go = tmp_path / "go"
    # The victim writes until killed; the survivor writes 400 records around the kill.
    url = f"sqlite:///{bus_path}"
    victim = spawn_worker("writer", url, "t", "v", 0, 1, go)
    survivor = spawn_worker("writer", url, "t", "s", 400, 3, go)
    await_ready(victim)
    await_ready(survivor)
    go.touch()
    assert victim.stdout is not None and victim.stderr is not None
    acked: list[tuple[int, int]] = []
    while len(acked) < 250:
        line = victim.stdout.readline()
        assert line, victim.stderr.read()
        acked.append(parse_ack(line))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert victim.returncode == -signal.SIGKILL
    _, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, err

    with SqliteBus(bus_path) as bus:
        records = read_all(bus, "t")
        by_offset = {r.offset: writer_of(r) for r in records}
        assert all(by_offset[offset] == ("v", i) for offset, i in acked)
        # Dense, no duplicates, and all the survivor's records are there.
        assert [r.offset for r in records] == list(range(len(records)))
        assert sorted(i for tag, i in by_offset.values() if tag == "s") == list(range(400))
        # Still writable, right after the last record.
        assert bus.publish("t", "after", b"x").offset == len(records)
        bus.ping()
    check = sqlite3.connect(bus_path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
