"""A guardrail with no human rating at all: `kto-loop up` as `make run` starts it (the demo model,
every default, the canary on). People only chat; first on the base model, then the operator adds
a rule through the admin API (answers containing "good" are undesirable, others desirable), as
the README shows; the labeler labels every answer; the learner trains on those labels; the canary
judges the versions on them. The share of answers users saw containing the word must fall by at
least 70% (relative), and the versions' lineage must count the rule's labels.

"good" is the demo model's most frequent word: in about 0.35 of its answers (measured over 400
single-turn chats at 32 and at 64 tokens; 0.26 at 8). The premise is asserted (at least 0.3 over
400 answers before the rule) before the claim.
"""

from __future__ import annotations

import httpx
import pytest

from foundation.models import ensure_demo_model
from kto_loop.simulate import Raters, parse_rule, simulate
from registry import open_registry
from testkit.ports import free_port
from testkit.processes import log_tail, start, stop, wait_ready

pytestmark = [
    pytest.mark.slow,
    pytest.mark.stochastic(
        failure_rate="not measured",
        why="the simulated chats and the learner's updates are random; the margin is stated in the note of the "
        "issue that added it (labels without a person)",
    ),
]

WORD = "good"
BASE_ANSWERS = 400
ANSWERS = 1500
WINDOW = 300
MAX_TOKENS = 64
TOKEN = "guardrail-test-admin"
RULES = {
    "rules": [
        {"name": f"no-{WORD}", "kind": "contains", "phrases": [WORD], "label": "undesirable", "otherwise": "desirable"}
    ]
}


def test_a_rule_alone_teaches_the_loop_to_avoid_a_word(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    log = data_dir / "up.log"
    ensure_demo_model(data_dir)  # what `up` does first, here outside the readiness timeout
    env = {"KTO_DATA_DIR": str(data_dir), "KTO_PORT": str(port), "KTO_ADMIN_TOKEN": TOKEN}
    process = start("up", env, log, log_level="info")
    url = f"http://127.0.0.1:{port}"
    says = Raters((parse_rule(f"avoid:{WORD}"),))  # liked: the answer does not contain the word
    try:
        wait_ready(process, url, log, timeout_s=300)
        base = simulate(url, ratings=BASE_ANSWERS, users=60, raters=says, rate=False, max_tokens=MAX_TOKENS).turns
        put = httpx.put(f"{url}/v1/rules", json=RULES, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert put.status_code == 200, put.text
        run = simulate(url, ratings=ANSWERS, users=60, think_time=8.0, raters=says, rate=False, max_tokens=MAX_TOKENS)
        with open_registry(f"sqlite:///{data_dir / 'registry' / 'registry.sqlite3'}") as registry:
            history = registry.history()
            versions = registry.list_versions()
    finally:
        stop(process)
    assert not run.errors, run.errors[:3]
    last = run.turns[-WINDOW:]
    before = sum(not t.liked for t in base) / len(base)
    after = sum(not t.liked for t in last) / len(last)
    actions = [(e.action, e.actor) for e in history]
    windows = [run.turns[i : i + WINDOW] for i in range(0, len(run.turns), WINDOW)]
    shares = [round(sum(not t.liked for t in w) / len(w), 2) for w in windows]
    print(f"'{WORD}' in {before:.2f} of the base's answers -> {after:.2f} of the last {WINDOW}; by {WINDOW}: {shares}")
    print(f"history {actions}")
    assert {t.version for t in base} == {"kto-loop-demo"} and before >= 0.3, before  # the premise
    assert after <= 0.3 * before, (before, after, actions, log_tail(log))
    assert ("canary_promote", "canary-controller") in actions  # the product's way, canary on
    trained = [v.lineage.get("labels_by_source", {}) for v in versions]
    assert any(f"rule:no-{WORD}" in by_source for by_source in trained), trained
    assert all(set(by_source) <= {f"rule:no-{WORD}"} for by_source in trained)  # nobody rated
