"""The Kafka bus: what only Kafka has (group rebalances, a crashed member, foreign readers),
its URLs, and its failures when the cluster cannot be reached.

The behaviour both backends share is in ``test_bus_contract.py`` and ``test_consumer_contract.py``.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ingest.bus import BusUnavailable, open_bus
from ingest.events import AnyEvent, FeedbackEvent, ResponseEvent, SamplingParams, Topics, decode_event, encode_event
from ingest.kafka_bus import KafkaBus, bootstrap_servers
from testkit.ports import free_port
from tests.ingest.conftest import kafka_only
from tests.ingest.helpers import WAIT_S, fill, nums, take, values

Spawn = Callable[..., Any]  # conftest spawn_worker: a Popen


def dead_address() -> str:
    """A 127.0.0.1 port nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def test_bootstrap_servers_from_urls() -> None:
    assert bootstrap_servers("kafka://127.0.0.1:9092") == ["127.0.0.1:9092"]
    assert bootstrap_servers("kafka://a:1, b.example:2/") == ["a:1", "b.example:2"]
    for bad in ["kafka://", "kafka://host", "kafka://host:x", "kafka://h:1/path", "kafka://h:1?x=1", "kafka://h:0"]:
        with pytest.raises(ValueError, match="host:port"):
            bootstrap_servers(bad)


def test_open_bus_makes_a_kafka_bus_without_connecting() -> None:
    bus = open_bus(f"kafka://{dead_address()}")
    assert isinstance(bus, KafkaBus)
    bus.close()


def test_an_unreachable_cluster_raises_bus_unavailable_within_the_timeout() -> None:
    bus = KafkaBus([dead_address()], timeout_s=1.0)
    for call in (bus.ping, lambda: bus.publish("t", "k", b"v"), lambda: bus.end_offsets(["t"])):
        started = time.monotonic()
        with pytest.raises(BusUnavailable):
            call()
        assert time.monotonic() - started < 10
    with pytest.raises(BusUnavailable):
        bus.consumer("g", ["t"])
    bus.close()


@pytest.mark.kafka
def test_a_plain_kafka_consumer_reads_what_the_bus_published(services: Any) -> None:
    # The events as the server publishes them, read back without any of our code.
    from kafka import KafkaConsumer, TopicPartition

    topics = Topics(f"reader-{uuid.uuid4().hex[:8]}")
    sampling = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0)
    responses = [
        ResponseEvent(
            response_id=f"resp-{i}",
            user="u",
            base_model="m",
            adapter_version=None,
            messages=[],
            prompt_token_ids=[1, 2],
            completion=f"answer {i}",
            completion_token_ids=[3, i],
            finish_reason="stop",
            sampling=sampling,
        )
        for i in range(6)
    ]
    votes = [FeedbackEvent(response_id=r.response_id, user="u", label="desirable") for r in responses]
    with KafkaBus(services.kafka_servers) as bus:
        bus.create_topics(topics.all, partitions=3)
        sent = [bus.publish(topics.responses, e.response_id, encode_event(e)) for e in responses]
        sent += [bus.publish(topics.feedback, e.response_id, encode_event(e)) for e in votes]

    reader = KafkaConsumer(
        bootstrap_servers=services.kafka_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    reader.assign([TopicPartition(t, p) for t in (topics.responses, topics.feedback) for p in range(3)])
    got: dict[tuple[str, int, int], Any] = {}  # kafka-python's ConsumerRecords
    deadline = time.monotonic() + WAIT_S
    while len(got) < len(sent) and time.monotonic() < deadline:
        for batch in reader.poll(timeout_ms=500).values():
            for r in batch:
                got[(r.topic, r.partition, r.offset)] = r
    reader.close()
    assert len(got) == len(sent) == 12
    partition_of: dict[str, int] = {}
    for record in sent:
        raw = got[(record.topic, record.partition, record.offset)]
        event = decode_event(raw.value)
        assert isinstance(event, (ResponseEvent, FeedbackEvent)) and record.key is not None
        assert raw.key == event.response_id.encode() == record.key.encode()
        assert raw.value == record.value and raw.timestamp / 1000 == record.timestamp
        # A response and its feedback land on the same partition number.
        assert partition_of.setdefault(event.response_id, raw.partition) == raw.partition

    def response_id(event: AnyEvent) -> str:
        assert isinstance(event, (ResponseEvent, FeedbackEvent))  # all that this test sent
        return event.response_id

    by_topic = {
        t: sorted((decode_event(r.value) for r in got.values() if r.topic == t), key=response_id)
        for t in (topics.responses, topics.feedback)
    }
    assert by_topic == {topics.responses: responses, topics.feedback: votes}


def settle(services: Any, group: str, members: dict[str, Any], seen: dict[str, list[bytes]]) -> None:
    """Poll every member from a thread of its own, as separate processes would (committing what
    each poll returned, as the learner does), until the broker reports the group stable with all
    of them and exactly one member has owned the partition for a second."""
    from kafka import KafkaAdminClient

    owned: dict[str, set[tuple[str, int]]] = {name: set() for name in members}
    stop = threading.Event()

    def run(name: str) -> None:
        member = members[name]
        while not stop.is_set():
            if got := member.poll(timeout_s=0.1):
                seen[name] += values(got)
                member.commit()
            owned[name] = member.assignment

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in members]
    for thread in threads:
        thread.start()
    admin = KafkaAdminClient(bootstrap_servers=services.kafka_servers)
    try:
        settled_since = None
        deadline = time.monotonic() + WAIT_S
        while settled_since is None or time.monotonic() - settled_since < 1.0:
            assert time.monotonic() < deadline, f"group {group} did not settle"
            assert all(thread.is_alive() for thread in threads), "a member's poll failed"
            info = admin.describe_groups([group])[group]
            stable = info["group_state"] == "Stable" and len(info["members"]) == len(members)
            one_owner = sum(len(partitions) for partitions in owned.values()) == 1
            settled_since = (settled_since or time.monotonic()) if stable and one_owner else None
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        admin.close()


