"""The compose stacks, validated by docker-compose 1.29's own `config`: every stack's services, profiles, GPU
requests, health checks and wiring (Prometheus and nginx reach the SOAP containers by DNS name), and an
environment the service accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from support import ROOT
from support.deploy import (
    COMPOSE,
    COMPOSE_CPU,
    DASHBOARD,
    GRAFANA,
    NGINX,
    PROMETHEUS,
    SERVICE_PORT,
    compose_soap_environment,
    require,
    run,
)


def compose_env() -> dict[str, str]:
    """A clean environment: no SOAP_* or COMPOSE_* of the developer's shell leaks into the rendered config."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}


def compose_config(files: list[Path], profiles: list[str]) -> dict:
    exe = require("docker-compose", "apt-get install docker-compose; .ci/run does")
    cmd = [exe, "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    result = run(cmd + ["config"], cwd=ROOT, env=compose_env())
    assert result.returncode == 0, f"docker-compose config failed for {files} {profiles}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def active_services(config: dict, profiles: list[str]) -> dict[str, dict]:
    """Services `up` starts: those without profiles, or with an enabled one (compose spec; 1.29's `config`
    prints every service whatever the profile, so the rule is applied here)."""
    return {
        name: svc
        for name, svc in config["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def dns_names(name: str, svc: dict) -> set[str]:
    names = {name}
    for net in (svc.get("networks") or {}).values():
        names |= set((net or {}).get("aliases") or [])
    return names


def gpu_requests(svc: dict) -> list[dict]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if d.get("driver") == "nvidia" or "gpu" in (d.get("capabilities") or [])]


def serving(services: dict[str, dict]) -> dict[str, dict]:
    """The SOAP containers of a stack: those that answer to the DNS name Prometheus and nginx use."""
    return {n: s for n, s in services.items() if "soap" in dns_names(n, s)}


def seconds(duration: str) -> float:
    """Compose/Go duration ("3m", "1m30s", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


STACKS = {
    # name: (compose files, profiles, serving services, other services)
    "gpu": ([COMPOSE], [], {"soap"}, {"prometheus", "grafana"}),
    "gpu+gpu-metrics": ([COMPOSE], ["gpu-metrics"], {"soap"}, {"prometheus", "grafana", "dcgm-exporter"}),
    "gpu+scale": ([COMPOSE], ["scale"], {"soap", "soap-gpu1"}, {"prometheus", "grafana", "lb"}),
    "cpu": ([COMPOSE, COMPOSE_CPU], ["cpu"], {"soap-cpu"}, {"prometheus", "grafana"}),
    "cpu+lb": ([COMPOSE, COMPOSE_CPU], ["cpu", "lb"], {"soap-cpu"}, {"prometheus", "grafana", "lb"}),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_compose_stack_validates_and_is_wired(stack):
    files, profiles, want_serving, want_others = STACKS[stack]
    config = compose_config(files, profiles)
    active = active_services(config, profiles)
    soap = serving(active)
    assert set(soap) == want_serving, f"{stack}: serving containers {sorted(soap)}"
    assert set(active) - set(soap) == want_others, f"{stack}: other services {sorted(set(active) - set(soap))}"

    for name, svc in soap.items():
        health = svc["healthcheck"]
        assert health["test"][-1] == "/app/docker/healthcheck.py", f"{name}: healthcheck {health['test']}"
        start = seconds(health["start_period"])
        assert start >= 60, f"{name}: start_period {start} s is too short for loading and warm-up"
        assert svc["restart"] in ("unless-stopped", "always", "on-failure"), name
        env = svc["environment"]
        assert env["SOAP_PORT"] == str(SERVICE_PORT), name
        assert env["SOAP_HOST"] == "0.0.0.0", name
        assert {"SOAP_MODELS", "SOAP_MAX_BATCH_SIZE", "SOAP_MAX_DELAY_MS", "SOAP_MAX_QUEUE"} <= set(env), name
        assert str(SERVICE_PORT) in [str(p) for p in svc.get("expose", [])], name

    # Exactly one serving container publishes the service port on the host (replicas go through the balancer).
    published = {
        n: [p["published"] for p in s.get("ports", []) if int(p["target"]) == SERVICE_PORT] for n, s in soap.items()
    }
    assert sorted(int(p) for ps in published.values() for p in ps) == [SERVICE_PORT], published

    gpu_ids = []
    for name, svc in soap.items():
        requests = gpu_requests(svc)
        if stack.startswith("cpu"):
            assert not requests, f"{stack}: {name} reserves a GPU on a CPU-only host"
            assert svc["build"]["args"]["VARIANT"] == "cpu", name
            continue
        assert len(requests) == 1, name
        assert requests[0]["driver"] == "nvidia", name
        assert requests[0]["capabilities"] == ["gpu"], name
        req = requests[0]
        if name == "soap":
            assert req.get("count") == 1, "the default service reserves exactly one GPU"
        # Docker hands `count: 1` the first GPU, so count 1 means GPU 0; replicas name their GPU.
        gpu_ids += ["0"] if req.get("count") == 1 else req["device_ids"]
    assert len(gpu_ids) == len(set(gpu_ids)), f"{stack}: replicas share a GPU: {gpu_ids}"
    if stack.startswith("cpu"):
        assert not any(gpu_requests(s) for s in active.values()), f"{stack}: something still reserves a GPU"

    # Prometheus and Grafana read their configuration from this repository.
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in active["prometheus"]["volumes"] if v.startswith("/")}
    assert mounts["/etc/prometheus"] == PROMETHEUS.parent
    grafana_mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in active["grafana"]["volumes"] if v.startswith("/")}
    assert grafana_mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    dashboards_dir = grafana_mounts["/etc/grafana/dashboards"]
    assert dashboards_dir == DASHBOARD.parent
    home = active["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).name).is_file()
    assert home.startswith("/etc/grafana/dashboards/")
    if "lb" in active:
        lb_mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in active["lb"]["volumes"]}
        assert lb_mounts["/etc/nginx/conf.d/default.conf"] == NGINX
        assert "depends_on" not in active["lb"], "nginx resolves `soap` per request; a depends_on breaks the CPU stack"


def test_compose_validator_rejects_a_broken_file(tmp_path):
    """docker-compose config really validates: a misspelt key in the soap service is an error."""
    exe = require("docker-compose", "apt-get install docker-compose; .ci/run does")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    deploy:\n      resources:", "    deploy:\n      resourcez:", 1))
    result = run([exe, "-f", str(broken), "config", "-q"], cwd=tmp_path, env=compose_env())
    assert result.returncode != 0
    assert "resourcez" in result.stderr


def test_compose_environment_is_accepted_by_the_service():
    """Every SOAP_* variable the stacks set is a real service setting, and the values parse."""
    from service.config import ServiceSettings, _env_name, load_settings

    known = {_env_name(f) for f in ServiceSettings.model_fields}
    for files, profiles in (([COMPOSE], ["scale"]), ([COMPOSE, COMPOSE_CPU], ["cpu"])):
        config = compose_config(files, profiles)
        for name, svc in serving(active_services(config, profiles)).items():
            env = {k: ("" if v is None else str(v)) for k, v in svc["environment"].items()}
            secrets = {"SOAP_API_KEY"}  # the key itself, read through SOAP_API_KEY_ENV
            unknown = {k for k in env if k.startswith("SOAP_")} - known - secrets
            assert not unknown, f"{name}: not service settings: {sorted(unknown)}"
            settings = load_settings([], environ={k: v for k, v in env.items() if k in known})
            assert settings.port == SERVICE_PORT
            assert settings.host == "0.0.0.0"
            assert settings.model_names == ["mnist-fcn-dr"]
            assert settings.api_key_env in (None, "")
            assert settings.enable_attack is False
            # The image's model path is the repository's shipped model (WORKDIR /app).
            assert settings.models[0] == Path("/app/models/zoo/mnist-fcn-dr")


def test_compose_soap_environment_reads_defaults():
    env = compose_soap_environment()
    assert env["SOAP_MODELS"] == "/app/models/zoo/mnist-fcn-dr"
    assert env["SOAP_PORT"] == "8000"
    assert env["SOAP_API_KEY_ENV"] == ""
    assert "$" not in "".join(env.values())
