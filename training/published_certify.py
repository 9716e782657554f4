"""`python -m training published-certify`: certified accuracy of published MNIST smoothing baselines.

Jeong & Shin (NeurIPS 2020, "Consistency Regularization for Certified Robustness of Smoothed Classifiers")
released the per-image CERTIFY logs of their MNIST runs (github.com/jh-jeong/smoothing-consistency, MIT licence;
extracts under docs/results/published/jeong-shin-2020/). Recomputing the certified accuracy from those logs, on the
same first n test images as our own runs and on the whole test set, gives a comparison we can check rather than a
number copied from a table. Their setting differs from ours in ways the report states: LeNet base classifiers
trained for 90 epochs, noise not clamped to [0, 1], n = 100,000 Monte-Carlo samples (ours 10,000), α = 0.001.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .certify import RADII, ImageResult, certified_accuracy
from .records import Record
from .stats import Accuracy

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "results" / "published" / "jeong-shin-2020"
UPSTREAM = "github.com/jh-jeong/smoothing-consistency @ a11954aa91adb9924eecf49aaca74051e79bbb86"


@dataclass(frozen=True)
class PublishedRun:
    """One training recipe of the paper, certified once per training seed."""

    name: str
    recipe: str
    logs: tuple[str, ...]  # relative to SOURCE; upstream: data/certify/mnist/<upstream_dir>/<file>
    upstream_dir: str


RUNS = (
    PublishedRun(
        "Gaussian augmentation (Cohen et al. 2019)",
        "train_cohen.py mnist lenet --lr 0.01 --lr_step_size 30 --epochs 90 --noise 0.50",
        tuple(f"gaussian/noise_0.50_{s}.tsv.gz" for s in (1801, 393, 4490, 4608, 880)),
        "cohen",
    ),
    PublishedRun(
        "Gaussian + consistency (Jeong & Shin 2020, m = 2, λ = 5, η = 0.5)",
        "train_consistency.py mnist lenet --lr 0.01 --lr_step_size 30 --epochs 90 --noise 0.50 --num-noise-vec 2 "
        "--lbd 5",
        tuple(f"consistency/noise_0.50_{s}.tsv.gz" for s in (1, 2, 3, 4, 5)),
        "consistency/cohen/num_2/lbd_5.0/eta_0.5",
    ),
)


class SeedResult(Record):
    log: str
    first_n: dict[str, Accuracy]  # radius -> certified accuracy on the first n test images
    test_set: dict[str, Accuracy]  # radius -> on all images of the log


class RunResult(Record):
    name: str
    recipe: str
    upstream: str
    seeds: list[SeedResult]
    mean_first_n: dict[str, float]  # radius -> mean certified accuracy over seeds (first n)
    sd_first_n: dict[str, float]  # radius -> standard deviation over seeds (first n)


def read_log(path: Path) -> list[ImageResult]:
    """Cohen et al.'s certify.py output: idx, label, predict (-1 = abstain), radius, correct."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = []
    for row in rows:
        predicted = int(row["predict"])
        out.append(
            ImageResult(
                index=int(row["idx"]),
                label=int(row["label"]),
                predicted=None if predicted < 0 else predicted,
                radius=None if predicted < 0 else float(row["radius"]),
                p_lower=math.nan,  # not in the logs
                seconds=math.nan,
            )
        )
    return sorted(out, key=lambda r: r.index)


def evaluate_run(run: PublishedRun, n: int, source: Path = SOURCE) -> RunResult:
    seeds = []
    for log in run.logs:
        images = read_log(source / log)
        first = [r for r in images if r.index < n]
        if len(first) != n:
            raise ValueError(f"{log}: {len(first)} of the first {n} test images, expected all of them")
        seeds.append(
            SeedResult(
                log=log,
                first_n={str(r): certified_accuracy(first, r) for r in RADII},
                test_set={str(r): certified_accuracy(images, r) for r in RADII},
            )
        )
    per_radius = {str(r): [s.first_n[str(r)].accuracy for s in seeds] for r in RADII}
    return RunResult(
        name=run.name,
        recipe=run.recipe,
        upstream=f"{UPSTREAM}: data/certify/mnist/{run.upstream_dir}/",
        seeds=seeds,
        mean_first_n={r: statistics.fmean(v) for r, v in per_radius.items()},
        sd_first_n={r: statistics.stdev(v) if len(v) > 1 else 0.0 for r, v in per_radius.items()},
    )


def table(results: list[RunResult], n: int) -> str:
    """Markdown: per recipe, the seeds' certified accuracy on the first n images (mean, range) and on all 10,000."""
    radii = [str(r) for r in RADII]
    lines = [
        "| published recipe (LeNet, σ = 0.5, n = 100,000) | images | " + " | ".join(f"r = {r}" for r in radii) + " |",
        "| --- | --- | " + " | ".join("---" for _ in radii) + " |",
    ]
    for res in results:
        cells = []
        for r in radii:
            values = [100 * s.first_n[r].accuracy for s in res.seeds]
            cells.append(f"{statistics.fmean(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        lines.append(f"| {res.name}, {len(res.seeds)} seeds | first {n} | " + " | ".join(cells) + " |")
        cells = []
        for r in radii:
            values = [100 * s.test_set[r].accuracy for s in res.seeds]
            cells.append(f"{statistics.fmean(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        total = res.seeds[0].test_set[radii[0]].n
        lines.append(f"| {res.name}, {len(res.seeds)} seeds | all {total:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=500, help="the first n test images (as our certify runs)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder of the log extracts")
    parser.add_argument("--out", type=Path, default=SOURCE, help="writes published-certify.json and .md here")


def run(args: argparse.Namespace) -> int:
    results = [evaluate_run(r, args.n, args.source) for r in RUNS]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": f"python -m training published-certify --n {args.n}",
        "n": args.n,
        "radii": list(RADII),
        "upstream": UPSTREAM,
        "runs": [r.model_dump(mode="json") for r in results],
        "table_markdown": table(results, args.n),
    }
    (args.out / "published-certify.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "published-certify.md").write_text(report["table_markdown"] + "\n")
    print(report["table_markdown"])
    return 0
