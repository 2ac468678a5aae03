"""Fixtures for the learner tests."""

from __future__ import annotations

# ======================================================================================
# Event joining and the replay buffer (test_buffer.py, test_consumer.py, join_worker.py)
# ======================================================================================
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.bus import Record
from ingest.events import AnyEvent, ErasureEvent, FeedbackEvent, ResponseEvent, SamplingParams, Topics, encode_event
from ingest.sqlite_bus import SqliteBus
from learner.buffer import ReplayBuffer
from learner.consumer import EventJoiner
from learner.join import ApplyResult, Polled
from learner.settings import LearnerSettings
from registry import SqliteRegistry
from tests.tiny import TINY_MODEL_ID, FakeClock, spawn_scripts

JOIN_WORKER = Path(__file__).with_name("join_worker.py")


class EventStream:
    """Builds events, publishes them on the test bus, and reads the dead-letter topic back."""

    def __init__(self, bus: SqliteBus, topics: Topics) -> None:
        self.bus = bus
        self.topics = topics
        self._offsets: dict[str, int] = {}
        self._created = 1_000.0

    def _tick(self) -> float:
        # Monotonic created_at, so "the latest vote" is the one made last unless a test says otherwise.
        self._created += 1.0
        return self._created

    def response(
        self,
        response_id: str,
        *,
        user: str | None = "alice",
        prompt: list[int] | None = None,
        completion: list[int] | None = None,
        adapter_version: str | None = "v1",
        publish: bool = True,
    ) -> ResponseEvent:
        event = ResponseEvent(
            response_id=response_id,
            user=user,
            created_at=self._tick(),
            base_model="tiny",
            adapter_version=adapter_version,
            messages=[{"role": "user", "content": "hi"}],
            prompt_token_ids=[1, 2, 3] if prompt is None else prompt,
            completion="…",
            completion_token_ids=[7, 8] if completion is None else completion,
            finish_reason="stop",
            sampling=SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0),
        )
        if publish:
            self.publish(event)
        return event

    def feedback(
        self,
        response_id: str,
        label: str = "desirable",
        *,
        user: str = "alice",
        created_at: float | None = None,
        source: str = "human",
        weight: float = 1.0,
        signal: str | None = None,
        rater: str | None = None,
        publish: bool = True,
    ) -> FeedbackEvent:
        event = FeedbackEvent(
            response_id=response_id,
            user=user,
            label=label,
            created_at=self._tick() if created_at is None else created_at,
            source=source,
            weight=weight,
            signal=signal,
            rater=rater,
        )
        if publish:
            self.publish(event)
        return event

    def erasure(self, user: str = "alice", *, created_at: float | None = None, publish: bool = True) -> ErasureEvent:
        event = ErasureEvent(
            user=user, actor="admin", reason="asked to", created_at=self._tick() if created_at is None else created_at
        )
        if publish:
            self.publish(event)
        return event

    def topic_of(self, event: AnyEvent) -> str:
        if isinstance(event, ErasureEvent):
            return self.topics.erasures
        return self.topics.responses if isinstance(event, ResponseEvent) else self.topics.feedback

    @staticmethod
    def key_of(event: AnyEvent) -> str:
        return event.user if isinstance(event, ErasureEvent) else event.response_id

    def publish(self, event: AnyEvent) -> Record:
        return self.bus.publish(self.topic_of(event), key=self.key_of(event), value=encode_event(event))

    def publish_raw(self, topic: str, value: bytes, key: str | None = "raw") -> Record:
        return self.bus.publish(topic, key=key, value=value)

    def polled(self, *events: AnyEvent) -> list[Polled]:
        """The events as a polled batch, without the bus (for buffer tests)."""
        batch: list[Polled] = []
        for event in events:
            topic = self.topic_of(event)
            offset = self._offsets.get(topic, 0)
            self._offsets[topic] = offset + 1
            record = Record(topic, 0, offset, self.key_of(event), encode_event(event), 0.0)
            batch.append((record, event, None))
        return batch

    def dead_letters(self) -> list[dict]:
        """Every envelope on the dead-letter topic, read by a throw-away group."""
        consumer = self.bus.consumer(f"check-{uuid.uuid4().hex}", [self.topics.dead_letters])
        letters: list[dict] = []
        while batch := consumer.poll(timeout_s=0):
            letters.extend(json.loads(r.value) for r in batch)
        consumer.close()
        return letters

    @staticmethod
    def join_all(joiner: EventJoiner) -> ApplyResult:
        """Poll until a poll returns nothing; the sum of the results."""
        total = ApplyResult()
        while True:
            result = joiner.poll_once(timeout_s=0)
            total = total + result
            if result.records == 0:
                return total


@pytest.fixture
def join_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def topics() -> Topics:
    return Topics("t")


@pytest.fixture
def event_bus(tmp_path: Path) -> Iterator[SqliteBus]:
    bus = SqliteBus(tmp_path / "bus.sqlite3")
    yield bus
    bus.close()


@pytest.fixture
def stream(event_bus: SqliteBus, topics: Topics) -> EventStream:
    return EventStream(event_bus, topics)


@pytest.fixture
def buffer_path(tmp_path: Path) -> Path:
    return tmp_path / "buffer.sqlite3"


@pytest.fixture
def buffer(buffer_path: Path) -> Iterator[ReplayBuffer]:
    buffer = ReplayBuffer(buffer_path)
    yield buffer
    buffer.close()


@pytest.fixture
def make_joiner(event_bus: SqliteBus, topics: Topics, join_clock: FakeClock) -> Iterator[Callable[..., EventJoiner]]:
    """make_joiner(buffer, pending_ttl_s=60, **kw) -> an EventJoiner on the test bus; closed at teardown."""
    made: list[EventJoiner] = []

    def make(buffer: ReplayBuffer, pending_ttl_s: float = 60.0, **kw: Any) -> EventJoiner:
        joiner = EventJoiner(event_bus, topics, buffer, pending_ttl_s=pending_ttl_s, clock=join_clock, **kw)
        made.append(joiner)
        return joiner

    yield make
    for joiner in made:
        joiner.close()


@pytest.fixture
def spawn_join_worker() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``join_worker.py`` with arguments in a child process; killed at teardown."""
    yield from spawn_scripts(JOIN_WORKER)


# ====================================== end of event joining and the replay buffer ====


@pytest.fixture
def registry(tmp_path):
    """An embedded registry of the test's own."""
    reg = SqliteRegistry(tmp_path / "registry" / "registry.sqlite3")
    yield reg
    reg.close()


@pytest.fixture
def publish(registry, make_adapter):
    def publish(parent: str | None = None) -> str:
        return registry.publish(
            make_adapter(1), base_model=TINY_MODEL_ID, parent=parent, metrics={}, lineage={}
        ).version

    return publish


def quick_learner(data_dir: Path, model_dir: Path, **overrides: Any) -> LearnerSettings:
    """A learner on the tiny model that updates after a few labels, in a few small steps: what
    tests of the running loop need."""
    fast: dict[str, Any] = {
        "min_new_labels": 16,
        "micro_batch": 8,
        "steps_per_update": 4,
        "max_wait_s": 0.5,
        "min_labels_on_timer": 4,
        "poll_timeout_s": 0.1,
        "learning_rate": 1e-2,
        "model_id": TINY_MODEL_ID,
    }
    return LearnerSettings(data_dir=data_dir, model=str(model_dir), **{**fast, **overrides})
