"""The flood benchmark's flooding client (bench/flood.py): a process of its own, so that its
threads do not hold the measuring process's GIL while the users' latencies are timed."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from typing import Any

import httpx

FLOOD_ADDRESS = "127.0.0.2"  # a loopback address that is not in KTO_TRUSTED_PROXIES' default


class Flooder:
    """The flooding client, in a process of its own (spawned: no copy of this one's threads)."""

    def __init__(self, url: str, body: dict, threads: int, mode: str, key: str | None):
        context = multiprocessing.get_context("spawn")
        self.ready, self.go, self._stop = context.Event(), context.Event(), context.Event()
        self._out = context.Queue()
        args = (url, body, threads, mode, key, self.ready, self.go, self._stop, self._out)
        self.process = context.Process(target=flood, args=args, name="flooder", daemon=True)
        self.process.start()
        if not self.ready.wait(timeout=120):
            self.process.kill()
            raise RuntimeError("the flooding process did not start in 120 s")

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        result = self._out.get(timeout=300)
        self.process.join(timeout=30)
        return result


def flood(url: str, body: dict, threads: int, mode: str, key: str | None, ready, go, stop_flood, out) -> None:
    """The flooder process: `threads` connections sending `body` back to back from `go` to `stop_flood`;
    puts its counts (status code or exception name -> requests) and its CPU use on `out`."""
    counts: Counter[str] = Counter()
    first_429: list[float] = []  # monotonic: one clock for every process (Linux)
    lock = threading.Lock()

    def connection(number: int) -> None:
        # header mode: from an untrusted address, so the invented X-User-Id is not believed
        transport = httpx.HTTPTransport(local_address=FLOOD_ADDRESS) if mode == "header" else None
        fixed = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=url, timeout=120, transport=transport) as client:
            sent = 0
            while not stop_flood.is_set():
                sent += 1
                headers = fixed or {"X-User-Id": f"flood-{number}-{sent}"}
                try:
                    status = str(client.post("/v1/chat/completions", json=body, headers=headers).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    counts[status] += 1
                    if status == "429" and not first_429:
                        first_429.append(time.monotonic())

    ready.set()
    go.wait()
    started, cpu_started = time.monotonic(), time.process_time()
    pool = [threading.Thread(target=connection, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    stop_flood.wait()
    for t in pool:
        t.join(timeout=120)
    seconds = time.monotonic() - started
    sent = sum(counts.values())
    out.put(
        {
            "threads": threads,
            "sent": sent,
            "ok": counts["200"],
            "rate_limited": counts["429"],
            "other": sent - counts["200"] - counts["429"],
            "status": dict(counts),
            "requests_per_s": sent / seconds,
            "ok_per_s": counts["200"] / seconds,
            "first_429_at": first_429[0] if first_429 else None,
            "first_429_s": first_429[0] - started if first_429 else None,
            "cpu_cores": (time.process_time() - cpu_started) / seconds,
            "seconds": seconds,
        }
    )
