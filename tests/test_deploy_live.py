"""The deployment against the REAL service: a `python -m service` process configured the way the container is,
whose /metrics must export every series the dashboard, the alert rules and the autoscaler read, on the port and path
Prometheus scrapes; a real Prometheus scrapes it, a real nginx balances to it, and the container's health check
follows its readiness."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support import ROOT, free_port, mnist_path
from support.deploy import (
    DEFAULT_MODEL,
    HEALTHCHECK,
    NGINX,
    PROMETHEUS,
    RULES,
    SERVICE_PORT,
    compose_soap_environment,
    load_yaml,
    require,
    run,
)
from support.promql import (
    CONTRACT_METRICS,
    DCGM_DEFAULT_COUNTERS,
    alert_rules,
    dashboard_exprs,
    grafana_to_promql,
    grouping_labels,
    metric_names,
    rule_and_dashboard_exprs,
    selectors,
)

MNIST_DIGIT = mnist_path(7)
# Series Prometheus itself attaches to every scraped sample; dashboards and rules may select on them. In
# Kubernetes the pod's namespace and name come too (kubernetes-pods job and PodMonitor alike).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


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
    # Configured by its environment alone, SOAP_PORT included, as in the container (benchmarks.harness.server passes
    # --port, so it is not used here).
    proc_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SOAP_")}, **env}
    log_path = tmp_path_factory.mktemp("service") / "service.log"
    with open(log_path, "w") as log:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT
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
