"""The queries of the deployment (alert rules, dashboard panels, the autoscaler's triggers), the series they may
name, and a small PromQL reader: the metric names, label selectors and groupings of an expression."""

from __future__ import annotations

import json
import re

from support.deploy import DASHBOARD, OVERLAYS, RULES, kustomize, load_yaml

# The metric families of the contract (service/metrics.py, listed in docs/service.md); the dashboard shows every one.
CONTRACT_METRICS = {
    "soap_request_duration_seconds",
    "soap_queue_wait_seconds",
    "soap_batch_compute_seconds",
    "soap_batch_size_images",
    "soap_purification_epsilon",
    "soap_aux_loss_before",
    "soap_aux_loss_after",
    "soap_rejections_total",
    "soap_queue_depth_images",
    "soap_suspicious_inputs_total",
    "soap_images_total",
    "soap_model_info",
    "soap_ready",
}


# dcgm-exporter's default counters the dashboard's GPU row reads (exporter profile gpu-metrics).
DCGM_DEFAULT_COUNTERS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
}


def alert_rules() -> list[dict]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends: template variables substituted."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$model", ".*")
        .replace("$instance", ".*")
    )


def scaled_object() -> dict:
    return next(d for d in kustomize(OVERLAYS["autoscaling"]) if d["kind"] == "ScaledObject")


def rule_and_dashboard_exprs() -> list[tuple[str, str]]:
    """Every query of the deployment: alert rules, dashboard panels and the autoscaler's triggers."""
    return (
        [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        + [(f"panel {t}", grafana_to_promql(e)) for t, e in dashboard_exprs()]
        + [(f"KEDA trigger {t['name']}", t["metadata"]["query"]) for t in scaled_object()["spec"]["triggers"]]
    )


PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "predict_linear",
    "histogram_quantile",
    "abs",
    "ceil",
    "floor",
    "round",
    "clamp_min",
    "clamp_max",
    "label_replace",
    "label_join",
    "vector",
    "scalar",
    "time",
    "min_over_time",
    "max_over_time",
    "avg_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "absent",
    "absent_over_time",
    "changes",
    "resets",
    "sort",
    "sort_desc",
    "inf",
    "nan",
    "le",
}


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in PromQL: identifiers that are not functions, keywords, label names in {...} or by (...),
    durations or numbers."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges
    text = re.sub(r"\boffset\s+-?(\d+[a-z]+)+", " ", text)  # `offset 70m`: its duration is no metric
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        follows = text[m.end() :].lstrip()[:1]
        if word in PROMQL_WORDS or follows == "(":
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for every `metric{...}` selector."""
    out = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2))
        out.append((m.group(1), matchers))
    return out


def grouping_labels(expr: str) -> list[tuple[set[str], set[str]]]:
    """(labels, metrics aggregated) for every `agg by (labels) (...)`."""
    out = []
    text = strip_strings(expr)
    for m in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        labels = {x.strip() for x in m.group(1).split(",") if x.strip()}
        out.append((labels, metric_names(text[m.end() : i - 1])))
    return out
