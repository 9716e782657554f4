"""benchmarks/service_ab.py, the side-by-side comparison of two revisions of the service, on a tiny load: both servers
start from their own trees, both are loaded in every round, and the report holds what docs/performance.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_service_ab_loads_both_revisions_and_reports_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.service_ab", "--base", "HEAD", "--rounds", "2", "--duration", "1",
         "--warmup", "0.5", "--concurrency", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["round"], r["name"]) for r in report["rounds"]] == [(0, "base"), (0, "work"), (1, "work"), (1, "base")]
    for row in report["rounds"]:
        assert row["ok"] > 0, row
        assert row["ok"] == row["requests"], row
        assert row["extra"]["event_loop_cpu_us_per_request"] > 0
    summary = report["summary"]
    assert summary["non_200"] == {"base": 0, "work": 0}
    assert len(summary["throughput_ratio_work_over_base"]) == 2
    assert summary["median_ratio"] > 0
    # The base ran from its own checkout, which is gone afterwards.
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "soap-ab-" not in worktrees


def test_service_ab_against_granian_serves_the_same_app_under_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "granian.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.service_ab", "--against-granian", "--rounds", "1", "--duration", "1",
         "--warmup", "0.5", "--concurrency", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rounds"]] == ["uvicorn", "granian"]
    for row in report["rounds"]:
        assert row["ok"] > 0, row
        assert row["ok"] == row["requests"], row
        # the CPU is counted in the process that runs the app (Granian's worker, not its idle main process)
        assert row["extra"]["event_loop_cpu_us_per_request"] > 0
    assert report["summary"]["non_200"] == {"uvicorn": 0, "granian": 0}
    assert report["granian"]
