"""`python -m training published-certify`: certified accuracy and ACR of the published MNIST smoothing baselines.

The smoothing papers released the per-image CERTIFY logs of their MNIST runs: Gaussian augmentation (Cohen et al.
2019) and consistency regularisation (Jeong & Shin, NeurIPS 2020) in github.com/jh-jeong/smoothing-consistency,
SmoothMix (Jeong et al., NeurIPS 2021) in github.com/jh-jeong/smoothmix (both MIT; extracts under
docs/results/published/). The consistency paper's other MNIST runs are in an older commit of its repository (bc2b1a7,
October 2020): SmoothAdv (Salman et al. 2019), stability training (Li et al. 2019), MACER (Zhai et al. 2020), and
consistency as first released (Gaussian + consistency at λ = 20, SmoothAdv + consistency at λ = 5), trained with that
commit's loss λ·(KL + an entropy term the authors later called incorrectly implemented) rather than the later
λ·KL + η·H of the consistency recipe above; the later commits dropped those two. Recomputing certified accuracy and
the average certified radius from those logs, on the same first n test images as our own runs and on the whole test
set, at σ = 0.25, 0.5 and 1.0, gives a comparison we can check rather than a number copied from a table. Their setting
differs from ours in ways the report states: LeNet base classifiers trained for 90 epochs, noise not clamped to
[0, 1], n = 100,000 Monte-Carlo samples, α = 0.001.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import statistics
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .certify import ImageResult, average_certified_radius, certified_accuracy, table_radii
from .records import Record

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "results" / "published"  # one folder of extracts per upstream repository, and the report
REPORT = "published-certify.json"
SIGMAS = (0.25, 0.5, 1.0)
ALPHA, SAMPLES = 0.001, 100_000  # the logs' CERTIFY settings (N0 = 100)
TEST_IMAGES = 10_000


@dataclass(frozen=True)
class Upstream:
    """A repository the logs come from, at the commit they were extracted from, and the folder of the extracts."""

    repo: str
    commit: str
    folder: str  # under PUBLISHED

    def __str__(self) -> str:
        return f"{self.repo} @ {self.commit}"


SMOOTHING_CONSISTENCY = Upstream(
    "github.com/jh-jeong/smoothing-consistency", "a11954aa91adb9924eecf49aaca74051e79bbb86", "jeong-shin-2020"
)
SMOOTHMIX = Upstream(
    "github.com/jh-jeong/smoothmix", "cb1fd33055a29d0c41bbc429a982fdec709e993c", "jeong-2021-smoothmix"
)
# The consistency paper's baselines and first-release consistency runs: the commit that added them (the MACER,
# SmoothAdv and stability logs are byte-identical at SMOOTHING_CONSISTENCY's commit; the consistency ones are not there)
CONSISTENCY_BASELINES = Upstream(
    "github.com/jh-jeong/smoothing-consistency", "bc2b1a7e2226a4af7b8e107c57634ff2775e947f", "jeong-shin-2020-baselines"
)
UPSTREAMS = (SMOOTHING_CONSISTENCY, SMOOTHMIX, CONSISTENCY_BASELINES)


class PublishedRecipe(StrEnum):
    """A training recipe; the values of CONSISTENCY_BASELINES' recipes also name their folders of extracts."""

    GAUSSIAN = "gaussian"  # Cohen et al. 2019
    CONSISTENCY = "consistency"  # Jeong & Shin 2020, the loss and λ of their repository's head
    SMOOTHMIX = "smoothmix"  # Jeong et al. 2021
    SMOOTHADV = "smoothadv"  # Salman et al. 2019
    STABILITY = "stability"  # Li et al. 2019
    MACER = "macer"  # Zhai et al. 2020
    CONSISTENCY_L20 = "consistency-lbd20"  # Jeong & Shin 2020 as first released: another loss, one λ for every σ
    SMOOTHADV_CONSISTENCY = "smoothadv-consistency"  # the same loss on SmoothAdv's adversarial examples


@dataclass(frozen=True)
class PublishedRun:
    """One training recipe at one σ, certified once per released training run (seed)."""

    recipe: PublishedRecipe
    sigma: float
    name: str
    command: str  # the authors' training command (code/<script> in their repository)
    upstream: Upstream
    upstream_dir: str  # the logs' folder upstream: data/certify/mnist/<upstream_dir>
    logs: tuple[str, ...]  # relative to PUBLISHED / upstream.folder

    @property
    def source(self) -> str:
        return f"{self.upstream}: data/certify/mnist/{self.upstream_dir}/"


