"""`python -m training evaluate` under torchrun (2 CPU processes, Gloo) writes the results.json one process writes;
an evaluation killed half-way resumes from its per-batch partial results and ends with the same results.json.

Real processes (torchrun's launcher, SIGKILL), the shipped MNIST FCN-DR checkpoint, real test digits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
DIGITS = ROOT / "tests" / "data" / "mnist"
ATTACKS = "noise,fgsm,pgd,apgd-ce,bpda,apgd-bpda,apgd-evade"
ARGS = [
    "evaluate",
    "--model",
    str(MODEL),
    "--data-root",
    str(DIGITS),
    "--images",  # = --n, which torchrun's parser would take for an abbreviation of its own options
    "26",
    "--batch-size",
    "4",  # 7 batches: a short last batch, and 4 + 3 batches on the two ranks
    "--seed",
    "5",
    "--attacks",
    ATTACKS,
    "--device",
    "cpu",
    "--threads",
    "1",
    "--pgd-steps",
    "5",
    "--adaptive-steps",
    "3",
    "--apgd-steps",
    "5",
    "--apgd-restarts",
    "2",
    "--sanity-n",
    "8",
    "--beta-n",
    "8",
    "--no-figures",
]
VOLATILE = ("seconds", "command", "host", "resumed_batches")  # timing, the --out path, the work split

pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _stable(value: object) -> object:
    """The result without what legitimately differs between runs of the same evaluation."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _evaluate(out: Path, processes: int = 1) -> dict:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    run = subprocess.run(
        [*launcher, "-m", "training", *ARGS, "--out", str(out)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _evaluate(tmp_path_factory.mktemp("single"))


def test_torchrun_writes_the_single_process_result(single, tmp_path):
    shared = _evaluate(tmp_path / "two", processes=2)
    assert shared["attacks"]["apgd-bpda"]["n"] == 26
    assert set(shared["attacks"]) == set(ATTACKS.split(","))
    assert _stable(shared) == _stable(single)
    assert shared["host"].endswith("1 threads × 2 processes")  # the host line says how it ran
    assert "processes" not in single["host"]
    assert (tmp_path / "two" / "model_info.json").exists()
    partial = next((tmp_path / "two" / ".partial").iterdir())
    assert len(list(partial.glob("apgd-bpda-*.pt"))) == 7  # every batch once, over both ranks


def test_killed_evaluation_resumes(single, tmp_path):
    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *ARGS, "--out", str(out)],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob(".partial/*/apgd-bpda-*.pt"))) >= 2:  # the first columns and part of APGD are done
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it could be interrupted"
    assert not (out / "results.json").exists()
    result = _evaluate(out)
    resumed = {name: a["resumed_batches"] for name, a in result["attacks"].items()}
    assert resumed["pgd"] == 7
    assert resumed["apgd-bpda"] >= 2
    assert sum(resumed.values()) < 7 * len(resumed)  # and the rest was computed now
    # the wall time counts the batches the killed run computed, not only the seconds spent reading them back
    assert result["wall_seconds"] >= sum(a["seconds_per_image"] * a["n"] for a in result["attacks"].values())
    assert _stable(result) == _stable(single)
