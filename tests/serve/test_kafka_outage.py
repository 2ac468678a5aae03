"""Serving while Kafka is away: the local spool keeps chat and feedback working, says when it is
full, and delivers every acknowledged rating exactly once after the broker comes back."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ingest.events import Topics
from ingest.kafka_bus import KafkaBus
from learner.buffer import ReplayBuffer
from learner.consumer import EventJoiner
from serve.app import create_app
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.ports import free_port
from testkit.waiting import wait_for
from tests.serve.conftest import LOCAL
from tests.services import PrivateKafka

ALICE = {"X-User-Id": "alice"}
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
WAIT_S = 120.0  # a Kafka restart on a loaded 2-core box takes a while


def dead_kafka_url() -> str:
    return f"kafka://127.0.0.1:{free_port()}"  # nothing listens there


def on_kafka(settings: ServeSettings, url: str, **changes: object) -> ServeSettings:
    return settings.model_copy(update={"bus_url": url, "bus_timeout_s": 1.0, **changes})


def metric(client: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no metric {name}")


def answer(client: TestClient) -> str:
    reply = client.post("/v1/chat/completions", json=HELLO, headers=ALICE)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def test_chat_and_feedback_work_while_kafka_is_unreachable(settings: ServeSettings) -> None:
    started = time.monotonic()
    with TestClient(create_app(on_kafka(settings, dead_kafka_url())), client=LOCAL) as client:
        rid = answer(client)
        vote = client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE)
        assert vote.status_code == 202 and vote.json()["status"] == "recorded"
        assert metric(client, "kto_spool_depth") == 2  # the response and the rating, durable, waiting
        assert metric(client, "kto_spool_oldest_age_seconds") >= 0
        wait_for(
            lambda: client.get("/readyz").json()["spool"]["bus_reachable"] is False,
            what="the outage noticed",
            timeout_s=WAIT_S,
        )
        ready = client.get("/readyz")
        # Still ready: chat works. The body says where the events are.
        assert ready.status_code == 200 and ready.json()["checks"]["bus"] is True
        assert ready.json()["spool"]["depth"] == 2 and "Kafka" in ready.json()["spool"]["last_error"]
        assert metric(client, "kto_bus_up") == 0
    assert time.monotonic() - started < 60  # no request, nor the shutdown, waited out Kafka's timeouts


def test_a_full_spool_refuses_feedback_and_chat_with_503(settings: ServeSettings) -> None:
    app = create_app(on_kafka(settings, dead_kafka_url(), spool_max_events=3))
    with TestClient(app, client=LOCAL) as client:
        first, second = answer(client), answer(client)
        assert client.post("/v1/feedback", json={"response_id": first, "label": "up"}, headers=ALICE).status_code == 202
        refused = client.post("/v1/feedback", json={"response_id": second, "label": "down"}, headers=ALICE)
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        error = refused.json()["error"]
        assert error["code"] == "spool_full" and error["type"] == "service_unavailable"
        assert "spool is full" in error["message"] and "nothing was recorded" in error["message"]
        assert app.state.serve.ledger.lookup(second).label is None  # the refused vote left no trace
        # Repeating a recorded vote writes nothing, so it is still answered.
        again = client.post("/v1/feedback", json={"response_id": first, "label": "up"}, headers=ALICE)
        assert again.status_code == 202 and again.json()["status"] == "unchanged"
        # Chat is refused before generating: an answer that could not be logged is never sent.
        chat = client.post("/v1/chat/completions", json=HELLO, headers=ALICE)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "spool_full"
        streamed = client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=ALICE)
        assert streamed.status_code == 503
        assert metric(client, "kto_spool_rejected_total") == 1
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["bus"] is False


class Rater(threading.Thread):
    """Chats and rates each answer once, over and over; keeps the event ids of ratings that got 202."""

    def __init__(self, url: str) -> None:
        super().__init__(name="rater", daemon=True)
        self.url = url
        self.acked: dict[str, str] = {}  # response_id -> feedback event id
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._rate()
        except Exception as exc:  # reported by wait_for_more
            self.failures.append(repr(exc))

    def _rate(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            i = 0
            while not self.stop.is_set():
                headers = {"X-User-Id": f"user{i}"}  # a user per answer: many people, each within the limits
                chat = http.post("/v1/chat/completions", json=HELLO, headers=headers)
                if chat.status_code != 200:
                    self.failures.append(f"chat {chat.status_code}: {chat.text}")
                    continue
                rid = chat.json()["id"]
                vote = http.post(
                    "/v1/feedback", headers=headers, json={"response_id": rid, "label": "up" if i % 2 else "down"}
                )
                if vote.status_code == 202:
                    self.acked[rid] = vote.json()["id"]
                else:
                    self.failures.append(f"feedback {vote.status_code}: {vote.text}")
                i += 1

    def wait_for_more(self, n: int) -> None:
        target = len(self.acked) + n
        wait_for(lambda: len(self.acked) >= target or not self.is_alive(), what=f"{n} more ratings", timeout_s=WAIT_S)
        assert self.is_alive() and not self.failures, self.failures


@pytest.mark.kafka
def test_a_broker_restart_mid_stream_loses_and_duplicates_no_acknowledged_rating(
    settings: ServeSettings, tmp_path: Path
) -> None:
    kafka = PrivateKafka(tmp_path / "kafka")  # ours alone: the session's broker is never restarted
    try:
        with BackgroundServer(on_kafka(settings, kafka.url, bus_timeout_s=2.0)) as server:
            spool = server.state.spool
            rater = Rater(server.url)
            rater.start()
            try:
                rater.wait_for_more(10)
                kafka.stop(kill=True)
                rater.wait_for_more(10)  # chat and feedback go on while the broker is gone
                assert spool.status().depth > 0
                kafka.start()
                wait_for(lambda: spool.status().bus_up, what="the broker back", timeout_s=WAIT_S)
                rater.wait_for_more(10)
            finally:
                rater.stop.set()
                rater.join(timeout=60)
            assert not rater.failures, rater.failures
            assert spool.flush(WAIT_S), spool.status()
        acked = dict(rater.acked)

        # The learner's side: join everything on the broker into a replay buffer.
        bus = KafkaBus.from_url(kafka.url, session_timeout_s=3.0, heartbeat_interval_s=0.5)
        with (
            ReplayBuffer(tmp_path / "buffer.sqlite3") as buffer,
            EventJoiner(bus, Topics(settings.topic_prefix), buffer, group_id=f"g-{uuid.uuid4().hex}") as joiner,
        ):

            def caught_up() -> bool:
                joiner.poll_once(timeout_s=0.5)
                return all(buffer.get(rid) is not None for rid in acked) and joiner.lag() == 0

            wait_for(caught_up, what="the learner caught up", timeout_s=WAIT_S)
            counts = buffer.counts()
            examples = {rid: buffer.get(rid).feedback_event_id for rid in acked}  # type: ignore[union-attr]
        bus.close()
        # Every rating that got 202 is in the buffer, exactly once, and nothing else is.
        assert examples == acked
        assert counts["desirable"] + counts["undesirable"] == len(acked)
    finally:
        kafka.stop()
