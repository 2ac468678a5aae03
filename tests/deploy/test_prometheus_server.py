"""A real Prometheus server against a running `kto-loop serve` and `kto-loop learn --port`.

Simulated users chat and rate while Prometheus scrapes both processes every second, with the
production alert rules loaded. Then PromQL must give the desirable rate per adapter version and
the learner's loss, every dashboard query must evaluate, and every alert rule must evaluate
without error on real series.
"""

from __future__ import annotations

import math
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kto_loop.simulate import simulate
from testkit.ports import free_port
from testkit.processes import start, stop, wait_ready
from tests.deploy.test_observability import ALERTS, alert_rules, dashboard_exprs
from tests.learner.loop_processes import LEARNER_ENV, MODEL_ID, VOWELS, build_char_model
from tests.prometheus import PrometheusServer, binaries, finite

RATINGS = 120
DESIRABLE_RATE = (
    'sum by (version) (increase(kto_feedback_total{label="desirable"}[5m]))'
    " / sum by (version) (increase(kto_feedback_total[5m]))"
)
# The same ratio from the counters themselves (since the server started): exact, to compare with.
DESIRABLE_SHARE = 'sum by (version) (kto_feedback_total{label="desirable"}) / sum by (version) (kto_feedback_total)'


def feedback_counts(url: str) -> dict[str, list[float]]:
    """version -> [desirable, all] from the server's own exposition."""
    counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "kto_feedback_total":
                counts[s.labels["version"]][0] += s.value if s.labels["label"] == "desirable" else 0
                counts[s.labels["version"]][1] += s.value
    return counts


def test_promql_gives_the_desirable_rate_per_version_and_the_learners_loss(tmp_path):
    binaries()  # skip (fail under CI) before starting anything when there is no Prometheus
    model = build_char_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    serve_port, learner_port = free_port(), free_port()
    # KTO_PORT is the server's: the learner, given the same environment, must listen on --port only.
    # New versions go live directly (no canary share): every version then serves everyone, so a
    # short run rates several of them.
    env = {
        "KTO_MODEL": str(model),
        "KTO_MODEL_ID": MODEL_ID,
        "KTO_DATA_DIR": str(data),
        "KTO_PORT": str(serve_port),
        "KTO_TORCH_THREADS": "1",
        **LEARNER_ENV,
        "KTO_MIN_NEW_LABELS": "24",
        "KTO_CANARY_SHARE": "0",
    }
    serve_url, learner_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{learner_port}"
    serve = start("serve", env, data / "serve.log")
    learner = start("learn", env, data / "learn.log", args=("--port", str(learner_port)))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "kto-serve", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"]}]},
            {"job_name": "kto-learner", "static_configs": [{"targets": [f"127.0.0.1:{learner_port}"]}]},
        ],
    }
    (tmp_path / "prometheus").mkdir()
    try:
        wait_ready(serve, serve_url, data / "serve.log")
        wait_ready(learner, learner_url, data / "learn.log", path="/healthz")
        with PrometheusServer(config, tmp_path / "prometheus") as prom:
            # Both targets up, and the base version's zero-valued feedback series scraped before any rating.
            prom.wait(lambda: prom.value('sum(up{job=~"kto-serve|kto-learner"})') == 2, what="both targets up")
            prom.wait(
                lambda: len(prom.query('kto_feedback_total{version="base"}')) == 2, what="the base's feedback series"
            )

            result = simulate(serve_url, ratings=RATINGS, users=4, prefixes=VOWELS, max_tokens=4)
            assert not result.errors, result.errors[:3]
            prom.wait(
                lambda: (prom.value("sum(kto_learner_updates_total)") or 0) >= 1, what="a learner update", timeout_s=120
            )
            exposed = feedback_counts(serve_url)  # no more ratings come: these are final
            total = sum(n for _, n in exposed.values())
            assert total >= RATINGS  # a user may rate once more while the others stop
            prom.wait(lambda: prom.value("sum(kto_feedback_total)") == total, what="the last ratings scraped")
            # increase() needs two samples of a series: a version first seen in that scrape needs one more.

            def two_samples() -> bool:
                samples = prom.value("min(count_over_time(kto_feedback_total[5m]))")
                assert samples is not None  # the series exist: their sum was just scraped
                return samples >= 2

            prom.wait(two_samples, what="a second sample")

            # ---- the desirable rate per version ----
            rated = {version: d / n for version, (d, n) in exposed.items() if n}
            assert "base" in rated and len(rated) >= 2, f"no adapter version was rated: {dict(exposed)}"
            share = {labels["version"]: value for labels, value in prom.query(DESIRABLE_SHARE)}
            for version, expected in rated.items():
                assert math.isclose(share[version], expected, abs_tol=1e-9), (version, share[version], expected)
            rate = {labels["version"]: value for labels, value in prom.query(DESIRABLE_RATE)}
            assert set(rated) <= set(rate), f"versions rated {sorted(rated)}, in the query {sorted(rate)}"
            for version, value in rate.items():
                # NaN: a version whose every rating came before Prometheus first saw its series.
                assert math.isnan(value) or 0 <= value <= 1, (version, value)
            # The base's series were scraped at zero before the first rating: nothing is missed.
            assert math.isclose(rate["base"], rated["base"], abs_tol=1e-9), (rate["base"], rated["base"])

            # ---- the learner's loss ----
            loss = prom.value('kto_learner_loss{job="kto-learner"}')
            assert finite(loss) and loss > 0, loss

            # ---- every dashboard query and alert rule evaluates on these series ----
            for where, expr in dashboard_exprs():
                query = expr.replace("$__rate_interval", "1m")
                assert "$" not in query, f"{where}: unknown Grafana variable in {expr}"
                prom.query(query)  # asserts status success
            expected_rules = {rule["alert"] for rule in alert_rules()}

            def rules_evaluated() -> bool:
                rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
                return {r["name"] for r in rules} == expected_rules and all(r["health"] != "unknown" for r in rules)

            prom.wait(rules_evaluated, what="every alert rule evaluated")
            broken = [
                (r["name"], r.get("lastError"))
                for g in prom.api("rules")["groups"]
                for r in g["rules"]
                if r["health"] != "ok"
            ]
            assert not broken, broken
    finally:
        stop(learner)
        stop(serve)