LENET = "mnist lenet --lr 0.01 --lr_step_size 30 --epochs 90"
GAUSSIAN_SEEDS = {
    0.25: (3870, 4067, 6298, 919, 9555),
    0.5: (1801, 393, 4490, 4608, 880),
    1.0: (2110, 5510, 5991, 8335, 9609),
}
# The λ that the authors' EXPERIMENTS.MD trains each σ with, and the runs released for it (seed 0 only at σ = 1.0)
CONSISTENCY_LAMBDA = {0.25: 10, 0.5: 5, 1.0: 5}
CONSISTENCY_SEEDS = {0.25: (1, 2, 3, 4, 5), 0.5: (1, 2, 3, 4, 5), 1.0: (0, 1, 2, 3, 4, 5)}
# SmoothMix: (adversary steps, η) per σ as in smoothmix's EXPERIMENTS.MD; each with and without the one-step
# adversary (mix_step 1 / 0). These are the configurations released with several runs (ids 0 and 21-25); the others
# (η = 2, and the other step count at σ = 0.25) have one run each and are not reported.
SMOOTHMIX_SETTINGS = {0.25: ((3, 1.0), (2, 5.0)), 0.5: ((4, 1.0), (4, 5.0)), 1.0: ((8, 1.0), (8, 5.0))}
SMOOTHMIX_SEEDS = (0, 21, 22, 23, 24, 25)
# CONSISTENCY_BASELINES: every run released for each recipe and σ (five each; upstream's names for the training runs)
BASELINE_SEEDS = {
    PublishedRecipe.SMOOTHADV: {
        0.25: (3762, 4448, 4935, 7656, 9914),
        0.5: (3916, 4372, 5218, 5947, 647),
        1.0: (1099, 1316, 2083, 5533, 8071),
    },
    PublishedRecipe.STABILITY: {
        0.25: (4654, 5123, 7691, 8971, 9926),
        0.5: (1297, 1590, 4945, 5843, 6664),
        1.0: (1944, 6029, 6211, 6878, 7840),
    },
    PublishedRecipe.MACER: {
        0.25: (12, 1576, 3256, 6753, 8651),
        0.5: (1221, 149, 2869, 4292, 4711),
        1.0: (1549, 4153, 505, 508, 7191),
    },
    PublishedRecipe.CONSISTENCY_L20: {
        0.25: (3104, 3981, 746, 8248, 9179),
        0.5: (1172, 1700, 5063, 7370, 8137),
        1.0: (3082, 4562, 5281, 7622, 9939),
    },
    PublishedRecipe.SMOOTHADV_CONSISTENCY: {
        0.25: (2210, 3424, 8158, 8709, 9741),
        0.5: (1716, 2546, 2804, 4951, 6072),
        1.0: (1405, 4214, 5952, 6414, 7305),
    },
}
# SmoothAdv's adversary as bc2b1a7's EXPERIMENTS.MD trains both SmoothAdv recipes: 10 PGD steps within an L2 ball of
# 255/256 (the scripts divide --epsilon by 256), grown linearly over the first 10 epochs
SMOOTHADV_ATTACK = "--epsilon 255 --num-steps 10 --warmup 10"
MACER_LAMBDA = {0.25: 16, 0.5: 16, 1.0: 6}  # bc2b1a7's EXPERIMENTS.MD lowers λ at σ = 1.0


def _log(sigma: float, seed: int) -> str:
    return f"noise_{sigma:.2f}_{seed}.tsv.gz"


def _gaussian(sigma: float) -> PublishedRun:
    return PublishedRun(
        PublishedRecipe.GAUSSIAN,
        sigma,
        "Gaussian augmentation (Cohen et al. 2019)",
        f"train_cohen.py {LENET} --noise {sigma:.2f}",
        SMOOTHING_CONSISTENCY,
        "cohen",
        tuple(f"gaussian/{_log(sigma, s)}" for s in GAUSSIAN_SEEDS[sigma]),
    )


def _consistency(sigma: float) -> PublishedRun:
    lbd = CONSISTENCY_LAMBDA[sigma]
    return PublishedRun(
        PublishedRecipe.CONSISTENCY,
        sigma,
        f"Gaussian + consistency (Jeong & Shin 2020, m = 2, λ = {lbd}, η = 0.5)",
        f"train_consistency.py {LENET} --noise {sigma:.2f} --num-noise-vec 2 --lbd {lbd}",
        SMOOTHING_CONSISTENCY,
        f"consistency/cohen/num_2/lbd_{lbd:.1f}/eta_0.5",
        tuple(f"consistency/{_log(sigma, s)}" for s in CONSISTENCY_SEEDS[sigma]),
    )


