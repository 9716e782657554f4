"""The published MNIST smoothing baselines recomputed from the authors' released CERTIFY logs."""

from __future__ import annotations

import argparse
import gzip
import json

import pytest

from training import published_certify
from training.published_certify import RUNS, SOURCE, evaluate_run, read_log


def test_logs_read_abstentions_as_no_prediction(tmp_path) -> None:
    log = tmp_path / "log.tsv.gz"
    with gzip.open(log, "wt") as f:
        f.write("idx\tlabel\tpredict\tradius\tcorrect\n1\t4\t-1\t0.0\t0\n0\t7\t7\t1.5\t1\n")
    first, second = read_log(log)
    assert (first.index, first.predicted, first.radius, first.correct) == (0, 7, 1.5, True)
    assert (second.index, second.predicted, second.radius, second.correct) == (1, None, None, False)


def test_every_shipped_log_covers_the_whole_test_set() -> None:
    for run in RUNS:
        for log in run.logs:
            images = read_log(SOURCE / log)
            assert [r.index for r in images] == list(range(10_000)), log


def test_certified_accuracy_falls_with_the_radius_and_consistency_beats_gaussian_at_one() -> None:
    gaussian, consistency = (evaluate_run(run, 500) for run in RUNS)
    for result in (gaussian, consistency):
        values = [result.mean_first_n[r] for r in sorted(result.mean_first_n, key=float)]
        assert values == sorted(values, reverse=True)
        # n = 100,000 at α = 0.001 cannot certify beyond σ·Φ⁻¹(α^(1/n)) ≈ 1.9
        assert result.mean_first_n["2.0"] == 0.0
    assert consistency.mean_first_n["1.0"] > gaussian.mean_first_n["1.0"]


def test_too_few_images_in_a_log_is_an_error(tmp_path) -> None:
    run = RUNS[0]
    folder = tmp_path / "gaussian"
    folder.mkdir()
    for log in run.logs:
        with gzip.open(tmp_path / log, "wt") as f:
            f.write("idx\tlabel\tpredict\tradius\tcorrect\n0\t7\t7\t1.5\t1\n")
    with pytest.raises(ValueError, match="1 of the first 500"):
        evaluate_run(run, 500, tmp_path)


def test_the_committed_report_is_what_the_command_writes(tmp_path) -> None:
    published_certify.run(argparse.Namespace(n=500, source=SOURCE, out=tmp_path))
    written = json.loads((tmp_path / "published-certify.json").read_text())
    committed = json.loads((SOURCE / "published-certify.json").read_text())
    assert written["table_markdown"] == committed["table_markdown"]
    assert _rounded(written) == _rounded(committed)  # interval ends may differ in the last bits across libraries


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
