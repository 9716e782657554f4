"""The real thing: `python -m service` in a subprocess (uvicorn on loopback) — start, serve, survive hostile
input with bounded memory, drain on SIGTERM without losing an accepted request. Plus the settings parser."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from support import ROOT, ServiceProcess, bad_images, metric_value, mnist_files, mnist_png

from service.config import ServiceSettings, load_settings

PNG = {"Content-Type": "image/png"}


@pytest.fixture
def server(model_dir):
    started: list[ServiceProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(["--model", str(model_dir), *args], env)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_smoke_cli_server_classifies_real_digits(server):
    srv = server("--max-batch-size", "16")
    files = mnist_files(per_digit=1)
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        results = [client.post("/classify", content=p.read_bytes(), headers=PNG) for _, p in files]
        models = client.get("/v1/models").json()
        metrics = client.get("/metrics").text
        docs = client.get("/docs")
    assert all(r.status_code == 200 for r in results)
    assert sum(r.json()["results"][0]["label"] == d for r, (d, _) in zip(results, files, strict=True)) >= 8
    assert models["default"] == "mnist-fcn-dr"
    assert models["models"][0]["batching"]["max_batch_size"] == 16
    assert metric_value(metrics, "soap_images_total", model="mnist-fcn-dr", mode="min-aux") == len(files)
    assert metric_value(metrics, "soap_ready") == 1
    assert docs.status_code == 200


def test_hostile_stream_leaves_the_server_healthy_with_bounded_memory(server):
    srv = server("--max-body-bytes", str(512 * 1024), env={"SOAP_MAX_IMAGES_PER_REQUEST": "8"})
    hostile = [payload for payload, _ in bad_images().values()]
    garbage = os.urandom(200_000)
    b64 = base64.b64encode(mnist_png(1)).decode()

    def attack(client: httpx.Client) -> list[int]:
        codes = []
        for payload in hostile:
            codes.append(client.post("/classify", content=payload, headers=PNG).status_code)
        codes.append(client.post("/classify", content=garbage, headers=PNG).status_code)
        codes.append(client.post("/classify", content=b"x" * (600 * 1024), headers=PNG).status_code)  # 413
        codes.append(client.post("/classify", files=[("file", ("b.png", hostile[3], "image/png"))] * 8).status_code)
        codes.append(client.post("/classify", files=[("file", ("a.png", mnist_png(1), "image/png"))] * 9).status_code)
        codes.append(
            client.post(
                "/classify",
                content=b'{"images": [' + b'"AAAA",' * 10 + b'"x"]}',
                headers={"Content-Type": "application/json"},
            ).status_code
        )
        codes.append(client.post("/classify", json={"images": [b64], "top_k": 10**9}).status_code)
        codes.append(
            client.post(
                "/classify",
                content=b"--x\r\nbroken multipart",
                headers={"Content-Type": "multipart/form-data; boundary=x"},
            ).status_code
        )
        codes.append(client.post("/classify", content=mnist_png(1), headers={"Content-Type": "text/html"}).status_code)
        return codes

    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for _ in range(3):  # warm up allocator pools and caches before taking the baseline
            attack(client)
        baseline = srv.rss_bytes()
        codes = []
        for _ in range(15):
            codes += attack(client)
        grown = srv.rss_bytes() - baseline
        good = client.post("/classify", content=mnist_png(7), headers=PNG)
        health = client.get("/healthz")
        ready = client.get("/readyz")
    assert set(codes) <= {413, 415, 422}, sorted(set(codes))
    assert 500 not in codes
    assert grown < 40 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over {len(codes)} hostile requests"
    assert good.status_code == 200
    assert good.json()["results"][0]["label"] == 7
    assert health.status_code == 200
    assert ready.status_code == 200


def test_a_stalled_body_gets_408_and_does_not_block_others(server):
    """A client that sends headers and part of its body, then stalls (slowloris), is answered 408 after
    --body-timeout-s; requests on other connections are served meanwhile."""
    srv = server("--body-timeout-s", "1")
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as stalled:
        stalled.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000\r\n\r\n" + mnist_png(1)[:100]
        )
        started = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            good = client.post("/classify", content=mnist_png(3), headers=PNG)
            assert good.status_code == 200
            assert good.json()["results"][0]["label"] == 3
            reply = b""
            while b"}" not in reply:  # headers and the JSON body may come in separate segments
                chunk = stalled.recv(65536)
                if not chunk:
                    break
                reply += chunk
            head = reply.decode("latin-1")
            waited = time.monotonic() - started
            metrics = client.get("/metrics").text
    assert head.startswith("HTTP/1.1 408"), head[:200]
    assert '"error":"body_timeout"' in head.replace(" ", "")
    assert 0.9 < waited < 8
    assert metric_value(metrics, "soap_rejections_total", reason="body_timeout") == 1


def test_sigterm_drains_every_accepted_request_then_exits(server):
    # A long batching delay holds every accepted request in the queue; draining must flush it, not drop it.
    srv = server("--max-batch-size", "256", "--max-delay-ms", "10000", "--shutdown-delay-s", "2")
    n = 24
    results: list[int | str] = [0] * n
    go = threading.Barrier(n)

    def one(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            go.wait()
            try:
                r = client.post(srv.url + "/classify", content=mnist_png(i % 10), headers=PNG)
                results[i] = r.status_code if r.status_code != 200 else r.json()["results"][0]["label"]
            except httpx.HTTPError as exc:
                results[i] = f"error {exc!r}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 8
    while metric_value(httpx.get(srv.url + "/metrics").text, "soap_queue_depth_images") < n:
        assert time.monotonic() < deadline, "requests were not queued"
        time.sleep(0.02)
    srv.terminate()
    for t in threads:
        t.join(30)
    ready = httpx.get(srv.url + "/readyz", timeout=5)  # inside --shutdown-delay-s: still listening, not ready
    refused = httpx.post(srv.url + "/classify", content=mnist_png(1), headers=PNG, timeout=5)
    code = srv.proc.wait(30)
    assert all(isinstance(r, int) and r < 10 for r in results), results  # every accepted request got its 200
    assert sum(r == i % 10 for i, r in enumerate(results)) >= 0.8 * n
    assert ready.status_code == 503
    assert refused.status_code == 503
    assert refused.json()["error"] == "shutting_down"
    assert code == 0, srv.output()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()


def test_a_broken_checkpoint_stops_the_start_with_a_clear_message(tmp_path, model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((model_dir / "model.json").read_text())
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--model", str(broken), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # the one line docs/deploy.md promises


def _unreadable_to_the_service(path: Path) -> list[str]:
    """Make `path` (a file) unreadable to the service as a container's user would find it: owned by someone else,
    mode 0600; returns the command prefix that runs the service under those rules. As root, the service keeps uid
    0 but runs without the capabilities that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        path.chmod(0o000)  # the owner itself cannot read it
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to make a file unreadable to the service")
    os.chown(path, 65534, 65534)
    path.chmod(0o600)
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_an_unreadable_checkpoint_stops_the_start_with_one_line_and_status_2(tmp_path, model_dir):
    """A checkpoint written 0600 by another user and mounted into the container (issue 28): no traceback."""
    copy = tmp_path / "mnist-fcn-dr"
    shutil.copytree(model_dir, copy)
    prefix = _unreadable_to_the_service(copy / "model.safetensors")
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "service", "--model", str(copy), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot read {copy / 'model.safetensors'}: Permission denied"), lines[0]
    assert "chmod a+r" in lines[0]


