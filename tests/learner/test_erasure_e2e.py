"""Erasing a user end to end on the embedded default: `kto-loop up`, a user whose ratings trained a
version, an operator's DELETE /v1/users/{user}; the learner's buffer forgets them, the version is
flagged and the history records the erasure, with no user id in either."""

from __future__ import annotations

import json
import sqlite3

import httpx

from testkit.ports import free_port
from testkit.processes import start, stop, wait_ready
from testkit.waiting import wait_for
from tests.learner.loop_processes import LEARNER_ENV, MODEL_ID, build_char_model

ADMIN = {"Authorization": "Bearer erasure-test"}
WAIT_S = 120.0
"""Seconds a wait for the learner allows."""


def rate_some(client: httpx.Client, user: str, n: int) -> list[str]:
    """`n` answers to `user`, each rated; the feedback event ids."""
    ids = []
    for i in range(n):
        reply = client.post(
            "/v1/chat/completions",
            headers={"X-User-Id": user},
            json={"messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 4},
        )
        reply.raise_for_status()
        vote = client.post(
            "/v1/feedback",
            headers={"X-User-Id": user},
            json={"response_id": reply.json()["id"], "label": "up" if i % 2 else "down"},
        )
        assert vote.status_code == 202, vote.text
        ids.append(vote.json()["id"])
    return ids


def test_an_erased_users_data_leaves_the_learner_and_flags_its_versions(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    data_dir.mkdir()
    env = {
        "KTO_MODEL": str(build_char_model(tmp_path / "model")),
        "KTO_MODEL_ID": MODEL_ID,
        "KTO_DATA_DIR": str(data_dir),
        "KTO_PORT": str(port),
        "KTO_ADMIN_TOKEN": "erasure-test",
        **LEARNER_ENV,
    }
    log = data_dir / "up.log"
    process = start("up", env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, url, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            erins = set(rate_some(client, "erin", 12))
            rate_some(client, "frank", 24)  # enough labels for an update (KTO_MIN_NEW_LABELS 32)
            versions = wait_for(
                lambda: [
                    v["version"]
                    for v in client.get("/v1/adapters", headers=ADMIN).json()["versions"]
                    if erins & set(v["lineage"].get("feedback_event_ids", []))
                ],
                what="a version trained on erin's ratings",
                timeout_s=WAIT_S,
                interval_s=0.5,
            )

            erased = client.delete("/v1/users/erin", params={"reason": "ticket 7"}, headers=ADMIN)
            assert erased.status_code == 202, erased.text
            request_id = erased.json()["request_id"]
            entry = wait_for(
                lambda: next(
                    (
                        h
                        for h in client.get("/v1/adapters/history", headers=ADMIN).json()["history"]
                        if h["action"] == "erasure" and h["evidence"]["request_id"] == request_id
                    ),
                    None,
                ),
                what="the erasure in the history",
                timeout_s=WAIT_S,
                interval_s=0.5,
            )
            assert entry is not None  # wait_for returns only what is truthy
            assert set(versions) <= set(entry["evidence"]["flagged_versions"])
            assert entry["evidence"]["removed"]["examples"] == 12 and entry["reason"] == "ticket 7"
            page = client.get(f"/v1/adapters/{versions[0]}", headers=ADMIN).json()
            assert request_id in [f["erasure"] for f in page["flags"]]
            assert any(h["action"] == "erasure" for h in page["history"])
            assert "erin" not in json.dumps(page)
            # Her answers can no longer be rated; Frank's data is untouched.
            assert rate_some(client, "frank", 1)
    finally:
        stop(process)
    with sqlite3.connect(data_dir / "learner" / "buffer.sqlite3") as buffer:
        users = {u for (u,) in buffer.execute("SELECT DISTINCT user FROM responses")}
        pending = buffer.execute("SELECT COUNT(*) FROM pending WHERE user = 'erin'").fetchone()[0]
    assert users == {"frank"} and pending == 0
