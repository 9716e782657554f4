"""The Kubernetes manifests (deploy/k8s): every overlay builds with `kubectl kustomize` and validates against the
Kubernetes API schema (kubernetes-validate) or, for custom resources, against tests/crd_schemas; the monitoring,
autoscaling and KServe pieces are wired to the service."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from support import ROOT
from support.deploy import (
    DASHBOARD,
    K8S,
    OVERLAYS,
    RULE_TESTS,
    RULES,
    SERVICE_PORT,
    kustomize,
    load_yaml,
    promtool,
    run,
)
from support.promql import dashboard

# Custom resources kubernetes-validate does not know: checked against schemas written from each project's API
# reference (tests/crd_schemas; the fields this repository may use, unknown fields rejected).
CRD_SCHEMAS = {
    "PodMonitor": "podmonitor",
    "PrometheusRule": "prometheusrule",
    "ScaledObject": "scaledobject",
}


SCRAPE_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


def validate_manifest(doc: dict) -> None:
    """The Kubernetes API schema (kubernetes-validate, strict) for built-in kinds; our CRD schemas otherwise."""
    if doc["kind"] in CRD_SCHEMAS:
        import jsonschema

        path = ROOT / "tests" / "crd_schemas" / f"{CRD_SCHEMAS[doc['kind']]}.schema.json"
        jsonschema.validate(doc, json.loads(path.read_text()), cls=jsonschema.Draft202012Validator)
        return
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) validates the schemas")
    kv.validate(doc, kv.latest_version(), strict=True)


def annotated_objects(docs: list[dict]) -> list[str]:
    """Where the prometheus.io scrape annotations are: objects and pod templates, by kind/name."""
    where = []
    for doc in docs:
        holders = [(doc["kind"], doc["metadata"])]
        template = (doc.get("spec") or {}).get("template")
        if isinstance(template, dict) and "metadata" in template:
            holders.append((f"{doc['kind']} pod template", template["metadata"]))
        for kind, meta in holders:
            if set(SCRAPE_ANNOTATIONS) & set(meta.get("annotations") or {}):
                where.append(f"{kind} {doc['metadata']['name']}")
    return where


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_kubernetes_manifests_build_and_validate(overlay):
    docs = kustomize(OVERLAYS[overlay])
    for doc in docs:  # schema of the Kubernetes API, unknown fields rejected (kubeconform-style, offline)
        validate_manifest(doc)
    # one object of each kind, besides the monitoring's dashboard ConfigMap
    by_kind = {d["kind"]: d for d in docs if d["metadata"]["name"] != "soap-grafana-dashboard"}
    assert len(by_kind) == len(docs) - ("PodMonitor" in by_kind)
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= set(by_kind)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"soap"}

    deploy = by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    if overlay == "autoscaling":
        assert "replicas" not in deploy["spec"], "the HPA owns the replica count; apply must not reset it"
    else:
        assert deploy["spec"]["replicas"] >= 2
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVICE_PORT}

    def probe_port(probe: dict) -> int:
        return ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"])

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(container[probe]) == SERVICE_PORT, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "allow loading and warm-up"
    limits = container["resources"]["limits"]
    if overlay == "cpu":
        assert "nvidia.com/gpu" not in limits
        assert container["image"].endswith(":cpu")
        assert "tolerations" not in pod["spec"]
    else:
        assert limits["nvidia.com/gpu"] == 1
        assert container["image"].endswith(":gpu")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0

    # One scrape path per replica, whatever the Prometheus: the annotations on the Pods and nowhere else (so the
    # chart's `kubernetes-pods` and `kubernetes-service-endpoints` jobs cannot both pick a replica up), or, with
    # the operator's PodMonitor, no annotations at all.
    if "PodMonitor" in by_kind:
        assert annotated_objects(docs) == []
    else:
        assert annotated_objects(docs) == ["Deployment pod template soap"]
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == SERVICE_PORT
        assert notes["prometheus.io/path"] == "/metrics"
    service = by_kind["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (sport,) = service["spec"]["ports"]
    assert ports.get(sport["targetPort"], sport["targetPort"]) == SERVICE_PORT

    # Graceful shutdown fits: not-ready delay plus the drain of accepted requests end before SIGKILL.
    from service.config import ServiceSettings, _env_name, load_settings

    config = {k: str(v) for k, v in by_kind["ConfigMap"]["data"].items()}
    assert container["envFrom"][0]["configMapRef"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    known = {_env_name(f) for f in ServiceSettings.model_fields}
    assert set(config) <= known, f"not service settings: {sorted(set(config) - known)}"
    settings = load_settings([], environ=config)
    assert settings.port == SERVICE_PORT
    assert settings.device == ("cpu" if overlay == "cpu" else "auto")
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_delay_s + settings.graceful_timeout_s


def test_podmonitor_scrapes_each_soap_pod_on_the_metrics_port():
    docs = kustomize(OVERLAYS["monitoring"])
    by_kind = {d["kind"]: d for d in docs}
    monitor, deploy = by_kind["PodMonitor"], by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "namespaceSelector" not in monitor["spec"], "the PodMonitor's own namespace is the service's"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == SERVICE_PORT
    assert endpoint["path"] == "/metrics"
    # kube-prometheus-stack selects monitors and rules by its release label: both carry the same one.
    assert monitor["metadata"]["labels"]["release"] == by_kind["PrometheusRule"]["metadata"]["labels"]["release"]


def load_generator():
    import importlib.util

    path = K8S / "components" / "monitoring" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_monitoring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monitoring_manifests_are_generated_from_the_compose_rules_and_dashboard():
    """The PrometheusRule and the dashboard ConfigMap are the compose stack's rules and dashboard, unchanged:
    the committed files equal what generate.py makes now (run it after editing docker/prometheus or grafana)."""
    generator = load_generator()
    assert generator.main(["--check"]) == 0
    docs = {d["kind"]: d for d in kustomize(OVERLAYS["monitoring"])}
    assert docs["PrometheusRule"]["spec"]["groups"] == load_yaml(RULES)["groups"]
    (configmap,) = [d for d in kustomize(OVERLAYS["monitoring"]) if d["metadata"]["name"] == "soap-grafana-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard()


def test_prometheusrule_passes_promtool(tmp_path):
    """promtool checks the rule groups as the operator hands them to Prometheus, and runs the rule unit tests
    against them (not only against the compose copy)."""
    rule = next(d for d in kustomize(OVERLAYS["monitoring"]) if d["kind"] == "PrometheusRule")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "soap-alerts.yml").write_text(yaml.safe_dump(rule["spec"]))
    checked = run([promtool(), "check", "rules", str(tmp_path / "rules" / "soap-alerts.yml")])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    tested = run([promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path / "tests")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_scaledobject_scales_the_deployment_on_load_per_replica(tmp_path):
    docs = {d["kind"]: d for d in kustomize(OVERLAYS["autoscaling"])}
    scaled, deploy, pdb = docs["ScaledObject"], docs["Deployment"], docs["PodDisruptionBudget"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy["metadata"]["name"]}
    assert spec["minReplicaCount"] > pdb["spec"]["minAvailable"], "a drain must be able to evict a replica"
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue-depth", "in-flight"}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"
        assert float(trigger["metadata"]["threshold"]) > 0
    assert "soap_queue_depth_images" in triggers["queue-depth"]["metadata"]["query"]
    assert "soap_in_flight_requests" in triggers["in-flight"]["metadata"]["query"]
    assert not any(t["type"] == "cpu" for t in spec["triggers"]), "CPU utilisation is the wrong signal (docs)"
    queries = {"groups": [{"name": "keda", "rules": [
        {"record": "keda:" + name.replace("-", "_"), "expr": t["metadata"]["query"]} for name, t in triggers.items()
    ]}]}  # fmt: skip
    (tmp_path / "keda.yml").write_text(yaml.safe_dump(queries))
    checked = run([promtool(), "check", "rules", str(tmp_path / "keda.yml")])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_crd_schemas_reject_broken_resources():
    """The hand-written CRD schemas really check: a misspelt field, a missing required one, a number where KEDA
    wants a string are errors."""
    import jsonschema

    docs = {d["kind"]: d for d in kustomize(OVERLAYS["autoscaling"])}
    broken = []
    monitor = json.loads(json.dumps(docs["PodMonitor"]))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    broken.append(monitor)
    rule = json.loads(json.dumps(docs["PrometheusRule"]))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    broken.append(rule)
    scaled = json.loads(json.dumps(docs["ScaledObject"]))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 64
    broken.append(scaled)
    scaled = json.loads(json.dumps(docs["ScaledObject"]))
    del scaled["spec"]["triggers"][1]["metadata"]["serverAddress"]
    broken.append(scaled)
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(doc)


def test_kubernetes_validator_rejects_a_broken_manifest():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) validates the schemas")
    deploy = next(d for d in kustomize(K8S) if d["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbez"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, kv.latest_version(), strict=True)


KSERVE = K8S / "kserve" / "inferenceservice.yaml"
PREDICTOR_FIELDS = {  # KServe v1beta1 PredictorSpec: custom containers plus the component extension fields
    "containers",
    "volumes",
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "serviceAccountName",
    "nodeSelector",
    "tolerations",
    "affinity",
    "securityContext",
    "imagePullSecrets",
    "logger",
    "batcher",
    "labels",
    "annotations",
}


def test_kserve_inference_service_example_runs_the_open_inference_routes():
    """deploy/k8s/kserve: the InferenceService's shape (KServe's CRD is not available offline), its container strictly
    validated as a Kubernetes container, its environment accepted by the service, its probes on real /v2 routes."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) validates the schemas")
    from service.config import load_settings
    from service.routes.open_inference import router

    (isvc,) = [d for d in yaml.safe_load_all(KSERVE.read_text()) if d]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])
    assert set(isvc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(isvc["spec"]) == {"predictor"}
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_FIELDS, sorted(set(predictor) - PREDICTOR_FIELDS)
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-predictor"},
        "spec": {"containers": predictor["containers"], "volumes": predictor.get("volumes", [])},
    }
    kv.validate(pod, kv.latest_version(), strict=True)

    settings = load_settings([], environ={e["name"]: e["value"] for e in container["env"]})
    (port,) = container["ports"]
    assert settings.port == port["containerPort"] == 8080
    assert settings.models[0] == Path("/app/models/zoo/mnist-fcn-dr")
    assert isvc["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    routes = {route.path for route in router.routes}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": 8080}
        assert path in routes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "allow loading and warm-up"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts  # the image's caches go to /tmp