def _smoothmix(sigma: float, steps: int, eta: float, one_step_adversary: bool) -> PublishedRun:
    mix_step = int(one_step_adversary)
    folder = f"smix_1.0_{steps}_m{mix_step}/tau_{eta:.1f}"
    variant = "SmoothMix + one-step adversary" if one_step_adversary else "SmoothMix"
    return PublishedRun(
        PublishedRecipe.SMOOTHMIX,
        sigma,
        f"{variant} (Jeong et al. 2021, m = 4, {steps} steps, η = {eta:g})",
        f"train.py {LENET} --noise {sigma} --num-noise-vec 4 --num-steps {steps} --alpha 1.0 --mix_step {mix_step} "
        f"--eta {eta}",
        SMOOTHMIX,
        f"smoothmix/{folder}/num_4/<seed>/noise_{sigma}",
        tuple(f"{folder}/{_log(sigma, s)}" for s in SMOOTHMIX_SEEDS),
    )


def _baseline(recipe: PublishedRecipe, sigma: float, name: str, command: str, upstream_dir: str) -> PublishedRun:
    return PublishedRun(
        recipe,
        sigma,
        name,
        command,
        CONSISTENCY_BASELINES,
        upstream_dir,
        tuple(f"{recipe}/{_log(sigma, s)}" for s in BASELINE_SEEDS[recipe][sigma]),
    )


def _baselines(sigma: float) -> tuple[PublishedRun, ...]:
    """The consistency paper's other MNIST recipes at one σ, in the order and with the commands of bc2b1a7's
    EXPERIMENTS.MD. Its consistency script was then code/train.py (train_consistency.py from December 2020), whose loss
    is λ·(KL + entropy of softmax(p̄)), not the λ·KL + η·H that CONSISTENCY's logs were trained with: hence a recipe of
    its own, named "as first released"."""
    lenet = f"{LENET} --noise {sigma:.2f}"
    macer_lbd = MACER_LAMBDA[sigma]
    return (
        _baseline(
            PublishedRecipe.SMOOTHADV,
            sigma,
            "SmoothAdv (Salman et al. 2019, m = 4, PGD 10 steps, ε = 255/256)",
            f"train_salman.py {lenet} --attack PGD {SMOOTHADV_ATTACK} --num-noise-vec 4",
            "salman/pgd_255.0_10_10/num_4",
        ),
        _baseline(
            PublishedRecipe.STABILITY,
            sigma,
            "Stability training (Li et al. 2019, λ = 2)",
            f"train_stab.py {lenet} --lbd 2",
            "stab/lbd_2",  # upstream spells σ 0.25, 0.5, 1.0 in these file names
        ),
        _baseline(
            PublishedRecipe.MACER,
            sigma,
            f"MACER (Zhai et al. 2020, m = 16, λ = {macer_lbd} after epoch 30, γ = 8, β = 16)",
            f"train_macer.py {lenet} --num-noise-vec 16 --beta 16.0 --margin 8.0 --lbd {macer_lbd:.1f} --deferred",
            f"macer_deferred30/num_16/lbd_{macer_lbd:.1f}/gamma_8.0/beta_16.0",
        ),
        _baseline(
            PublishedRecipe.CONSISTENCY_L20,
            sigma,
            "Gaussian + consistency as first released (Jeong & Shin 2020, m = 2, λ = 20)",
            f"train.py {lenet} --num-noise-vec 2 --lbd 20",
            "consistency/cohen/num_2/lbd_20.0",
        ),
        _baseline(
            PublishedRecipe.SMOOTHADV_CONSISTENCY,
            sigma,
            "SmoothAdv + consistency as first released (Jeong & Shin 2020, m = 4, λ = 5)",
            f"train.py {lenet} --num-noise-vec 4 --lbd 5 --adv-training {SMOOTHADV_ATTACK}",
            "consistency/salman_255.0_10_10/num_4/lbd_5.0",
        ),
    )


RUNS = tuple(
    run
    for sigma in SIGMAS
    for run in (
        _gaussian(sigma),
        _consistency(sigma),
        *(
            _smoothmix(sigma, steps, eta, adversary)
            for adversary in (False, True)
            for steps, eta in SMOOTHMIX_SETTINGS[sigma]
        ),
        *_baselines(sigma),
    )
)


class SeedResult(Record):
    """One released run: how many images it certifies correctly at each radius, and its ACR."""

    log: str
    first_n: dict[str, int]  # radius -> images correct and certified at ≥ radius, of the first n test images
    test_set: dict[str, int]  # radius -> of all 10,000
    acr_first_n: float  # average certified radius on the first n test images
    acr_test_set: float


