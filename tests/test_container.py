"""The deployment path for real: the image is built (docker/Dockerfile, offline: docker/ci-stack.sh) and the compose
stack runs under podman (CPU profile: the service + Prometheus), then the tests talk to it through the mapped ports
the way a user would. Tests run in file order: the last two stop the service under load and take the stack down.

Needs root, podman (+ runc, netavark), debootstrap and docker-compose; .ci/run installs them and writes
/etc/containers/containers.conf. Skipped, saying why, only where podman cannot run. A cold build takes minutes
(docs/deploy.md "How the image is tested"); the rootfs and the wheelhouse are cached under .cache/containers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import ROOT, free_port, mnist_files, mnist_png

SCRIPT = ROOT / "docker" / "ci-stack.sh"
PROJECT = "soaptest"
SERVICE = "soap-cpu"
PNG = {"Content-Type": "image/png"}
# Building from scratch on 2 cores takes several minutes; the fixture's setup counts against the first test.
pytestmark = pytest.mark.timeout(1800)


def why_podman_cannot_run() -> str | None:
    """The reason the stack cannot run on this machine, or None."""
    hint = ".ci/run installs podman, runc, netavark, debootstrap and docker-compose and writes containers.conf"
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "podman here runs rootful: needs root"
    for tool in ("podman", "debootstrap", "docker-compose"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed ({hint})"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-300:]}"
    disk = subprocess.run([str(SCRIPT), "check-disk"], capture_output=True, text=True, timeout=60)
    if disk.returncode != 0:
        return disk.stderr.strip()[-300:]
    return None


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]
    service_url: str
    prometheus_url: str
    log: Path

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        with self.log.open("a") as log:
            log.write(f"\n$ ci-stack.sh {' '.join(args)}\n")
            log.flush()
            return subprocess.run(
                [str(SCRIPT), *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                timeout=timeout,
            )  # fmt: skip

    def container(self, service: str = SERVICE) -> str:
        result = subprocess.run(
            [str(SCRIPT), "compose", "ps", "-q", service], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        ids = result.stdout.split()
        assert result.returncode == 0, result.stderr
        assert len(ids) == 1, result.stdout
        return ids[0]

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def inspect(container: str) -> dict:
    result = podman("inspect", container)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = why_podman_cannot_run()
    if reason:
        pytest.skip(f"podman cannot run here: {reason}")
    service_port, prometheus_port = free_port(), free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": PROJECT,
        "SOAP_PUBLISH_PORT": f"127.0.0.1:{service_port}",
        "PROMETHEUS_PORT": f"127.0.0.1:{prometheus_port}",
    }
    log = tmp_path_factory.mktemp("container") / "ci-stack.log"
    log.touch()
    up = Stack(env, f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prometheus_port}", log)
    started = time.monotonic()
    result = up.script("up", timeout=1500)
    print(f"ci-stack.sh up: {time.monotonic() - started:.0f} s")
    try:
        assert result.returncode == 0, up.tail()
        yield up
    finally:
        up.script("down")


def test_service_becomes_healthy_through_its_image_healthcheck(stack: Stack) -> None:
    container = stack.container()
    image = json.loads(podman("image", "inspect", "localhost/soap-serving:cpu").stdout)[0]
    own = image["Healthcheck"]["Test"]  # podman puts it beside Config
    assert own == ["CMD", "python", "/app/docker/healthcheck.py"]
    # podman runs health checks from systemd timers; this machine has no systemd, so run the check's command
    # the way the timer would, until it passes (the model loads and warms up in the container).
    deadline = time.monotonic() + 240
    while podman("healthcheck", "run", container).returncode != 0:
        assert time.monotonic() < deadline, stack.tail() + podman("logs", container).stderr[-3000:]
        time.sleep(2)
    state = inspect(container)
    assert state["Config"]["Healthcheck"]["Test"] == own
    assert state["State"]["Health"]["Status"] == "healthy"
    assert httpx.get(stack.service_url + "/readyz", timeout=5).status_code == 200


def test_classify_real_digits_through_the_mapped_port(stack: Stack) -> None:
    files = mnist_files(per_digit=3)
    with httpx.Client(base_url=stack.service_url, timeout=30) as client:
        replies = [client.post("/classify", content=path.read_bytes(), headers=PNG) for _, path in files]
        models = client.get("/v1/models").json()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    labels = [r.json()["results"][0]["label"] for r in replies]
    right = sum(label == digit for label, (digit, _) in zip(labels, files, strict=True))
    assert right >= 0.9 * len(files), list(zip(labels, [d for d, _ in files], strict=True))
    assert models["default"] == "mnist-fcn-dr"  # SOAP_MODELS of the image and the compose file resolve


def test_prometheus_in_its_container_scrapes_the_service(stack: Stack) -> None:
    """Prometheus scrapes the service and comes to read it ready. Its newest sample may be a scrape taken before the
    model had loaded, so the loop waits for one that reads 1; never reading 1 fails at the deadline."""
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=stack.prometheus_url, timeout=10) as client:
        while True:
            targets = client.get("/api/v1/targets").json()["data"]["activeTargets"]
            soap = [t for t in targets if t["labels"]["job"] == "soap"]
            ready = client.get("/api/v1/query", params={"query": 'soap_ready{job="soap"}'}).json()["data"]["result"]
            if soap and all(t["health"] == "up" for t in soap) and ready and float(ready[0]["value"][1]) == 1:
                break
            assert time.monotonic() < deadline, json.dumps({"targets": targets, "soap_ready": ready})[:3000]
            time.sleep(2)
        names = client.get("/api/v1/label/__name__/values").json()["data"]
        rules = client.get("/api/v1/rules").json()["data"]["groups"]
    assert len(soap) == 1
    assert soap[0]["labels"]["instance"].endswith(":8000")
    assert {"soap_images_total", "soap_request_duration_seconds_bucket", "soap_model_info"} <= set(names)
    assert any(r["name"] == "SoapTargetDown" for g in rules for r in g["rules"])  # our rules are loaded


def test_runs_as_its_user_on_a_read_only_root_with_tmpfs_tmp(stack: Stack) -> None:
    container = stack.container()
    state = inspect(container)
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert state["Config"]["User"] == "10001:10001"

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", container, "sh", "-c", command)

    status = sh("grep -E '^(Uid|Gid):' /proc/1/status").stdout.split()  # the service itself (PID 1)
    assert status[1:5] == ["10001"] * 4, status
    assert status[6:10] == ["10001"] * 4, status
    assert sh("cat /proc/1/cmdline | tr '\\0' ' '").stdout.strip() == "python -m service"
    denied = sh("touch /app/x")
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    mounts = [line.split() for line in sh("cat /proc/mounts").stdout.splitlines()]
    assert [m[2] for m in mounts if m[1] == "/tmp"] == ["tmpfs"]
    assert [m for m in mounts if m[1] == "/"][0][3].startswith("ro")
    assert sh("touch /tmp/x && rm /tmp/x").returncode == 0


@dataclass
class Outcome:
    """One request of the load: its HTTP status, or the exception that ended it, and when it started."""

    started: float
    status: int | None = None
    error: str | None = None
    body: str = ""


def test_compose_stop_under_load_answers_every_accepted_request(stack: Stack) -> None:
    """`docker-compose stop` sends SIGTERM: the service turns new requests away with 503 (then closes its
    listener) and answers every request it had accepted. Clients stop at their first 503, as a load balancer
    takes a draining replica out; a request that was sent and got no answer is the failure looked for."""
    container = stack.container()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    image = mnist_png(3)

    def client() -> None:
        while True:
            outcome = Outcome(time.monotonic())
            try:  # a new connection each time: a refused connect is a request that was never accepted
                reply = httpx.post(stack.service_url + "/classify", content=image, headers=PNG, timeout=30)
                outcome.status, outcome.body = reply.status_code, reply.text[:200]
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                outcome.error = f"connect: {exc!r}"
            except httpx.HTTPError as exc:
                outcome.error = f"{type(exc).__name__}: {exc!r}"
            with lock:
                outcomes.append(outcome)
            if outcome.status != 200:
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop_at = time.monotonic()
    stopped = subprocess.run(
        [str(SCRIPT), "compose", "stop", SERVICE], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=90
    )
    stop_s = time.monotonic() - stop_at
    for t in threads:
        t.join(60)
    assert stopped.returncode == 0, stopped.stderr
    unanswered = [o for o in outcomes if o.error and not o.error.startswith("connect")]
    wrong = [o for o in outcomes if o.status not in (None, 200, 503)]
    refused = [o for o in outcomes if o.status == 503]
    assert not unanswered, unanswered
    assert not wrong, wrong
    assert all('"shutting_down"' in o.body for o in refused), refused
    assert sum(o.status == 200 for o in outcomes) > 50
    assert sum(o.status == 200 and o.started > stop_at for o in outcomes) > 0, "no request crossed the SIGTERM"
    state = inspect(container)["State"]
    logs = podman("logs", "-t", container)
    print(f"compose stop under load: {stop_s:.1f} s; {len(outcomes)} requests, {len(refused)} refused while draining")
    assert state["ExitCode"] == 0, logs.stdout[-3000:] + logs.stderr[-3000:]  # not SIGKILLed: it drained and exited
    assert "Application shutdown complete" in logs.stdout + logs.stderr


def test_compose_down_leaves_nothing(stack: Stack) -> None:
    assert stack.script("down").returncode == 0, stack.tail()
    label = f"label=com.docker.compose.project={PROJECT}"
    assert podman("ps", "-a", "-q", "--filter", label).stdout.split() == []
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert [n for n in networks if n.startswith(PROJECT)] == []
    volumes = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert [v for v in volumes if v.startswith(PROJECT)] == []
