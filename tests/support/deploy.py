"""The deployment's files (compose stacks, image, Prometheus, Grafana, nginx, Kubernetes) and the real tools that
check them: a tool that is absent skips its test, saying which (.ci/run installs docker-compose, promtool and nginx;
kubectl is on the machine; kubernetes-validate is in the dev extra)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
RULES = ROOT / "docker" / "prometheus" / "rules" / "soap-alerts.yml"
RULE_TESTS = ROOT / "docker" / "prometheus" / "tests" / "soap-alerts.test.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "soap-serving.json"
NGINX = ROOT / "docker" / "nginx" / "soap-lb.conf"
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
DEFAULT_MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
SERVICE_PORT = 8000  # the contract: the service listens on 8000 in every deployment


def require(tool: str, how: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed ({how})")
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def promtool() -> str:
    return require("promtool", "apt-get install prometheus; .ci/run does")


def kustomize(path: Path) -> list[dict]:
    exe = require("kubectl", "kubectl client with kustomize")
    result = run([exe, "kustomize", str(path)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


OVERLAYS = {"gpu": K8S, "cpu": K8S / "cpu", "monitoring": K8S / "monitoring", "autoscaling": K8S / "autoscaling"}


def compose_soap_environment() -> dict[str, str]:
    """The `soap` service's environment as docker-compose.yml writes it, `${NAME:-default}` taken at its default
    (no compose tool needed; test_compose_environment_is_accepted_by_the_service checks compose's own rendering)."""
    env = load_yaml(COMPOSE)["services"]["soap"]["environment"]
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
