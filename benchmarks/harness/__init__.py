"""The benchmark harness, shared by benchmarks/ and tests/: a server subprocess on a free loopback port that is
started, awaited on its readiness route and drained on exit (`server`), the load generator and its level records
(`load`), and CPU accounting of a process tree from /proc (`cpu`). service/ never imports this package."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
