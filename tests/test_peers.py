"""benchmarks/peers.py on a tiny load (--quick): the service, LitServe and PyTriton each started, loaded with the
same request bytes as its pair and stopped, every answer checked. What the test holds: every request answered 200,
the same label for each image from every server (so the same served accuracy), the ratios in the report, and no
server process left behind. Needs the `bench` extra (`make install` installs it); skipped without it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB_NUMPY = Path(sys.prefix) / "pytriton-numpy1"  # benchmarks/peers_pytriton.py says why

missing = [name for name in ("litserve", "pytriton") if importlib.util.find_spec(name) is None]
without_the_peers = pytest.mark.skipif(
    bool(missing), reason=f"the `bench` extra is not installed (no {', '.join(missing)}): make install"
)
without_the_stubs_numpy = pytest.mark.skipif(
    int(np.__version__.split(".")[0]) >= 2 and not (STUB_NUMPY / "numpy").is_dir(),
    reason=f"PyTriton's stub needs numpy<2: pip install --target {STUB_NUMPY} 'numpy<2' (make install does)",
)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_installs_the_bench_extras_peers_at_the_same_versions() -> None:
    """The dev install cannot take the `bench` extra as is (PyTriton's numpy pin): it names the peers itself."""
    bench = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    install = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True).stdout
    for requirement in bench:
        if not requirement.startswith("soap-serving"):
            assert f"'{requirement.split(';')[0].strip()}'" in install, requirement


@without_the_peers
@without_the_stubs_numpy
def test_peers_quick_run_serves_every_request_with_the_same_labels(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert sorted((r["server"], r["protocol"]) for r in rows) == [
        ("litserve", "json"), ("pytriton", "v2-binary"), ("soap", "json"), ("soap", "v2-binary"),
    ]  # fmt: skip
    images = report["summary"]["images"]
    for row in rows:
        assert row["requests"] > 0, row["name"]
        assert row["non_200"] == 0, row["name"]
        assert row["status_counts"] == {"200": row["requests"]}, row["name"]
        assert row["answers_200"] == row["answers_checked"], row["name"]  # the warm-up's answers too
        assert row["unreadable"] == 0, row["name"]
        assert row["images_answered"] == images, row["name"]  # every image was answered at least once
        assert row["inconsistent_images"] == 0, row["name"]
        assert row["leftover_processes_killed"] == [], row["name"]  # each server stopped on SIGTERM
    # Same labels for the same images from every server, hence the same served accuracy (a real model on real
    # digits: high).
    assert len({tuple(r["labels"]) for r in rows}) == 1
    assert report["summary"]["images_with_different_labels_across_servers"] == []
    accuracies = {r["served_accuracy"] for r in rows}
    assert len(accuracies) == 1
    assert accuracies.pop() >= 0.9
    # Each pair was sent the same bytes.
    digest = {(r["server"], r["protocol"]): r["extra"]["requests_sha256"] for r in rows}
    assert digest[("soap", "json")] == digest[("litserve", "json")]
    assert digest[("soap", "v2-binary")] == digest[("pytriton", "v2-binary")]
    assert digest[("soap", "json")] != digest[("soap", "v2-binary")]
    ratios = report["summary"]["ratios"]
    assert set(ratios) == {"soap_over_litserve_json", "soap_over_pytriton_v2-binary"}
    for ratio in ratios.values():
        assert len(ratio["per_round"]) == 1
        assert ratio["median"] > 0
    assert "| soap | json |" in proc.stdout  # the table docs/performance.md shows
