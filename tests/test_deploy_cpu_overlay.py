"""The Kubernetes CPU overlay (deploy/k8s/cpu) sizes a replica consistently: a CPU limit equal to the CPU request
(without a limit the service sized its pool from the node's cores), SOAP_COMPUTE_WORKERS equal to those CPUs, and
memory for that many compute processes. Built with `kubectl kustomize`, as a user applies it."""

from __future__ import annotations

import yaml
from support import ROOT
from support.deploy import OVERLAYS, kustomize

from service.config import WORKER_MEMORY_BYTES

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def _bytes(quantity: str) -> int:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_cpu_overlay_limits_cpu_and_sets_one_worker_per_cpu():
    docs = kustomize(OVERLAYS["cpu"])
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "soap-config"]
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert "cpu" in resources["limits"], "no CPU limit: the pool would size itself from the node's cores"
    cpus = _cpus(resources["limits"]["cpu"])
    assert _cpus(resources["requests"]["cpu"]) == cpus
    assert config["data"]["SOAP_DEVICE"] == "cpu"
    workers = int(config["data"]["SOAP_COMPUTE_WORKERS"])
    assert workers == cpus
    # Each worker ~0.7 GB (service/config.py budgets 1 GiB), plus the server process: within the request.
    assert (workers + 1) * WORKER_MEMORY_BYTES * 0.7 <= _bytes(resources["requests"]["memory"])
    assert (workers + 1) * WORKER_MEMORY_BYTES <= _bytes(resources["limits"]["memory"])


def test_every_overlay_sets_the_slow_client_limits():
    for name, overlay in OVERLAYS.items():
        (config,) = [
            d for d in kustomize(overlay) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "soap-config"
        ]
        assert int(config["data"]["SOAP_MAX_CONNECTIONS"]) >= 1024, name
        assert float(config["data"]["SOAP_HEAD_TIMEOUT_S"]) > 0, name


def test_kserve_cpu_predictor_limits_cpu_and_sets_one_worker_per_cpu():
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "kserve" / "inferenceservice.yaml").read_text())
    container = service["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    resources = container["resources"]
    cpus = _cpus(resources["limits"]["cpu"])
    assert _cpus(resources["requests"]["cpu"]) == cpus
    assert int(env["SOAP_COMPUTE_WORKERS"]) == cpus
    assert int(env["SOAP_MAX_CONNECTIONS"]) >= 1024
