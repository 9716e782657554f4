"""What a newcomer meets first (issue 28): `make run` installs the serving extra only and takes PORT, `make
wait-ready` waits for /readyz of a real server, the README's first screen has no macOS-only command and shows the CPU
deploy path beside the GPU one, and docs/training.md uses no layout of ours and says where data goes by default."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT, SHIPPED, ServiceProcess, free_port

README = (ROOT / "README.md").read_text()


def _make(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_make_run_installs_the_serving_extra_only_and_make_test_the_dev_set():
    run = _make("-n", "-B", "run").stdout  # -B: as on a fresh clone, every step; -n: printed, not run
    assert "-e '.[serve]'" in run
    assert "[dev]" not in run
    assert "-m service --model models/zoo/mnist-fcn-dr" in run
    test = _make("-n", "-B", "test").stdout
    assert "-e '.[dev]'" in test


def test_make_run_takes_port():
    assert re.search(r"-m service --model \S+ --port 8123\b", _make("-n", "run", "PORT=8123").stdout)
    assert "--port" not in _make("-n", "run").stdout  # unset: --port's default, or SOAP_PORT


def test_make_wait_ready_returns_once_a_real_server_is_ready_and_fails_when_none_answers():
    closed = _make("wait-ready", f"PORT={free_port()}", "WAIT_S=1")
    assert closed.returncode != 0
    assert "not ready after" in closed.stderr
    server = ServiceProcess(["--model", str(SHIPPED)])
    try:
        waited = _make("wait-ready", f"PORT={server.port}", "WAIT_S=180", timeout=240)
        assert waited.returncode == 0, waited.stderr + server.output()
        assert f"ready: http://localhost:{server.port}/readyz" in waited.stdout
    finally:
        server.stop()


def test_readme_first_screen_waits_for_readiness_and_runs_anywhere():
    try_it = _section("Try it")
    first_block = try_it.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.index("make wait-ready") < first_block.index("curl")
    assert not re.search(r"^\s*open\s+http", README, re.MULTILINE), "`open` is macOS-only"
    assert "xdg-open" not in README


def test_readme_deploy_shows_the_cpu_path_beside_the_gpu_one():
    deploy = _section("Deploy")
    assert "docker compose up -d --build" in deploy
    assert "docker/compose.cpu.yml" in deploy
    assert "VARIANT=cpu" in deploy
    assert "deploy/k8s/cpu" in deploy


def test_training_docs_use_no_layout_of_ours_and_say_where_data_goes(monkeypatch):
    from training.data import cache_dir

    text = (ROOT / "docs" / "training.md").read_text()
    assert "../shared" not in text
    monkeypatch.delenv("SOAP_CACHE_DIR", raising=False)
    default = cache_dir() / "datasets"
    assert default == Path.home() / ".cache" / "soap" / "datasets"
    assert "`~/.cache/soap/datasets`" in text
    assert "`$SOAP_CACHE_DIR/datasets`" in text
