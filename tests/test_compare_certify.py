"""`python -m training compare-certify`: two certification logs compared image by image."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from models.smoothing import SmoothingConfig
from training.__main__ import main
from training.certify import CertifyLogHeader, ImageResult
from training.published_certify import PUBLISHED, REPORT

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
CLAMPED = RESULTS / "mnist-lenet-dr-consistency-s05" / "certify" / "certify-noisy.jsonl"
UNCLAMPED = RESULTS / "mnist-lenet-dr-consistency-unclamped-s05" / "certify" / "certify-noisy.jsonl"


def _write(path: Path, results: list[ImageResult], sigma: float = 0.5) -> Path:
    header = CertifyLogHeader("m", "noisy", 0, SmoothingConfig(sigma=sigma, n=100_000))
    path.write_text("".join([header.to_json() + "\n", *(json.dumps(dataclasses.asdict(r)) + "\n" for r in results)]))
    return path


def _image(index: int, radius: float | None, correct: bool = True, p_lower: float = 0.9) -> ImageResult:
    return ImageResult(index, 3, (3 if correct else 4) if radius is not None else None, radius, p_lower, 1.0)


def test_discordant_images_and_the_paired_acr_of_hand_made_logs(tmp_path, capsys) -> None:
    # A certifies images 0-5 at 1.6; B certifies 0 at 1.6 and 1-5 at 0.6; image 6 is wrong in A, abstained in B
    a = [_image(i, 1.6, p_lower=0.999) for i in range(6)] + [_image(6, 1.2, correct=False)]
    b = [_image(0, 1.6, p_lower=0.999)] + [_image(i, 0.6, p_lower=0.9) for i in range(1, 6)] + [_image(6, None)]
    out = tmp_path / "comparison.json"
    assert main(["compare-certify", str(_write(tmp_path / "a.jsonl", a)), str(_write(tmp_path / "b.jsonl", b)),
                 "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    at = {r["radius"]: r for r in result["radii"]}
    assert (at[0.5]["certified_a"], at[0.5]["certified_b"], at[0.5]["a_only"], at[0.5]["b_only"]) == (6, 6, 0, 0)
    assert (at[1.5]["certified_a"], at[1.5]["certified_b"], at[1.5]["a_only"], at[1.5]["b_only"]) == (6, 1, 5, 0)
    assert at[1.5]["p_value"] == pytest.approx(2 * 0.5**5)  # McNemar exact: 5 of 5 discordant images one way
    assert at[0.5]["p_value"] == 1.0
    assert result["images"] == 7
    assert result["acr_difference"] == pytest.approx(5 * 1.0 / 7)  # five images 1.0 further; image 6 is 0 in both
    lo, hi = result["acr_difference_ci95"]
    assert lo < result["acr_difference"] < hi
    assert (result["p_lower_higher"], result["p_lower_lower"]) == (5, 0)
    assert "| 1.5 | 6 | 1 | 5 | 0 |" in capsys.readouterr().out


def test_first_n_restricts_the_comparison(tmp_path) -> None:
    a = _write(tmp_path / "a.jsonl", [_image(i, 1.6) for i in range(4)])
    b = _write(tmp_path / "b.jsonl", [_image(i, 0.1) for i in range(4)])
    out = tmp_path / "c.json"
    assert main(["compare-certify", str(a), str(b), "--first-n", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 2


def test_a_folder_reads_its_log_and_its_part_logs_together(tmp_path) -> None:
    folder = tmp_path / "certify"
    folder.mkdir()
    _write(folder / "certify-noisy.part0.jsonl", [_image(0, 1.6), _image(2, 1.6)])
    _write(folder / "certify-noisy.part1.jsonl", [_image(1, 1.6)])
    b = _write(tmp_path / "b.jsonl", [_image(i, 1.0) for i in range(3)])
    out = tmp_path / "c.json"
    assert main(["compare-certify", str(folder), str(b), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 3


@pytest.mark.parametrize(
    ("b_sigma", "message"),
    [(0.25, "different σ"), (None, "no image in common")],
)
def test_logs_that_cannot_be_compared_are_refused_with_a_reason(tmp_path, capsys, b_sigma, message) -> None:
    a = _write(tmp_path / "a.jsonl", [_image(0, 1.0)])
    b = _write(tmp_path / "b.jsonl", [_image(1 if b_sigma is None else 0, 1.0)], sigma=b_sigma or 0.5)
    assert main(["compare-certify", str(a), str(b)]) == 2
    assert message in capsys.readouterr().err


def test_two_released_logs_need_sigma(tmp_path, capsys) -> None:
    log = tmp_path / "log.tsv.gz"
    with gzip.open(log, "wt") as f:
        f.write("idx\tlabel\tpredict\tradius\tcorrect\n0\t7\t7\t1.5\t1\n")
    assert main(["compare-certify", str(log), str(log)]) == 2
    assert "--sigma" in capsys.readouterr().err
    assert main(["compare-certify", str(log), str(log), "--sigma", "0.5"]) == 0


def test_the_committed_unclamped_and_clamped_runs_compare_as_the_notes_say(tmp_path) -> None:
    """The figures docs/results-notes.md quotes for the unclamped σ = 0.5 model against the shipped clamped one."""
    out = tmp_path / "c.json"
    assert main(["compare-certify", str(UNCLAMPED), str(CLAMPED), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    at = {r["radius"]: r for r in result["radii"]}
    assert result["images"] == 500
    assert (at[1.0]["certified_a"], at[1.0]["certified_b"]) == (452, 448)  # 90.4 % and 89.6 %
    assert (at[1.5]["certified_a"], at[1.5]["certified_b"]) == (371, 357)  # 74.2 % and 71.4 %
    assert (result["p_lower_higher"], result["p_lower_lower"]) == (274, 79)


def test_a_released_log_counts_as_published_certify_counts_it(tmp_path) -> None:
    """Against a released SmoothMix run, B's counts are that run's first-500 counts in published-certify.json."""
    report = json.loads((PUBLISHED / REPORT).read_text())
    smoothmix = next(r for r in report["runs"] if r["recipe"] == "smoothmix" and r["sigma"] == 0.5)
    seed = smoothmix["seeds"][0]
    released = next(PUBLISHED.glob(f"*/{seed['log']}"))
    out = tmp_path / "c.json"
    assert main(["compare-certify", str(UNCLAMPED), str(released), "--first-n", "500", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    counts_b = {r["radius"]: r["certified_b"] for r in result["radii"]}
    assert counts_b == {float(radius): count for radius, count in seed["first_n"].items()}
    assert result["acr_b"] == pytest.approx(seed["acr_first_n"])
    assert result["p_lower_higher"] is None  # released logs carry no p_A
