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
    CONSISTENCY_BASELINES,
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


def test_each_sigma_has_every_recipe_each_from_five_runs_or_more(published) -> None:
    assert SIGMAS == (0.25, 0.5, 1.0)
    for sigma in SIGMAS:
        assert {r.recipe for r in published if r.sigma == sigma} == set(PublishedRecipe)
    for run, result in zip(RUNS, published, strict=True):
        assert len(result.seeds) == len(run.logs) >= 5, run.name
        assert all(f"noise_{run.sigma:.2f}_" in log for log in run.logs)


# The consistency paper's other MNIST recipes (smoothing-consistency @ bc2b1a7), in its EXPERIMENTS.MD's order
BASELINES = (
    PublishedRecipe.SMOOTHADV,
    PublishedRecipe.STABILITY,
    PublishedRecipe.MACER,
    PublishedRecipe.CONSISTENCY_L20,
    PublishedRecipe.SMOOTHADV_CONSISTENCY,
)
# bc2b1a7's EXPERIMENTS.MD, less "CUDA_VISIBLE_DEVICES=[num] python code/", its line breaks and doubled spaces
LENET_050 = "mnist lenet --lr 0.01 --lr_step_size 30 --epochs 90 --noise 0.50"
AUTHORS_COMMANDS_050 = {
    PublishedRecipe.SMOOTHADV: f"train_salman.py {LENET_050} --attack PGD --epsilon 255 --num-steps 10 --warmup 10 "
    "--num-noise-vec 4",
    PublishedRecipe.STABILITY: f"train_stab.py {LENET_050} --lbd 2",
    PublishedRecipe.MACER: f"train_macer.py {LENET_050} --num-noise-vec 16 --beta 16.0 --margin 8.0 --lbd 16.0 "
    "--deferred",
    PublishedRecipe.CONSISTENCY_L20: f"train.py {LENET_050} --num-noise-vec 2 --lbd 20",
    PublishedRecipe.SMOOTHADV_CONSISTENCY: f"train.py {LENET_050} --num-noise-vec 4 --lbd 5 --adv-training "
    "--epsilon 255 --num-steps 10 --warmup 10",
}


def test_the_consistency_papers_other_recipes_follow_the_others_at_each_sigma() -> None:
    """Five runs each, from bc2b1a7, after the earlier recipes (whose table rows keep their order), with the authors'
    commands; every extract in their folder is used."""
    assert CONSISTENCY_BASELINES.commit.startswith("bc2b1a7")
    for sigma in SIGMAS:
        runs = [r for r in RUNS if r.sigma == sigma]
        assert [r.recipe for r in runs[: -len(BASELINES)]] == [
            PublishedRecipe.GAUSSIAN,
            PublishedRecipe.CONSISTENCY,
            *[PublishedRecipe.SMOOTHMIX] * 4,
        ]
        assert tuple(r.recipe for r in runs[-len(BASELINES) :]) == BASELINES
        for run in runs[-len(BASELINES) :]:
            assert run.upstream == CONSISTENCY_BASELINES, run.name
            assert len(run.logs) == 5, run.name
            assert all(log.startswith(f"{run.recipe}/noise_{sigma:.2f}_") for log in run.logs)
            if sigma == 0.5:
                assert run.command == AUTHORS_COMMANDS_050[run.recipe]
    macer_at_1 = next(r for r in RUNS if r.sigma == 1.0 and r.recipe == PublishedRecipe.MACER)
    assert "--lbd 6.0 --deferred" in macer_at_1.command
    assert "/lbd_6.0/" in macer_at_1.source
    folder = PUBLISHED / CONSISTENCY_BASELINES.folder
    shipped = {p.relative_to(folder).as_posix() for p in folder.rglob("*.tsv.gz")}
    assert shipped == {log for r in RUNS if r.upstream == CONSISTENCY_BASELINES for log in r.logs}
    assert len(shipped) == len(BASELINES) * len(SIGMAS) * 5


def test_every_shipped_log_holds_each_test_image_once_in_order() -> None:
    """The extracts' header and one row per test image, idx 0 to 9,999 in order: evaluate_run checks the first
    10,000 indices but would not notice a row past them."""
    for run in RUNS:
        for log in run.logs:
            with gzip.open(PUBLISHED / run.upstream.folder / log, "rt") as f:
                header, *rows = f.read().splitlines()
            assert header + "\n" == HEADER, log
            assert [int(row.split("\t", 1)[0]) for row in rows] == list(range(10_000)), log


def _by_hand(path: Path, n: int, radius: float) -> tuple[int, float]:
    """Of the first n rows of an extract: how many are correct with a radius ≥ radius, and their ACR, from the raw
    columns (correct = 1 means a prediction equal to the label; an abstention logs correct 0)."""
    with gzip.open(path, "rt") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1 : n + 1]]
    certified = [float(row[3]) for row in rows if row[4] == "1"]
    return sum(r >= radius for r in certified), sum(certified) / n


