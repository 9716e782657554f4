"""Prometheus and Grafana as configured for the compose stack: promtool checks the configuration, the alert rules
and their unit tests; every dashboard query is valid PromQL; the dashboard covers the service's metric contract and
names no fixed datasource. Also the PromQL reader the other deployment tests use."""

from __future__ import annotations

import yaml
from support.deploy import GRAFANA, PROMETHEUS, RULE_TESTS, RULES, load_yaml, promtool, run
from support.promql import (
    CONTRACT_METRICS,
    DCGM_DEFAULT_COUNTERS,
    alert_rules,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    grafana_to_promql,
    grouping_labels,
    metric_names,
    selectors,
)


def test_promtool_checks_prometheus_config():
    result = run([promtool(), "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_alert_rules():
    result = run([promtool(), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    names = {r["alert"] for r in alert_rules()}
    # The four the deployment promises: slow, backed up, failing, under attack.
    assert {"SoapHighP99Latency", "SoapQueueGrowing", "SoapServerErrors", "SoapSuspiciousInputSpike"} <= names


def test_alert_rules_name_no_scrape_job():
    """The job label is whatever the scrape configuration calls it (`soap`, `kubernetes-pods`, `soap/soap`...):
    no rule may select on it, or it would stay silent under the other setups."""
    for rule in alert_rules():
        assert not any(label == "job" for _, matchers in selectors(rule["expr"]) for label, _, _ in matchers), rule[
            "alert"
        ]
    assert {"SoapTargetDown", "SoapNoReadyReplica", "SoapComputeChildRestarts", "SoapMemoryGrowing"} <= {
        r["alert"] for r in alert_rules()
    }


def test_alert_rules_fire_on_their_patterns_only():
    """promtool's rule unit tests: each alert fires on synthetic series showing its problem and not otherwise."""
    result = run([promtool(), "test", "rules", str(RULE_TESTS)], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for t in load_yaml(RULE_TESTS)["tests"] for case in t.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert rule needs a unit test"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (as a recording rule), with Grafana's variables substituted."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisioned_and_covers_the_service():
    dash = dashboard()
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:  # no two panels overlap on the 24-column grid
        g = p["gridPos"]
        assert g["x"] >= 0
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine

    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    # compose provisions Prometheus as the default data source, which the `datasource` variable starts on
    assert datasource["isDefault"] is True
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "soap.yml")["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"

    used = metric_names(" ".join(e for _, e in dashboard_exprs()))
    missing = {m for m in CONTRACT_METRICS if not any(u == m or u.startswith(m + "_") for u in used)}
    assert not missing, f"dashboard shows nothing of {sorted(missing)}"
    gpu = {u for u in used if u.startswith("DCGM_")}
    assert gpu, "no panel reads a DCGM (GPU) metric"
    assert gpu <= DCGM_DEFAULT_COUNTERS, f"GPU panels read {sorted(gpu)}"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model", "instance"}
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "request rate",
        "p50, p90, p99",
        "queue wait",
        "batch size",
        "queue depth",
        "rejections",
        "ε distribution",
        "auxiliary loss",
        "suspicious",
        "gpu utilisation",
        "in-flight",
        "resident memory",
        "cpu by process",
        "open files",
        "compute child restarts",
        "batch failures",
        "build",
    ):
        assert topic in titles, f"no panel about {topic}"


def datasource_refs(node, where: str = "dashboard") -> list[tuple[str, object]]:
    """Every `datasource` value anywhere in the dashboard JSON, with where it is."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append((where, value))
            found += datasource_refs(value, f"{where}.{node.get('title') or node.get('name') or key}")
    elif isinstance(node, list):
        for item in node:
            found += datasource_refs(item, where)
    return found


def test_dashboard_names_no_fixed_datasource():
    """Importable into any Grafana: every panel, query and variable reads the data source through the
    `datasource` variable (a Prometheus picker), never a fixed uid, which an existing Grafana would not have."""
    dash = dashboard()
    (picker,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert picker["type"] == "datasource"
    assert picker["query"] == "prometheus"
    refs = datasource_refs(dash)
    assert len(refs) >= len([p for p in dashboard_panels() if p["type"] != "row"]) * 2
    fixed = [(w, r) for w, r in refs if not isinstance(r, dict) or r.get("uid") != "${datasource}"]
    assert not fixed, f"fixed data sources: {fixed}"
    assert "__inputs" not in dash, "an import-time input would be a second way to pick the data source"


def test_promql_helpers_find_names_and_labels():
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(soap_request_duration_seconds_bucket"
        '{route="/classify",model=~"$model"}[5m]))) > 2 and on (model) up{job="soap"} == 0'
    )
    assert metric_names(expr) == {"soap_request_duration_seconds_bucket", "up"}
    assert selectors(expr)[0] == (
        "soap_request_duration_seconds_bucket",
        [("route", "=", "/classify"), ("model", "=~", "$model")],
    )
    assert grouping_labels(expr) == [({"le", "model"}, {"soap_request_duration_seconds_bucket"})]
