"""Acceptance (issue 15): `kto-loop up` whose data directory fills up under chat and feedback load.

The data directory is a small tmpfs (tests/tmpfs.py: root needed, as CI runs; a failure under
CI=true). `kto-loop up` runs with the product's defaults but the model (the tiny test model, kept
outside the small disk) and the learner's metrics port (to watch it train). Clients chat and rate
all along; a ballast file fills the disk; then it is deleted.

Asserted: no request ever answers 500 (only 200, 202 or 507); chat and feedback answer 507
`disk_full` while the disk is full; /readyz is 503 with `disk` false, and reports the learner,
still the same process, waiting for space; once space is freed /readyz is 200 again, chat and
feedback are answered, and the learner trains again; every chat answered 200 has its response
event on the bus and every rating answered 202 its feedback event, read back with the bus's own
consumer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.bus import open_bus
from ingest.events import FeedbackEvent, ResponseEvent, Topics, decode_event
from testkit.ports import free_port
from testkit.processes import assert_running, log_on_failure, start, stop, wait_ready
from testkit.waiting import wait_for
from tests.tiny import TINY_MODEL_ID
from tests.tmpfs import MiB, fill, small_disk

pytestmark = pytest.mark.slow

DISK_BYTES = 64 * MiB
"""The data directory's disk: room for minutes of this load; its reserve is 5% of it (3.2 MiB)."""
CLIENTS = 4
PAUSE_S = 0.25
"""After a refused chat: a full disk answers at once, and one user re-rating faster than this would
meet the per-user feedback limit (300 a minute)."""
WAIT_S = 180.0


@dataclass
class Load:
    """Clients that chat and rate back to back, each request's outcome kept."""

    url: str
    statuses: list[tuple[float, str, int, str | None]] = field(default_factory=list)
    """(when, "chat" or "feedback", status, the error code)"""
    answered: set[str] = field(default_factory=set)
    """Chats answered 200: their response ids."""
    rated: set[str] = field(default_factory=set)
    """Ratings answered 202: their feedback event ids."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, client_no: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            turn, last = 0, None  # the latest answer: its id, its user, the label it has (or gets now)
            while not self.stop.is_set():
                turn += 1
                user = {"X-User-Id": f"user-{client_no}-{turn}"}
                chat = http.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": f"hello {turn}"}], "max_tokens": 8},
                    headers=user,
                )
                self._note("chat", chat)
                if chat.status_code == 200:
                    self.answered.add(chat.json()["id"])
                    last = (chat.json()["id"], user, "up" if turn % 2 else "down")
                elif last is None:
                    time.sleep(PAUSE_S)
                    continue
                else:  # no new answer: its user changes their mind on the last one (a write, unlike a repeat)
                    time.sleep(PAUSE_S)
                response_id, by, label = last
                if chat.status_code != 200:
                    label = "down" if label == "up" else "up"
                rating = http.post("/v1/feedback", json={"response_id": response_id, "label": label}, headers=by)
                self._note("feedback", rating)
                if rating.status_code == 202:
                    self.rated.add(rating.json()["id"])
                    last = (response_id, by, label)

    def _note(self, what: str, reply: httpx.Response) -> None:
        code = reply.json().get("error", {}).get("code") if reply.status_code >= 400 else None
        self.statuses.append((time.monotonic(), what, reply.status_code, code))

    def seen(self, what: str, status: int, since: float = 0.0) -> bool:
        return any(w == what and s == status and t >= since for t, w, s, _ in self.statuses)


def learner_metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_a_full_disk_under_load_is_answered_and_nothing_acknowledged_is_lost(tmp_path, tiny_model_dir):
    with small_disk(tmp_path / "data", DISK_BYTES) as data:
        port, learner_port = free_port(), free_port()
        env = {
            "KTO_DATA_DIR": str(data),
            "KTO_PORT": str(port),
            "KTO_MODEL": str(tiny_model_dir),
            "KTO_MODEL_ID": TINY_MODEL_ID,
            "KTO_METRICS_PORT": str(learner_port),
        }
        log = tmp_path / "up.log"  # not on the small disk: the log must not fill it, nor stop with it
        up = start("up", env, log, log_level="info")
        url = f"http://127.0.0.1:{port}"
        load = Load(url)
        clients = [threading.Thread(target=load.run, args=(n,), daemon=True) for n in range(CLIENTS)]
        try:
            wait_ready(up, url, log)
            learner = httpx.get(f"{url}/readyz").json()["processes"]["learner"]
            for client in clients:
                client.start()

            def trained() -> bool:
                assert_running(up)
                return learner_metric(learner_port, "kto_learner_updates_total") >= 1

            with log_on_failure(log):
                wait_for(trained, what="a first update", timeout_s=WAIT_S, interval_s=0.5)

                ballast = fill(data)
                full_at = time.monotonic()

                def answered_as_full() -> dict | None:
                    assert_running(up)
                    ready = httpx.get(f"{url}/readyz", timeout=10)
                    refused = load.seen("chat", 507, full_at) and load.seen("feedback", 507, full_at)
                    waiting = learner_metric(learner_port, "kto_learner_waiting_for_disk") == 1
                    return ready.json() if refused and waiting and ready.status_code == 503 else None

                ready = wait_for(answered_as_full, what="507s, /readyz 503, a waiting learner", timeout_s=WAIT_S)
                assert ready is not None
                assert ready["checks"]["disk"] is False and ready["checks"]["learner"] is True
                assert ready["processes"]["learner"] == learner  # the same process, never restarted
                time.sleep(2)  # deliberate, no condition: the load goes on against the full disk a while

                ballast.unlink()
                freed_at = time.monotonic()
                updates = learner_metric(learner_port, "kto_learner_updates_total")

                def resumed() -> bool:
                    assert_running(up)
                    return (
                        httpx.get(f"{url}/readyz", timeout=10).status_code == 200
                        and load.seen("chat", 200, freed_at)
                        and load.seen("feedback", 202, freed_at)
                        and learner_metric(learner_port, "kto_learner_updates_total") > updates
                    )

                wait_for(resumed, what="chat, feedback and training to resume", timeout_s=WAIT_S, interval_s=0.5)
        finally:
            load.stop.set()
            for client in clients:
                if client.is_alive():
                    client.join(timeout=60)
            stop(up)

        bus = open_bus(f"sqlite:///{data / 'bus.sqlite3'}")
        topics = Topics("kto")
        consumer = bus.consumer("acceptance-check", [topics.responses, topics.feedback])
        events = []
        while records := consumer.poll(timeout_s=1.0, max_records=10_000):  # nothing writes any more
            events += [decode_event(r.value) for r in records]
        consumer.close()
        bus.close()

    statuses = {(what, status, code) for _, what, status, code in load.statuses}
    assert {s for _, s, _ in statuses} <= {200, 202, 507}, sorted(statuses)  # no 500, no other refusal
    assert ("chat", 507, "disk_full") in statuses and ("feedback", 507, "disk_full") in statuses
    assert load.answered <= {e.response_id for e in events if isinstance(e, ResponseEvent)}
    assert load.rated <= {e.event_id for e in events if isinstance(e, FeedbackEvent)}