def test_settings_come_from_cli_then_environment_then_defaults(tmp_path):
    env = {
        "SOAP_MODELS": "a/m1, b/m2",
        "SOAP_MAX_BATCH_SIZE": "32",
        "SOAP_MAX_DELAY_MS": "2.5",
        "SOAP_ENABLE_ATTACK": "true",
        "SOAP_DEVICE": "CPU",
        "SOAP_MAX_BODY_BYTES": "2048",
    }
    s = load_settings(["--max-batch-size", "8", "--no-enable-attack"], env)
    assert [p.name for p in s.models] == ["m1", "m2"]
    assert s.model_names[0] == "m1"
    assert s.max_batch_size == 8
    assert s.max_delay_ms == 2.5
    assert s.enable_attack is False
    assert s.device == "cpu"
    assert s.max_body_bytes == 2048
    assert s.port == 8000
    assert s.max_queue == 512
    blank = load_settings([], {"SOAP_MODELS": "m", "SOAP_MAX_QUEUE": "", "SOAP_API_KEY_ENV": " "})
    assert blank.max_queue == 512
    assert blank.api_key_env is None  # empty variables count as unset
    cli = load_settings(["--model", "x/first", "--model", "y/second", "--port", "9000"], env)
    assert cli.model_names == ["first", "second"]
    assert cli.port == 9000
    for argv in (["--max-batch-size", "0"], ["--device", "tpu"], ["--model", "a/m", "--model", "b/m"], []):
        with pytest.raises(SystemExit) as info:
            load_settings(argv if argv and argv[0] == "--model" else ["--model", "m", *argv] if argv else [], {})
        assert info.value.code == 2


def test_api_key_env_must_name_a_non_empty_variable(monkeypatch):
    monkeypatch.delenv("SOAP_TEST_EMPTY_KEY", raising=False)
    settings = ServiceSettings(models=["m"], api_key_env="SOAP_TEST_EMPTY_KEY")
    with pytest.raises(ValueError, match="SOAP_TEST_EMPTY_KEY"):
        _ = settings.api_key
    monkeypatch.setenv("SOAP_TEST_EMPTY_KEY", "s3cret-value")
    assert settings.api_key == "s3cret-value"
    assert "s3cret" not in json.dumps(settings.model_dump(mode="json"))
