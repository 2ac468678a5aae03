"""Hot-swap benchmark: from the learner's `registry.activate(v)` to the first answer served by v.

K adapters (LoRA rank 16 on q/k/v/o, random weights) are published into the server's own
registry. For each in turn: t0, `registry.activate(version, actor="bench")` called directly, as
the learner does (not through the admin API, which switches its replica before answering), then
completions with max_tokens 1 are sent back to back until one comes back with `model` equal to
the version; activation-to-served = the moment that response arrived - t0. It is run on an idle
server and again with background streaming clients (max_tokens 64, temperature 1.0).

The server reads the pointer every `registry_poll_s` (0.2 s by default), so every swap waits
0 to registry_poll_s (on average half of it) before the server even notices: that is the floor
of this latency, reported beside it. The rest is the server's own work, read per swap from its
/metrics histograms (deltas of their _sum): `kto_adapter_swap_duration_seconds` (pointer change
seen -> new version serving: checksums, compatibility check, load, retain) and
`kto_adapter_load_duration_seconds` (the engine's load of the weights alone).

The very first adapter also wraps the base model in PEFT; it is activated once before the
timed swaps and reported on its own. Every timed swap loads a fresh version (names are
immutable, and re-activating a loaded version would skip the load).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.live import Clients, LiveServer, complete, stream

logger = logging.getLogger(__name__)

SWAP_TIMEOUT_S = 60.0


def measure(server: LiveServer, plan, adapter_dirs: list[Path], model_id: str) -> dict[str, Any]:
    registry = server.state.registry
    versions = [
        registry.publish(path, base_model=model_id, parent=None, metrics={}, lineage={"source": "bench"}).version
        for path in adapter_dirs
    ]
    first, idle, loaded = versions[0], versions[1 : plan.adapters + 1], versions[plan.adapters + 1 :]
    with httpx.Client(timeout=300) as client:
        first_swap = _swap(server, client, first)
        conditions = [_condition(server, client, "idle", idle)]
        background = Clients(
            plan.background,
            lambda c, seed: stream(c, server.url, max_tokens=plan.max_tokens, temperature=1.0, seed=seed),
            seed_base=7,
        ).start()
        try:
            time.sleep(1.0)  # let the background batch fill
            conditions.append(_condition(server, client, f"{plan.background} streaming clients", loaded))
        finally:
            background.stop()
    conditions[-1]["background"] = {
        "clients": plan.background,
        "requests": len(background.replies),
        "errors": len(background.errors),
    }
    return {
        "registry_poll_s": server.state.settings.registry_poll_s,
        "lora_rank": plan.lora_rank,
        "first_swap": first_swap,
        "conditions": conditions,
    }


def _condition(server: LiveServer, client: httpx.Client, name: str, versions: list[str]) -> dict[str, Any]:
    meter = report.CpuMeter()
    swaps = [_swap(server, client, version) for version in versions]
    cpu = meter.stop()
    ok = [s for s in swaps if s["served"]]
    logger.info(
        "hot-swap (%s): p50 %.3f s over %d swaps",
        name,
        report.percentile([s["activation_to_served_s"] for s in ok], 50),
        len(ok),
    )
    return {
        "name": name,
        "swaps": len(swaps),
        "timeouts": len(swaps) - len(ok),
        "activation_to_served_s": report.summary([s["activation_to_served_s"] for s in ok]),
        "activate_call_s": report.summary([s["activate_call_s"] for s in swaps]),
        "server_swap_s": report.summary([s["server_swap_s"] for s in ok]),
        "adapter_load_s": report.summary([s["adapter_load_s"] for s in ok]),
        "probe_request_s": report.summary([s["probe_request_s"] for s in ok]),
        "probes_per_swap": report.summary([s["probes"] for s in ok]),
        "cpu": cpu,
        "each": swaps,
    }


def _swap(server: LiveServer, client: httpx.Client, version: str) -> dict[str, Any]:
    """Activate `version` and probe until a response names it; the server's metrics read around it."""
    load_before = server.metric("kto_adapter_load_duration_seconds_sum")
    swap_before = server.metric("kto_adapter_swap_duration_seconds_sum")
    registry = server.state.registry
    t0 = time.perf_counter()
    registry.activate(version, actor="bench", reason="serving benchmark")
    activated = time.perf_counter() - t0
    probes, served, reply = 0, False, None
    while time.perf_counter() - t0 < SWAP_TIMEOUT_S:
        reply = complete(client, server.url, max_tokens=1, temperature=0.0)
        probes += 1
        if reply.model == version:
            served = True
            break
    if not served:
        logger.warning("version %s was not served within %.0f s of its activation", version, SWAP_TIMEOUT_S)
    return {
        "version": version,
        "served": served,
        "probes": probes,
        "activation_to_served_s": (reply.started + reply.seconds - t0) if served and reply else None,
        "activate_call_s": activated,
        "probe_request_s": reply.seconds if reply else None,
        "server_swap_s": server.metric("kto_adapter_swap_duration_seconds_sum") - swap_before,
        "adapter_load_s": server.metric("kto_adapter_load_duration_seconds_sum") - load_before,
    }


def table(results: dict[str, Any], poll_s: float) -> str:
    rows = []
    for c in results["conditions"]:
        a, s, ld = c["activation_to_served_s"], c["server_swap_s"], c["adapter_load_s"]
        rows.append(
            [
                c["name"],
                f"{c['swaps'] - c['timeouts']}/{c['swaps']}",
                a["p50"],
                a["p99"],
                a["max"],
                s["p50"],
                ld["p50"],
                ld["p99"],
                c["probe_request_s"]["p50"],
                c["cpu"]["other_cores"],
            ]
        )
    f = results["first_swap"]
    rows.append(
        [
            "first adapter (wraps base in PEFT)",
            "1/1" if f["served"] else "0/1",
            f["activation_to_served_s"],
            "",
            "",
            f["server_swap_s"],
            f["adapter_load_s"],
            "",
            f["probe_request_s"],
            "",
        ]
    )
    return report.table(
        f"3. Hot-swap: registry.activate -> first response from that version; rank {results['lora_rank']} "
        f"q/k/v/o; server polls the pointer every {poll_s:g} s (floor: 0-{poll_s:g} s, mean {poll_s / 2:g} s)",
        [
            "condition",
            "served",
            "p50 s",
            "p99 s",
            "max s",
            "server swap p50 s",
            "load p50 s",
            "load p99 s",
            "probe p50 s",
            "other cores",
        ],
        rows,
    )
