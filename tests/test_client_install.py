"""The Python client as a user installs it: `pip install -e '.[client]'` into an empty virtual environment pulls
httpx and not torch (nor numpy or Pillow), and that environment's `service.client` classifies real digits on a real
running service. About 10 s on a 2-core machine (venv, pip from the configured indexes, one server start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, ServiceProcess, mnist_path

# What the client venv runs: file paths need neither Pillow nor numpy.
CLIENT_SCRIPT = """
import importlib.util, json, sys
from service.client import SoapClient
absent = [m for m in ("torch", "numpy", "PIL", "fastapi") if importlib.util.find_spec(m) is None]
with SoapClient(sys.argv[1]) as soap:
    result = soap.classify(sys.argv[2:])
print(json.dumps({"labels": [p.label for p in result.predictions], "absent": absent}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's tracked files with a fresh venv holding `.[client]` installed from it (editable,
    as the README says); the copy keeps pip's build files out of the working tree."""
    tmp = tmp_path_factory.mktemp("client-install")
    source = tmp / "soap-serving"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{source}[client]"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def _installed(venv: Path) -> set[str]:
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {p["name"].lower() for p in json.loads(listing.stdout)}


def test_client_extra_installs_httpx_without_torch(client_venv: Path) -> None:
    installed = _installed(client_venv)
    assert {"httpx", "soap-serving"} <= installed
    heavy = installed & {"torch", "numpy", "pillow", "scipy", "safetensors", "pydantic", "fastapi", "uvicorn"}
    assert not heavy, f"the client extra pulled {sorted(heavy)}"


def test_installed_client_classifies_on_a_real_server(client_venv: Path, model_dir: Path) -> None:
    server = ServiceProcess(["--model", str(model_dir)])
    try:
        server.wait_ready()
        digits = [(7, mnist_path(7)), (2, mnist_path(2, 1)), (1, mnist_path(1))]
        run = subprocess.run(
            [str(client_venv / "bin" / "python"), "-c", CLIENT_SCRIPT, server.url, *(str(p) for _, p in digits)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=client_venv,  # not the repository: `service` must come from the venv's install
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["absent"] == ["torch", "numpy", "PIL", "fastapi"]
    assert answer["labels"] == [d for d, _ in digits]