class RunResult(Record):
    recipe: PublishedRecipe
    sigma: float
    name: str
    command: str
    upstream: str
    radii: list[float]
    n: int  # the first n test images
    test_images: int
    seeds: list[SeedResult]
    mean_first_n: dict[str, float]  # radius -> mean certified accuracy over seeds (first n)
    sd_first_n: dict[str, float]  # radius -> standard deviation over seeds (first n)
    mean_acr_first_n: float
    mean_acr_test_set: float


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


def _complete(images: list[ImageResult], n: int, log: str) -> list[ImageResult]:
    """The first n images of a log, each exactly once: a missing (or repeated) image would bias every rate."""
    first = [r.index for r in images if r.index < n]
    if first != list(range(n)):
        missing = sorted(set(range(n)) - set(first))
        raise ValueError(
            f"{log}: {len(first)} of the first {n} test images, expected each once"
            + (f" (missing {missing[:5]}{' ...' if len(missing) > 5 else ''})" if missing else " (repeated)")
        )
    return images[:n]


def evaluate_run(run: PublishedRun, n: int, source: Path = PUBLISHED) -> RunResult:
    radii = table_radii(run.sigma)
    seeds = []
    for log in run.logs:
        images = _complete(read_log(source / run.upstream.folder / log), TEST_IMAGES, log)
        first = images[:n]
        seeds.append(
            SeedResult(
                log=log,
                first_n={str(r): certified_accuracy(first, r).correct for r in radii},
                test_set={str(r): certified_accuracy(images, r).correct for r in radii},
                acr_first_n=average_certified_radius(first),
                acr_test_set=average_certified_radius(images),
            )
        )
    per_radius = {str(r): [s.first_n[str(r)] / n for s in seeds] for r in radii}
    return RunResult(
        recipe=run.recipe,
        sigma=run.sigma,
        name=run.name,
        command=run.command,
        upstream=run.source,
        radii=list(radii),
        n=n,
        test_images=TEST_IMAGES,
        seeds=seeds,
        mean_first_n={r: statistics.fmean(v) for r, v in per_radius.items()},
        sd_first_n={r: statistics.stdev(v) if len(v) > 1 else 0.0 for r, v in per_radius.items()},
        mean_acr_first_n=statistics.fmean(s.acr_first_n for s in seeds),
        mean_acr_test_set=statistics.fmean(s.acr_test_set for s in seeds),
    )


def max_radius(sigma: float, n: int = SAMPLES, alpha: float = ALPHA) -> float:
    """The largest radius CERTIFY can give with n samples: every sample correct, p_lower = α^(1/n)."""
    return sigma * statistics.NormalDist().inv_cdf(alpha ** (1 / n))


def _spread(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(results: list[RunResult], n: int) -> str:
    """Markdown, one table per σ: per recipe, the seeds' ACR and certified accuracy on the first n images and on all
    10,000 (mean over the released runs, range)."""
    blocks = []
    for sigma in sorted({r.sigma for r in results}):
        group = [r for r in results if r.sigma == sigma]
        radii = [str(r) for r in group[0].radii]
        lines = [
            f"**σ = {sigma}** (n = 100,000 certifies at most R = {max_radius(sigma):.2f})",
            "",
            "| published recipe (LeNet) | runs | images | ACR | " + " | ".join(f"r = {r}" for r in radii) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in radii) + " |",
        ]
        for res in group:
            for label, images, acr, part in (
                (f"first {n}", res.n, [s.acr_first_n for s in res.seeds], [s.first_n for s in res.seeds]),
                (
                    f"all {res.test_images:,}",
                    res.test_images,
                    [s.acr_test_set for s in res.seeds],
                    [s.test_set for s in res.seeds],
                ),
            ):
                cells = [_spread(acr, 3)] + [_spread([p[r] / images for p in part], 1, 100) for r in radii]
                lines.append(f"| {res.name} | {len(res.seeds)} | {label} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=500, help="the first n test images (as our certify runs)")
    parser.add_argument("--source", type=Path, default=PUBLISHED, help="folder of the log extracts' folders")
    parser.add_argument("--out", type=Path, default=PUBLISHED, help=f"writes {REPORT} and .md here")


def run(args: argparse.Namespace) -> int:
    results = [evaluate_run(r, args.n, args.source) for r in RUNS]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": f"python -m training published-certify --n {args.n}",
        "n": args.n,
        "sigmas": list(SIGMAS),
        "alpha": ALPHA,
        "samples": SAMPLES,
        "upstream": [str(u) for u in UPSTREAMS],
        "runs": [r.model_dump(mode="json") for r in results],
        "table_markdown": table(results, args.n),
    }
    (args.out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (args.out / REPORT.replace(".json", ".md")).write_text(report["table_markdown"] + "\n")
    print(report["table_markdown"])
    return 0