@kafka_only
def test_one_owner_per_partition_and_no_duplicates_once_committed(bus: Any, services: Any) -> None:
    fill(bus, "t", 5)
    first = bus.consumer("g", ["t"])
    assert values(take(first, 3, max_records=3)) == nums(0, 1, 2)
    first.commit()
    fill(bus, "t", 1, start=5)
    second = bus.consumer("g", ["t"])  # joins: the group rebalances
    seen: dict[str, list[bytes]] = {"first": [], "second": []}
    settle(services, bus.real("g"), {"first": first, "second": second}, seen)
    assert sorted(seen["first"] + seen["second"]) == nums(3, 4, 5)  # each exactly once
    owner, other = (first, second) if first.assignment else (second, first)
    assert owner.assignment == {("t", 0)} and other.assignment == set()

    # The owner reads a record but leaves without committing it: the other member gets it again.
    fill(bus, "t", 1, start=6)
    assert values(take(owner, 1)) == nums(6)
    owner.close()
    assert values(take(other, 1)) == nums(6)
    assert other.assignment == {("t", 0)}


@kafka_only
def test_no_poll_returns_while_its_join_is_in_flight(bus: Any) -> None:
    # kafka-python 3.0.12 drops a join that completes between two polls (ingest.kafka_consumer);
    # the guard reads its coordinator's `_join_task`: an upgrade that renames it fails here.
    fill(bus, "t", 1)
    member = bus.consumer("g", ["t"])
    assert hasattr(member.inner._consumer._coordinator, "_join_task")
    deadline = time.monotonic() + WAIT_S
    got: list[bytes] = []
    while not got:
        assert time.monotonic() < deadline, "never joined"
        got = values(member.poll(timeout_s=0.01))
        assert not member.inner._joining()
    assert got == nums(0) and member.assignment == {("t", 0)}


@kafka_only
def test_a_killed_member_is_replaced_from_its_last_commit(bus: Any, bus_url: str, spawn_worker: Spawn) -> None:
    fill(bus, "t", 10)
    victim = spawn_worker("member", bus_url, bus.real("g"), bus.real("t"), 4)
    assert victim.stdout is not None and victim.stderr is not None
    line = victim.stdout.readline()
    assert line.strip() == "committed 4", line or victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()

    # The dead member never leaves the group: the coordinator drops it after its 3 s session timeout.
    survivor = bus.consumer("g", ["t"])
    assert values(take(survivor, 6)) == nums(4, 5, 6, 7, 8, 9)
    assert time.monotonic() - killed_at < 3.0 + 15.0
    assert survivor.committed("t") == 4


@pytest.mark.kafka
@pytest.mark.parametrize("kill", [True, False])
def test_a_bus_survives_a_broker_restart(tmp_path: Any, kill: bool) -> None:
    from tests.services import PrivateKafka

    kafka = PrivateKafka(tmp_path / "kafka")  # ours alone: the session's broker is never restarted
    try:
        with KafkaBus.from_url(kafka.url, timeout_s=10.0) as bus:
            bus.publish("t", "k", b"0")
            assert bus.end_offsets(["t"]) == {("t", 0): 1}
            kafka.restart(kill=kill)
            # Right after a restart kafka-python's clients may still hold the dead connections
            # ("NodeNotReadyError: No node_id provided"); the bus retries and renews them itself.
            assert bus.end_offsets(["t"]) == {("t", 0): 1}
            bus.ping()
            assert bus.publish("t", "k", b"1").offset == 1
            assert bus.end_offsets(["t"]) == {("t", 0): 2}
    finally:
        kafka.stop()
