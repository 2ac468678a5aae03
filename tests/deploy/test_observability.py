"""Prometheus' config and alert rules, and Grafana's dashboard, checked with promtool and against
the metrics the processes really export.

The names that exist are taken from live metrics objects (the server's, with its optional spool
and ledger collectors, and the learner's), never from a list written here: a metric renamed in
code and not in a dashboard fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ingest.spooled_bus import SpoolStatus
from learner.metrics import LearnerMetrics
from serve.metrics import ServeMetrics
from tests.deploy.test_compose import DEPLOY, PRODUCTION, bind_source, load_yaml, mounts
from tests.prometheus import promtool

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")

# The sample names each metric type exposes, by suffix (prometheus_client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "unknown": ("",),
}


class _EmptyQueue:
    def open_items(self) -> int:
        return 0

    def annotations(self) -> list:
        return []


def exported_names() -> set[str]:
    """Every sample name the server (spooled, with a ledger) and the learner (with a buffer) can export."""
    serve = ServeMetrics()
    serve.watch_ledger(lambda: 0)
    serve.watch_spool(lambda: SpoolStatus(0, 1, 0.0, 0, 0, True, None))
    serve.watch_annotations(_EmptyQueue())  # type: ignore[arg-type]  # only what the collector reads
    learner = LearnerMetrics()
    learner.watch_buffer(lambda: {"desirable": 0, "undesirable": 0, "pending": 0, "unreferenced": 0})
    names = set()
    for registry in (serve.registry, learner.registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The kto_* metric names a PromQL expression uses (string literals dropped first)."""
    return set(re.findall(r"\bkto_[A-Za-z0-9_]*", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside a collapsed row
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every query in every provisioned dashboard."""
    return [
        (f"{name}: {panel['title']}", target["expr"])
        for name, board in dashboards().items()
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


# ---- Prometheus ----


def test_alert_rules_pass_promtool():
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_their_conditions_and_only_then():
    """`promtool test rules`: each alert against series that should and should not fire it."""
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        case["alertname"]
        for test in load_yaml(ALERT_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a case where it fires"


def test_prometheus_config_passes_promtool_with_the_compose_mounts(tmp_path):
    """The config names its rule files by their path in the container: map each through the
    Prometheus service's bind mounts to the repository, then let promtool load everything."""
    service = load_yaml(PRODUCTION)["services"]["prometheus"]
    config_path = bind_source(DEPLOY, service, "/etc/prometheus/prometheus.yml")
    config = load_yaml(config_path)
    assert config.get("rule_files"), "no alert rules loaded"
    binds = {target: (DEPLOY / source).resolve() for kind, source, target in mounts(service) if kind == "bind"}
    local = []
    for path in config["rule_files"]:
        assert path in binds, f"rule file {path} is not mounted into the Prometheus container"
        local.append(str(binds[path]))
    assert ALERTS.resolve() in {Path(p) for p in local}
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump({**config, "rule_files": local}))
    done = promtool("check", "config", str(copy))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_name_scrape_jobs_that_exist():
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}
    used = {job for rule in alert_rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert used and used <= jobs, f"alerts name jobs {sorted(used - jobs)} that Prometheus does not scrape"


# ---- Grafana ----


def test_dashboard_is_provisioned_on_the_provisioned_data_source():
    provisioning = DEPLOY / "grafana" / "provisioning"
    uids = {
        source["uid"] for f in (provisioning / "datasources").glob("*.yml") for source in load_yaml(f)["datasources"]
    }
    boards = dashboards()
    assert "kto-loop.json" in boards
    assert len({board["uid"] for board in boards.values()}) == len(boards), "dashboard uids must differ"
    for name, board in boards.items():
        queried = [p for p in panels(board) if p.get("type") != "row"]
        assert queried, f"{name} has no panels"
        for panel in queried:
            assert panel["targets"] and all(t.get("expr") for t in panel["targets"]), panel["title"]
            for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
                assert source["type"] == "prometheus" and source["uid"] in uids, (panel["title"], source)


def test_dashboard_covers_what_operators_watch():
    used = set().union(*(metric_names(expr) for _, expr in dashboard_exprs()))
    for name in (
        "kto_feedback_total",
        "kto_request_duration_seconds_bucket",
        "kto_time_to_first_token_seconds_bucket",
        "kto_adapter_swaps_total",
        "kto_adapter_rollbacks_total",
        "kto_learner_canary_decisions_total",
        "kto_learner_loss",
        "kto_learner_z0",
        "kto_learner_reward",
        "kto_learner_consumer_lag_records",
        "kto_spool_depth",
        "kto_implicit_signals_total",
        "kto_learner_labels_trained_total",
        "kto_annotation_queue_open",
        "kto_annotation_agreement",
    ):
        assert name in used, f"the dashboard does not show {name}"


# ---- both, against the code ----


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_is_exported(source):
    exprs = dashboard_exprs() if source == "dashboard" else [(r["alert"], r["expr"]) for r in alert_rules()]
    exported = exported_names()
    assert exprs
    for where, expr in exprs:
        names = metric_names(expr)
        # Only the down alerts may do without one: `up` is Prometheus' own series for each target.
        assert names or re.fullmatch(r'up\{job="[^"]+"\} == 0', expr.strip()), f"{where}: no kto_ metric in {expr}"
        assert names <= exported, f"{where}: {sorted(names - exported)} is exported by neither process"


def test_metric_names_are_parsed_out_of_promql():
    expr = 'sum by (version) (rate(kto_feedback_total{label="kto_not_a_metric"}[5m])) / on() kto_x_seconds_bucket'
    assert metric_names(expr) == {"kto_feedback_total", "kto_x_seconds_bucket"}
    assert "kto_nope_total" not in exported_names() and "kto_feedback_total" in exported_names()
