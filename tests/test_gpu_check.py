"""The prepared device run (benchmarks/gpu_check.py) in its dry-run mode: every step on the CPU at tiny sizes, so the
script cannot rot between the rare occasions when a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    failed = {name: s["error"] for name, s in steps.items() if not s["ok"]}
    assert proc.returncode == 0, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    assert report["dry_run"] is True
    assert report["ok"] is True
    assert list(steps) == ["environment", "cuda_tests", "purifier", "service_load", "bf16", "compiled", "certify"]
    # Each step measured what it is for.
    fcn = steps["purifier"]["result"]["networks"]["mnist-fcn-dr"]
    assert fcn["best_images_per_s"] > 0
    assert all(0 < r["flop_fraction"] < 1.5 for r in fcn["rows"])
    assert steps["service_load"]["result"]["table_markdown"].count("\n") >= 3
    for check in ("bf16", "compiled"):
        row = steps[check]["result"]["models"]["mnist-fcn-dr"]
        assert 0 <= row["same_epsilon_share"] <= 1
        assert row["speedup"] > 0
    assert steps["compiled"]["result"]["same_epsilon_everywhere"] is True
    certify = steps["certify"]["result"]["rows"]
    assert set(certify) == {"mnist-fcn-dr n=100", "mnist-cnn-dr n=100"}
    assert all(r["forward_passes_per_s"] > 0 for r in certify.values())
    assert (tmp_path / "gpu_check.log").read_text().count(": ok in") == len(steps)
