"""Hot-swap under load: 8 streaming clients while 20 versions are activated in turn.

Zero failed requests, and every response names a version that was active when it started.
A version V_k counts as active from the moment its activation call was sent until the next
activation call returned; a request started at s whose first chunk came at f must have been
pinned to a version active somewhere in [s, f].
"""

from __future__ import annotations

import json
import threading
import time

import httpx

from testkit.waiting import wait_for
from tests.serve.conftest import ADMIN
from tests.tiny import TINY_MODEL_ID

CLIENTS = 8
VERSIONS = 20


def stream_once(client: httpx.Client, url: str, user: str) -> tuple[float, float | None, str | None, bool]:
    """(started, first chunk's time, its model, [DONE] seen); None, None when no chunk came."""
    started = time.monotonic()
    first: float | None = None
    model: str | None = None
    done = False
    body = {"messages": [{"role": "user", "content": "Tell me something"}], "max_tokens": 12, "stream": True}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"X-User-Id": user}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if first is None:
                first, model = time.monotonic(), chunk["model"]
    return started, first, model, done


def test_swap_under_load(live_server, make_adapter):
    registry = live_server.state.registry
    versions = [
        registry.publish(make_adapter(100 + i), base_model=TINY_MODEL_ID, parent=None, metrics={}, lineage={}).version
        for i in range(VERSIONS)
    ]
    results: list[tuple[float, float | None, str | None, bool]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:  # a new user each time: many people, each within the per-user limits
                    results.append(stream_once(client, live_server.url, f"load-{len(results)}-{len(failures)}"))
                except Exception as exc:  # any failure at all fails the test below
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    windows = []  # (version, sent, returned)
    try:
        with httpx.Client(timeout=60, headers=ADMIN) as admin:
            wait_for(lambda: results or failures, what="a first answer under load", timeout_s=30)
            for version in versions:
                sent = time.monotonic()
                reply = admin.post(f"{live_server.url}/v1/adapters/{version}/activate")
                assert reply.status_code == 200, reply.text
                windows.append((version, sent, time.monotonic()))
                # let each version answer before the next swap

                def answered(version: str = version) -> object:
                    return failures or any(r[2] == version for r in list(results))

                wait_for(answered, what=f"an answer from {version}", timeout_s=30, interval_s=0.02)
        time.sleep(0.3)  # deliberate, no condition: the clients stream on a while after the last swap
    finally:  # the clients stop whatever happened: they are not daemon threads
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert failures == []
    assert len(results) >= 2 * CLIENTS
    assert all(done for *_, done in results)
    active_from = {v: sent for v, sent, _ in windows}
    active_until = {
        v: windows[i + 1][2] if i + 1 < len(windows) else float("inf") for i, (v, _, _) in enumerate(windows)
    }
    active_from[TINY_MODEL_ID], active_until[TINY_MODEL_ID] = float("-inf"), windows[0][2]
    served = set()
    for started, first, model, _ in results:
        assert model is not None and model in active_from, model
        assert first is not None  # set with the model
        assert active_from[model] <= first and started <= active_until[model], (model, started, first)
        served.add(model)
    assert served >= set(versions)  # every version answered while the others were streaming
    # only the active and previous versions stay loaded once the load is gone
    assert len(live_server.state.engine.loaded_versions) <= 2