@pytest.mark.parametrize(
    ("recipe", "sigma", "log", "radius", "first_500", "test_set"),
    [
        (PublishedRecipe.SMOOTHADV, 0.5, "smoothadv/noise_0.50_3916.tsv.gz", 1.0, 455, 9284),
        (PublishedRecipe.MACER, 1.0, "macer/noise_1.00_1549.tsv.gz", 2.0, 157, 3841),
        (PublishedRecipe.STABILITY, 1.0, "stability/noise_1.00_1944.tsv.gz", 1.5, None, None),
        (PublishedRecipe.CONSISTENCY_L20, 0.25, "consistency-lbd20/noise_0.25_746.tsv.gz", 0.75, None, None),
        (PublishedRecipe.SMOOTHADV_CONSISTENCY, 0.5, "smoothadv-consistency/noise_0.50_6072.tsv.gz", 1.5, None, None),
    ],
)
def test_a_new_log_recomputed_by_hand(published, recipe, sigma, log, radius, first_500, test_set) -> None:
    result = next(r for r in published if r.recipe == recipe and r.sigma == sigma)
    seed = next(s for s in result.seeds if s.log == log)
    path = PUBLISHED / CONSISTENCY_BASELINES.folder / log
    count, acr = _by_hand(path, 500, radius)
    all_count, all_acr = _by_hand(path, 10_000, radius)
    assert (seed.first_n[str(radius)], seed.test_set[str(radius)]) == (count, all_count)
    assert (seed.acr_first_n, seed.acr_test_set) == (pytest.approx(acr), pytest.approx(all_acr))
    if first_500 is not None:
        assert (count, all_count) == (first_500, test_set)


def test_the_sigma_05_numbers_of_the_consistency_papers_other_recipes(published) -> None:
    """Certified counts per run at r = 1.0 and 1.5 of the first 500 images, and at r = 1.0 of all 10,000, and the
    mean ACR over runs, when this command first covered these recipes."""
    expected = {
        PublishedRecipe.SMOOTHADV: (
            [455, 454, 454, 454, 453],
            [383, 379, 381, 382, 376],
            [9284, 9305, 9295, 9291, 9293],
            (1.6391, 1.6872),
        ),
        PublishedRecipe.STABILITY: (
            [442, 438, 438, 440, 438],
            [316, 313, 313, 309, 312],
            [9073, 9067, 9095, 9072, 9068],
            (1.5143, 1.5719),
        ),
        PublishedRecipe.MACER: (
            [435, 438, 441, 433, 438],
            [329, 332, 330, 330, 329],
            [8998, 9017, 9017, 8993, 9044],
            (1.5332, 1.5899),
        ),
        PublishedRecipe.CONSISTENCY_L20: (
            [456, 457, 459, 454, 456],
            [374, 372, 369, 368, 374],
            [9308, 9305, 9300, 9304, 9300],
            (1.6178, 1.6653),
        ),
        PublishedRecipe.SMOOTHADV_CONSISTENCY: (
            [451, 450, 449, 452, 453],
            [386, 382, 384, 385, 386],
            [9174, 9171, 9160, 9179, 9171],
            (1.6419, 1.6901),
        ),
    }
    for result in (r for r in published if r.sigma == 0.5 and r.recipe in expected):
        at_1, at_15, all_at_1, (acr_first, acr_all) = expected[result.recipe]
        assert [s.first_n["1.0"] for s in result.seeds] == at_1, result.name
        assert [s.first_n["1.5"] for s in result.seeds] == at_15, result.name
        assert [s.test_set["1.0"] for s in result.seeds] == all_at_1, result.name
        assert result.mean_acr_first_n == pytest.approx(acr_first, abs=5e-5)
        assert result.mean_acr_test_set == pytest.approx(acr_all, abs=5e-5)


def test_the_sigma_05_numbers_of_the_first_two_recipes_are_unchanged(published) -> None:
    """What this command reported before it covered three σ (certified counts per run at r = 1.0 and 1.5)."""
    gaussian, consistency = (
        next(r for r in published if r.sigma == 0.5 and r.recipe == recipe)
        for recipe in (PublishedRecipe.GAUSSIAN, PublishedRecipe.CONSISTENCY)
    )
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
    """On all 10,000 images: consistency (either release) and SmoothMix above Gaussian at every σ, SmoothMix's best at
    least consistency's, and no certificate beyond what n = 100,000 samples allow. (Not every order of the paper holds
    in every column: MACER's ACR is below Gaussian's at σ = 1.0, SmoothAdv + consistency's below SmoothAdv's at
    σ = 0.25.)"""
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
        assert acr["gaussian"] < acr["consistency-lbd20"]  # consistency's first release, too
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
