"""The published MNIST smoothing baselines recomputed from the authors' released CERTIFY logs."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from training import published_certify
from training.certify import table_radii
from training.published_certify import (
    PUBLISHED,
    REPORT,
    RUNS,
    SIGMAS,
    PublishedRecipe,
    evaluate_run,
    max_radius,
    read_log,
)

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\n"


def _write_log(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(HEADER + "".join(row + "\n" for row in rows))


def test_logs_read_abstentions_as_no_prediction(tmp_path) -> None:
    log = tmp_path / "log.tsv.gz"
    _write_log(log, ["1\t4\t-1\t0.0\t0", "0\t7\t7\t1.5\t1"])
    first, second = read_log(log)
    assert (first.index, first.predicted, first.radius, first.correct) == (0, 7, 1.5, True)
    assert (second.index, second.predicted, second.radius, second.correct) == (1, None, None, False)


def _hand_made_run(tmp_path: Path) -> published_certify.PublishedRun:
    """A run of two logs over 10,000 images: four hand-written first images, the rest abstained."""
    run = next(r for r in RUNS if r.sigma == 0.5 and r.recipe == PublishedRecipe.GAUSSIAN)
    first_images = {
        # correct at 1.5 and 0.5, a wrong prediction with a large radius, an abstention
        run.logs[0]: ["0\t7\t7\t1.5\t1", "1\t2\t2\t0.5\t1", "2\t1\t3\t1.9\t0", "3\t0\t-1\t0.0\t0"],
        # correct at 0.25, 0.75, 1.0 and 0.3
        run.logs[1]: ["0\t7\t7\t0.25\t1", "1\t2\t2\t0.75\t1", "2\t1\t1\t1.0\t1", "3\t0\t0\t0.3\t1"],
    }
    rest = [f"{i}\t5\t-1\t0.0\t0" for i in range(4, 10_000)]
    for log, rows in first_images.items():
        _write_log(tmp_path / run.upstream.folder / log, rows + rest)
    return dataclasses.replace(run, logs=run.logs[:2])


def test_acr_and_certified_accuracy_of_a_hand_made_log(tmp_path) -> None:
    result = evaluate_run(_hand_made_run(tmp_path), 4, tmp_path)
    first, second = result.seeds
    # ACR: the radius when correct, else 0 (the wrong prediction's 1.9 and the abstention count 0)
    assert first.acr_first_n == pytest.approx((1.5 + 0.5) / 4)
    assert second.acr_first_n == pytest.approx((0.25 + 0.75 + 1.0 + 0.3) / 4)
    assert first.acr_test_set == pytest.approx(2.0 / 10_000)  # the 9,996 abstentions count 0 too
    assert result.mean_acr_first_n == pytest.approx((0.5 + 0.575) / 2)
    assert [first.first_n[r] for r in ("0.0", "0.5", "0.75", "1.5", "2.0")] == [2, 2, 1, 1, 0]
    assert [second.first_n[r] for r in ("0.0", "0.5", "1.0", "1.25")] == [4, 2, 1, 0]
    assert result.mean_first_n["0.5"] == pytest.approx(0.5)


def test_a_log_with_a_missing_image_is_an_error(tmp_path) -> None:
    run = _hand_made_run(tmp_path)
    path = tmp_path / run.upstream.folder / run.logs[1]
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    _write_log(path, [line for line in lines[1:] if not line.startswith("2\t")])
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        evaluate_run(run, 4, tmp_path)


def test_too_few_images_in_a_log_is_an_error(tmp_path) -> None:
    run = RUNS[0]
    for log in run.logs:
        _write_log(tmp_path / run.upstream.folder / log, ["0\t7\t7\t1.5\t1"])
    with pytest.raises(ValueError, match="1 of the first 10000"):
        evaluate_run(run, 500, tmp_path)


@pytest.fixture(scope="module")
def published() -> list[published_certify.RunResult]:
    """Every run recomputed from the shipped logs (evaluate_run refuses a log without each of the 10,000 images)."""
    return [evaluate_run(run, 500) for run in RUNS]


def test_each_sigma_has_the_three_recipes_each_from_five_runs_or_more(published) -> None:
    assert SIGMAS == (0.25, 0.5, 1.0)
    for sigma in SIGMAS:
        assert {r.recipe for r in published if r.sigma == sigma} == set(PublishedRecipe)
    for run, result in zip(RUNS, published, strict=True):
        assert len(result.seeds) == len(run.logs) >= 5, run.name
        assert all(f"noise_{run.sigma:.2f}_" in log for log in run.logs)


def test_the_sigma_05_numbers_of_the_first_two_recipes_are_unchanged(published) -> None:
    """What this command reported before it covered three σ (certified counts per run at r = 1.0 and 1.5)."""
    gaussian, consistency = (r for r in published if r.sigma == 0.5 and r.recipe != PublishedRecipe.SMOOTHMIX)
    assert gaussian.radii == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    before = {
        "gaussian": ([433, 437, 438, 436, 435], [305, 304, 315, 312, 310], [8975, 8987, 8983, 8981, 8990]),
        "consistency": ([460, 458, 454, 458, 454], [359, 360, 365, 361, 359], [9296, 9296, 9286, 9293, 9272]),
    }
    for result in (gaussian, consistency):
        at_1, at_15, all_at_1 = before[result.recipe]
        assert [s.first_n["1.0"] for s in result.seeds] == at_1
        assert [s.first_n["1.5"] for s in result.seeds] == at_15
        assert [s.test_set["1.0"] for s in result.seeds] == all_at_1
    assert consistency.mean_first_n["1.0"] == pytest.approx(0.9136)
    assert gaussian.mean_first_n["1.0"] == pytest.approx(0.8716)


def test_acr_of_the_released_logs_matches_the_papers_order(published) -> None:
    """On all 10,000 images: consistency and SmoothMix above Gaussian at every σ, SmoothMix's best at least
    consistency's, and no certificate beyond what n = 100,000 samples allow."""
    for sigma in SIGMAS:
        acr: dict[str, float] = {}
        for r in published:
            if r.sigma == sigma:
                acr[r.recipe] = max(acr.get(r.recipe, 0.0), r.mean_acr_test_set)
                values = [r.mean_first_n[str(x)] for x in r.radii]
                assert values == sorted(values, reverse=True)
                assert r.radii == list(table_radii(sigma))
                assert r.mean_first_n[str(r.radii[-1])] < 0.01  # the last column lies at or above max_radius
        assert acr["gaussian"] < acr["consistency"] <= acr["smoothmix"]
    assert max_radius(0.5) == pytest.approx(1.905, abs=1e-3)


def test_the_committed_report_is_what_the_command_writes(tmp_path) -> None:
    published_certify.run(argparse.Namespace(n=500, source=PUBLISHED, out=tmp_path))
    written = json.loads((tmp_path / REPORT).read_text())
    committed = json.loads((PUBLISHED / REPORT).read_text())
    assert written["table_markdown"] == committed["table_markdown"]
    assert (PUBLISHED / "published-certify.md").read_text() == written["table_markdown"] + "\n"
    assert _rounded(written) == _rounded(committed)  # sums of floats may differ in the last bits across libraries


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
