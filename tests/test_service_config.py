"""The settings loader (service/config.py on pydantic-settings): help and version, the API key from a file, and the
real environment as a source. (Precedence and bad values: tests/test_service_server.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT

from models import __version__
from service.config import ServiceSettings, _env_name, load_settings


def test_help_lists_every_setting_and_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        load_settings(["--help"], {})
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ServiceSettings.model_fields:
        assert "--" + name.replace("_", "-") in text, name
    assert "--model " in text
    assert "SOAP_MODELS" in text
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert proc.stdout.split()[-1] == __version__


def test_api_key_comes_from_a_secret_file(tmp_path):
    secret = tmp_path / "soap_api_key"
    secret.write_text("file-key-123\n")  # secret files usually end with a newline: it is not part of the key
    settings = load_settings(["--model", "m"], {"SOAP_API_KEY_FILE": str(secret)})
    assert settings.api_key_file == secret
    assert settings.api_key == "file-key-123"
    assert "file-key" not in json.dumps(settings.model_dump(mode="json"))
    secret.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        _ = settings.api_key
    with pytest.raises(ValueError, match="cannot read"):
        _ = ServiceSettings(models=["m"], api_key_file=tmp_path / "missing").api_key
    with pytest.raises(SystemExit) as info:
        load_settings(["--model", "m", "--api-key-env", "X"], {"SOAP_API_KEY_FILE": str(secret)})
    assert info.value.code == 2


def test_process_environment_is_read_when_no_mapping_is_given(monkeypatch):
    monkeypatch.setenv(_env_name("models"), "a/one,b/two")
    monkeypatch.setenv(_env_name("max_queue"), "7")
    monkeypatch.setenv(_env_name("compute_process"), "false")
    settings = load_settings(["--max-queue", "9"])
    assert settings.model_names == ["one", "two"]
    assert settings.max_queue == 9
    assert settings.compute_process is False
    assert load_settings([], {"SOAP_MODELS": "c/three"}).model_names == ["three"]  # a given mapping replaces it


def test_the_pool_is_sized_from_the_containers_cpu_quota(tmp_path, monkeypatch):
    """A pod limited to 4 CPUs on a 64-core node (cgroup v2 cpu.max, v1 cfs quota) gets 4 compute workers."""
    from service import config

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("400000 100000\n")
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")  # half a CPU
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert config.usable_cores(64, config.cgroup_cpus(v2)) == 4
    assert config.usable_cores(2, config.cgroup_cpus(v2)) == 2  # the affinity is smaller
    assert config.usable_cores(64, config.cgroup_cpus(v1)) == 1  # never none
    assert config.usable_cores(64, config.cgroup_cpus(tmp_path / "no-cgroup")) == 64

    # Through the settings: a 64-core affinity mask, the quota's 4 CPUs, 8 GiB of memory.
    read_quota = config.cgroup_cpus
    monkeypatch.setattr(config, "cgroup_cpus", lambda: read_quota(v2))
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(config, "_memory_bytes", lambda: 8 << 30)
    assert ServiceSettings(models=[tmp_path]).pool_size() == 4
