"""Build docs/results.md from evaluation folders, optionally running the evaluations first.

    python -m training.results_page --mnist-root DIR --cifar10-root DIR --run   # evaluate, then write the page
    python -m training.results_page                                              # rewrite the page from results.json

`make results MNIST_ROOT=... CIFAR10_ROOT=...` runs the first form. The PLAN below is the single place
where the sample sizes and attack iterations of the published numbers are chosen (CPU budget: 2 shared
cores); every number on the page also carries them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import Recipe

from .attacks.registry import ATTACKS
from .eval_config import AttackOverrides, EvalConfig
from .evaluate import evaluate
from .paper import PAPER, PAPER_COLUMNS, paper_key
from .published_certify import PUBLISHED, REPORT, max_radius
from .records import (
    CERTIFY_FILE,
    RESULTS_FILE,
    CertifyResult,
    EvaluationResult,
    SanityCheck,
    load_certification,
    load_evaluation,
    load_soundness,
)
from .report import cell, markdown_table
from .rows import ROW_TITLES, Row
from .sanity import run_checks
from .stats import Accuracy, worst_case


@dataclass(frozen=True)
class Run:
    """One evaluation of the published page."""

    model: str
    dataset: str
    n: int
    attacks: str
    adaptive_n: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # other EvalConfig fields (batch_size, settings, ...)
    out: str | None = None  # output folder name under docs/results (default: the model's name)

    def config(self, data_root: Path, seed: int, results: Path, threads: int) -> EvalConfig:
        """The evaluation of this entry with the data, seed and threads of this machine's run."""
        return EvalConfig(
            model=Path(self.model),
            data_root=data_root,
            n=self.n,
            attacks=tuple(self.attacks.split(",")),
            seed=seed,
            out=results / (self.out or Path(self.model).name),
            adaptive_n=self.adaptive_n,
            threads=threads,
            **self.options,
        )


BLIND = "noise,fgsm,pgd,cw,df,aux-pgd,blackbox,apgd-ce"
# The full-strength suite for the CNN (issue 16): APGD-CE/DLR, 100 iterations, 2 restarts, through trajectory BPDA
# and the full gradient, the detector-aware APGD, and the blind attacks for the detector table. Hours per 100 images
# on 2 shared CPU cores: results.json says how far a run got (n); AutoAttack and Square run separately (SUITE_LIBRARY).
SUITE = "noise,fgsm,pgd,cw,df,aux-pgd,apgd-ce,apgd-bpda,apgd-dlr-bpda,apgd-full,apgd-dlr-full,apgd-evade"
PINNED_BASELINE = "noise,fgsm,pgd,cw,df,apgd-ce,apgd-dlr"  # SUITE on a network without a purifier
PINNED_SUFFIX = "-pinned"  # evaluation folders of the full-strength suite, compared in one table
SUITE_OPTIONS = {
    "settings": AttackOverrides(apgd_steps=100, apgd_restarts=2),
    "batch_size": 10,
    "sanity_n": 10,
    "beta_n": 10,
}
ADAPTIVE = "bpda,bpda-traj,full-grad,apgd-bpda,apgd-dlr-bpda,apgd-full"
PLAN = (
    Run("models/zoo/mnist-fcn-dr", "mnist", 1000, f"{BLIND},{ADAPTIVE}"),
    Run(
        "models/zoo/mnist-cnn-dr",
        "mnist",
        1000,
        f"{BLIND},{ADAPTIVE}",
        adaptive_n=100,
        options={"settings": AttackOverrides(apgd_steps=30)},
    ),
    Run("models/zoo/mnist-cnn-dr", "mnist", 200, SUITE, options=SUITE_OPTIONS, out="mnist-cnn-dr-pinned"),
    # the detector table on the shipped default model (its blind and adaptive attacks, and the detector-aware APGD)
    Run(
        "models/zoo/mnist-fcn-dr",
        "mnist",
        200,
        "noise,fgsm,pgd,cw,df,aux-pgd,apgd-ce,bpda,bpda-traj,full-grad,apgd-bpda,apgd-dlr-bpda,apgd-full,apgd-evade",
        options={"batch_size": 50, "sanity_n": 20, "beta_n": 50},
        out="mnist-fcn-dr-detector",
    ),
    # the attack libraries (AutoAttack standard through trajectory BPDA; Square, gradient-free) on the default model
    Run(
        "models/zoo/mnist-fcn-dr",
        "mnist",
        1000,
        "autoattack,square",
        options={"batch_size": 50, "sanity_n": 20, "beta_n": 50},
        out="mnist-fcn-dr-library",
    ),
    # the PGD-AT CNN (preset mnist-cnn-pgd-at) beside the pinned SOAP CNN: the same images, blind attacks and APGD
    # settings; on the bare network, where the adaptive attacks through the purifier become APGD-CE and APGD-DLR
    Run(
        "models/zoo/mnist-cnn-dr-pgd-at",
        "mnist",
        200,
        PINNED_BASELINE,
        options=SUITE_OPTIONS,
        out="mnist-cnn-dr-pgd-at-pinned",
    ),
    # the same libraries on the bare PGD-AT CNN, on the pinned suite's 200 images (minutes: no purifier)
    Run(
        "models/zoo/mnist-cnn-dr-pgd-at",
        "mnist",
        200,
        "autoattack-bare,square-bare",
        options={"batch_size": 10, "sanity_n": 10},
        out="mnist-cnn-dr-pgd-at-library",
    ),
    Run(
        "models/zoo/mnist-cnn-dr",
        "mnist",
        100,
        "autoattack,square",
        options={"batch_size": 10, "sanity_n": 10},
        out="mnist-cnn-dr-library",
    ),
    Run(
        "models/zoo/cifar10-resnet18-lc-official",
        "cifar10",
        500,
        "noise,fgsm,pgd,cw,df,aux-pgd,bpda,apgd-bpda",
        adaptive_n=100,
        options={
            "settings": AttackOverrides(cw_steps=30, cw_binary_steps=4, apgd_steps=30, adaptive_steps=10),
            "sanity_n": 20,
            "beta_n": 50,
        },
    ),
    # our CPU-trained CIFAR models (a few epochs): a smaller run
    *(
        Run(
            f"models/zoo/{name}",
            "cifar10",
            200,
            "noise,fgsm,pgd,df,bpda",
            adaptive_n=50,
            options={"settings": AttackOverrides(adaptive_steps=10), "sanity_n": 20},
        )
        for name in ("cifar10-resnet18-lc", "cifar10-resnet18-rp")
    ),
)
BASELINE_SUFFIXES = ("vanilla", "fgsm-at", "pgd-at")


def run_plan(args: argparse.Namespace) -> None:
    """Evaluate every PLAN entry (and the trained baselines of each SOAP network) whose checkpoint and data are here."""
    roots = {"mnist": args.mnist_root, "cifar10": args.cifar10_root}
    plan = list(PLAN)
    for run in PLAN:  # the trained baselines of each SOAP network's own evaluation, when they exist
        if run.out is not None:  # an extra suite (its baselines, if any, are PLAN entries of their own)
            continue
        for suffix in BASELINE_SUFFIXES:
            path = Path(run.model.removesuffix("-official") + f"-{suffix}")
            if path.is_dir():
                plan.append(Run(str(path), run.dataset, run.n, "fgsm,pgd,cw,df", options=run.options))
    if args.only:
        plan = [run for run in plan if (run.out or Path(run.model).name) in args.only]
    for run in plan:
        if not Path(run.model).is_dir() or roots.get(run.dataset) is None:
            print(f"skipping {run.model}: checkpoint or --{run.dataset}-root missing", file=sys.stderr)
            continue
        config = run.config(roots[run.dataset], args.seed, args.results, args.threads)
        print(config.command(), file=sys.stderr)
        evaluate(config)


# ----------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Evaluation:
    """A stored evaluation and the folder it was read from: the folder's name tells a model's own evaluation from the
    extra suites run on it (e.g. `mnist-cnn-dr-pinned`), and its figures and certifications live there."""

    folder: Path
    result: EvaluationResult

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def is_main(self) -> bool:
        """The model's own evaluation (its folder is named after it); other folders hold extra suites."""
        return self.name == Path(self.result.model).name


def _load(results: Path) -> list[Evaluation]:
    found = [Evaluation(path.parent, load_evaluation(path)) for path in sorted(results.glob(f"*/{RESULTS_FILE}"))]
    return sorted(found, key=lambda e: (e.result.dataset != "mnist", e.result.dataset, Path(e.result.model).name))


def _with_paper(acc: Accuracy | None, paper: float | None) -> str:
    if acc is None:
        return "–"
    text = cell(acc)
    if paper is None:
        return text
    lo, hi = acc.ci95
    flag = "" if lo * 100 - 0.05 <= paper <= hi * 100 + 0.05 else " ≠"
    return f"{text} ({paper:.2f}{flag})"


def paper_table(evaluations: list[Evaluation]) -> str:
    head = ["model", "row", "n", "no attack"] + [c.upper() if c != "df" else "DeepFool" for c in PAPER_COLUMNS]
    rows: list[list[str]] = []
    for e in evaluations:
        r = e.result
        key = paper_key(r.network, r.recipe)
        for row in r.rows:
            paper = PAPER.get((key, r.recipe, row))
            label = r.recipe if r.recipe is not Recipe.SOAP else ROW_TITLES[row]
            cells = [
                f"`{Path(r.model).name}`",
                label,
                str(r.n),
                _with_paper(r.clean[row], paper[0] if paper else None),
            ]
            for i, col in enumerate(PAPER_COLUMNS, start=1):
                cells.append(_with_paper(r.accuracy(col, row), paper[i] if paper else None))
            rows.append(cells)
    return markdown_table(head, rows)


def adaptive_table(evaluations: list[Evaluation]) -> str:
    present = {name for e in evaluations for name, a in e.result.attacks.items() if a.kind == "adaptive"}
    names = [name for name in ATTACKS if name in present]
    head = [
        "model",
        "clean (min-aux)",
        "PGD → min-aux (blind)",
        *names,
        "worst case adaptive",
        "undefended network: PGD",
        "undefended: APGD-CE",
    ]
    rows: list[list[str]] = []
    for e in evaluations:
        r = e.result
        if "min-aux" not in r.rows:
            continue
        a = r.attacks
        adaptive = r.worst_case.get("adaptive")
        worst = adaptive.rows.get("min-aux") if adaptive is not None else None
        cells = [f"`{e.name}`", cell(r.clean["min-aux"]), cell(r.accuracy("pgd", "min-aux"))]
        cells += [
            cell(r.accuracy(n, "min-aux")) + (f" (n={a[n].n})" if n in a and a[n].n != r.n else "") for n in names
        ]
        cells += [
            cell(worst) + (f" (n={worst.n})" if worst and worst.n != r.n else ""),
            cell(r.accuracy("pgd", "none")),
            cell(r.accuracy("apgd-ce", "none")),
        ]
        rows.append(cells)
    return markdown_table(head, rows)


@dataclass(frozen=True)
class JointWorstCase:
    """A worst case per image over several evaluations of one checkpoint on the same images: e.g. the gradient suite
    on the first 200 test images and AutoAttack on the first 100 of them, over the images all of them attacked."""

    accuracy: Accuracy
    evaluations: list[str]  # the folders joined


def same_images(evaluations: list[Evaluation], of: Evaluation, row: Row) -> list[Evaluation]:
    """The evaluations of `of`'s checkpoint, data and purifier that stored per-image outcomes for `row`, when `of` is
    one of them and there is at least one other (one evaluation alone is its own worst case); else []."""
    r = of.result
    same = [
        e
        for e in evaluations
        if (e.result.model, e.result.data, e.result.purifier) == (r.model, r.data, r.purifier)
        and e.result.clean_images is not None
        and row in e.result.rows
    ]
    return same if len(same) >= 2 and any(e is of for e in same) else []


def joint_worst_case(evaluations: list[Evaluation], of: Evaluation, row: Row, linf_only: bool) -> JointWorstCase | None:
    """Per image, correct only if `row` got it right clean and under every attack (controls aside; L∞ ones only with
    `linf_only`) of every evaluation in `same_images`; None when there is nothing to join."""
    same = same_images(evaluations, of, row)
    if not same:
        return None
    clean = [_stored(e, None, row) for e in same]
    attacked = [
        _stored(e, name, row)
        for e in same
        for name, column in e.result.attacks.items()
        if column.kind != "control" and row in column.rows and (column.norm == "linf" or not linf_only)
    ]
    return JointWorstCase(worst_case(clean, attacked), sorted(e.name for e in same))


def _stored(e: Evaluation, attack: str | None, row: Row) -> torch.Tensor:
    mask = e.result.correct_images(attack, row)
    if mask is None:
        raise ValueError(f"{e.folder}: {attack or 'clean'} has no per-image outcomes for row {row} (rerun it)")
    return mask


def user_row(result: EvaluationResult) -> Row:
    """The row a user of the checkpoint meets: min-aux purification for SOAP, the bare network for a baseline."""
    return "min-aux" if "min-aux" in result.rows else "none"


def joined_evaluations(pinned: list[Evaluation], evaluations: list[Evaluation]) -> list[Evaluation]:
    """The pinned evaluations and every evaluation a joint worst case of theirs draws on, for the commands list."""
    names = {e.name for e in pinned}
    for e in pinned:
        names.update(joined.name for joined in same_images(evaluations, e, user_row(e.result)))
    return [e for e in evaluations if e.name in names]


def pinned_table(pinned: list[Evaluation], evaluations: list[Evaluation]) -> str:
    """The full-strength suites side by side: a SOAP network through its purifier (min-aux row) and adversarially
    trained networks of the same architecture (no purifier), each with its strongest attack, its per-image worst
    case over every attack it ran, and the per-image worst case over every evaluation of the same checkpoint on the
    same images (`evaluations`: e.g. its attack-library run)."""
    head = [
        "evaluation",
        "defence",
        "n",
        "clean",
        "strongest attack",
        "worst case per image, L∞ attacks (ε = 0.3)",
        "worst case per image, every attack",
        "L∞ worst case with the checkpoint's other evaluations",
        "every attack, with the other evaluations",
    ]
    rows: list[list[str]] = []
    for e in pinned:
        r = e.result
        row = user_row(r)
        scored = [(a.rows[row], name) for name, a in r.attacks.items() if a.kind != "control" and row in a.rows]
        if not scored or "all" not in r.worst_case:
            continue
        strongest, name = min(scored, key=lambda t: t[0].accuracy)
        defence = ROW_TITLES[row] if r.recipe is Recipe.SOAP else f"{r.recipe} (no purifier)"
        worst = r.worst_case["all"].rows[row]
        linf = r.worst_case.get("linf")
        cells = [
            f"`{e.name}`",
            defence,
            str(r.n),
            cell(r.clean[row]),
            f"{name}: {cell(strongest)}",
            cell(linf.rows[row]) if linf is not None else "–",
            cell(worst),
        ]
        for linf_only in (True, False):
            joint = joint_worst_case(evaluations, e, row, linf_only)
            cells.append(
                "–"
                if joint is None
                else f"{cell(joint.accuracy)} (n={joint.accuracy.n}: {', '.join(f'`{n}`' for n in joint.evaluations)})"
            )
        rows.append(cells)
    return markdown_table(head, rows)


def _misclassified(acc: Accuracy) -> Accuracy:
    """The complementary rate (misclassified instead of correct), for the cells that print it."""
    lo, hi = acc.ci95
    return acc.model_copy(update={"accuracy": 1 - acc.accuracy, "ci95": (1 - hi, 1 - lo)})


def detector_table(evaluations: list[Evaluation]) -> str:
    head = ["evaluation", "attack", "n", "flagged", "misclassified (min-aux)", "misclassified and not flagged"]
    rows: list[list[str]] = []
    for e in evaluations:
        r = e.result
        if r.detector is None:
            continue
        measured = [("none (clean)", r.detector.clean, _misclassified(r.clean["min-aux"]), r.n)]
        measured += [
            (name, a.detector, _misclassified(a.rows["min-aux"]), a.n)
            for name, a in r.attacks.items()
            if a.detector is not None
        ]
        for name, det, wrong, n in measured:
            cells = [f"`{e.name}`", name, str(n), cell(det.flagged), cell(wrong), cell(det.fooled_unflagged)]
            rows.append(cells)
    return markdown_table(head, rows)


def settings_lines(e: Evaluation) -> list[str]:
    r = e.result
    out = [
        f"- **`{e.name}`** (model `{Path(r.model).name}`) — data: {r.data}; n = {r.n}; seed {r.seed}; device "
        f"{r.device} ({r.host}); git {r.git_commit[:10]}; wall time {r.wall_seconds / 60:.1f} min"
    ]
    if r.command:
        out.append(f"  - command: `{r.command}`")
    for name, a in r.attacks.items():
        out.append(f"  - {name}: {a.description}; n = {a.n}; {a.seconds_per_image:.3f} s/image")
    if r.purification_seconds_per_image is not None:
        out.append(f"  - purification (min-aux): {1000 * r.purification_seconds_per_image:.1f} ms/image")
    return out


def refreshed_checks(result: EvaluationResult) -> list[SanityCheck]:
    """The stored checks, and after them the checks newer than the stored result (they only need its numbers)."""
    known = {c.name for c in result.sanity_checks}
    return result.sanity_checks + [c for c in run_checks(result) if c.name not in known]


def sanity_block(e: Evaluation) -> list[str]:
    checks = refreshed_checks(e.result)
    failed = [c for c in checks if not c.passed]
    if not failed:
        return [f"- `{e.name}`: all {len(checks)} sanity checks passed"]
    return [f"- `{e.name}`: **WARNING** {c.name} failed — {c.detail}" for c in failed]


def figures_block(e: Evaluation, page_dir: Path) -> list[str]:
    out = []
    for fig in e.result.figures or []:
        path = e.folder / Path(fig).name
        if path.exists():
            link = os.path.relpath(path.resolve(), page_dir.resolve())
            out.append(f"![{e.name}: {path.stem}]({Path(link).as_posix()})")
    return out


def published_certify_block() -> list[str]:
    """The published MNIST baselines at σ = 0.25, 0.5 and 1.0, recomputed from the authors' released CERTIFY logs."""
    path = PUBLISHED / REPORT
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    smoothing_consistency, smoothmix, baselines = report["upstream"]
    return [
        "**Published baselines, recomputed.** The smoothing papers released the per-image CERTIFY logs of their MNIST "
        "runs: Gaussian augmentation (Cohen et al. 2019) and consistency regularisation (Jeong & Shin, NeurIPS 2020) "
        f"in {smoothing_consistency}, SmoothMix (Jeong et al., NeurIPS 2021) in {smoothmix}, and the consistency "
        f"paper's other MNIST runs in {baselines}: SmoothAdv (Salman et al. 2019), stability training (Li et al. "
        "2019), MACER (Zhai et al. 2020) and consistency as first released (Gaussian + consistency at λ = 20, "
        "SmoothAdv + consistency at λ = 5, trained with that commit's loss λ·(KL + H′), H′ an entropy term its "
        "authors later called incorrectly implemented; later commits replace it with λ·KL + η·H and drop these two "
        "recipes' logs). All are LeNet trained 90 epochs at the σ they are certified at, noise not clamped to "
        "[0, 1], CERTIFY with n0 = 100, n = 100,000, α = 0.001 on all 10,000 test images. Recomputed from those logs "
        "(extracts and the choice of runs: docs/results/published/) on the same first "
        f"{report['n']} images as our runs and on the whole test set: ACR (average certified radius: the radius "
        "when correct, else 0) and certified accuracy in %, each the mean over the released training runs (range). "
        "Consistency (λ·KL + η·H, η = 0.5) uses the λ its authors train each σ with; SmoothMix the configurations "
        "released with six runs each, with and without its one-step adversary; the older commit's recipes the five "
        "runs released for each. n = 100,000 certifies radii up to σ·Φ⁻¹(α^(1/n)) "
        f"(≈ {max_radius(0.5):.2f} at σ = 0.5), n = 10,000 only up to ≈ {max_radius(0.5, 10_000):.2f}, so at "
        "r ≥ 1.25 part of a gap to a row certified with 10,000 samples is the sample count, not the network. "
        f"Command: `{report['command']}`.",
        "",
        report["table_markdown"],
    ]


CERTIFY_NOTES = "NOTES.md"  # in a certify folder: Markdown printed below the certified table's command lines


def _certify_runs(evaluations: list[Evaluation]) -> list[tuple[Path, CertifyResult]]:
    """(certify folder, certify.json) of every evaluation folder, then of the folders under the same root that hold
    certify runs but no results.json (a model certified only, e.g. a training variant compared with a shipped one)."""
    dirs = [e.folder for e in evaluations]
    roots = sorted({d.parent for d in dirs})
    extra = sorted(
        {p.parent.parent for root in roots for p in root.glob(f"*/certify*/{CERTIFY_FILE}")} - set(dirs),
        key=lambda d: d.name,
    )
    return [(p.parent, load_certification(p)) for d in dirs + extra for p in sorted(d.glob(f"certify*/{CERTIFY_FILE}"))]


def certified_section(evaluations: list[Evaluation], page_dir: Path) -> list[str]:
    """Randomized smoothing: certified L2 accuracy (evaluate --attacks certify) and the SmoothAdv soundness check.
    Rows are named by the evaluation folder (the network's name for the shipped models; variants differ)."""
    runs = _certify_runs(evaluations)
    if not runs:
        return []
    radii = sorted({r for _, run in runs for r in run.radii})  # a σ = 1.0 run has more columns than σ = 0.5
    out = [
        "## Certified L2 robustness (randomized smoothing)",
        "",
        "Cohen et al. (2019) CERTIFY on the first n MNIST test images: the smoothed classifier's prediction with a "
        "radius R such that no L2 perturbation of norm < R changes it, except with probability α per image. Cells: "
        "certified accuracy (correct, not abstained, R ≥ r) in %, Wilson 95 % interval (– where a run's table stops "
        "at a smaller radius); ACR: average certified radius (R when correct, else 0, over the images; – for runs "
        "stored before it was recorded). *noisy*: the network on the noisy input, which the noise column says: "
        "clamp(x + δ, 0, 1) or x + δ unclamped, as the smoothing papers (each DR model is trained on exactly the "
        "noise it is certified with); *denoised*: the classifier on the DR "
        "head's reconstruction of the noisy input (denoised smoothing, Salman et al. 2020). This is an **L2** "
        "guarantee on the [0, 1] pixel scale; it says nothing about the L∞ ε = 0.3 threat model of the tables above "
        "(an L∞ ball of 0.3 on 28×28 pixels reaches L2 norm 8.4).",
        "",
        "| model | base | σ | noise | n (images) | samples | ACR | "
        + " | ".join(f"r = {r}" for r in radii)
        + " | abstained |",
        "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in radii) + " | --- |",
    ]
    for folder, run in runs:
        sm = run.smoothing
        for kind, b in run.bases.items():
            cells = " | ".join(
                cell(b.certified_accuracy[str(r)]) if str(r) in b.certified_accuracy else "–" for r in radii
            )
            acr = "–" if b.average_certified_radius is None else f"{b.average_certified_radius:.3f}"
            noise = "clamp(x + δ)" if sm.clamp else "x + δ"
            out.append(
                f"| {folder.parent.name} | {kind} | {sm.sigma} | {noise} | {b.n} | {sm.n} (α = {sm.alpha}) | {acr} | "
                f"{cells} | {b.abstained} |"
            )
    out += ["", *published_certify_block(), ""]
    for folder, run in runs:
        sm = run.smoothing
        timing = "; ".join(f"{k} {b.seconds_per_image:.2f} s/image" for k, b in run.bases.items())
        out.append(
            f"- `{folder.parent.name}` ({', '.join(run.bases)}): n0 = {sm.n0}, clamp = {sm.clamp}, seed "
            f"{run.seed} (image i seeded seed + its test index), {run.device}, {run.threads} thread(s), "
            f"shared 2-core machine ({timing}), commit {run.git_commit[:10]}: `{run.command}`"
        )
    for folder, _ in runs:
        notes = folder / CERTIFY_NOTES
        if notes.is_file():
            out += ["", notes.read_text().strip()]
    sound = [load_soundness(p) for folder, _ in runs for p in sorted(folder.glob("soundness-*.json"))]
    if sound:
        out += [
            "",
            "**Soundness check (can fail).** SmoothAdv (Salman et al. 2019: L2 PGD on the soft smoothed classifier, "
            "Monte-Carlo noise each step) attacks each certified image with budget k·R (R its certified radius); the "
            "smoothed prediction at the adversarial image is then estimated by PREDICT. The check fails if any "
            "prediction changes with k ≤ 1. Success at k > 1 shows the attack has teeth.",
            "",
            "| model | base | images | k = budget / R | prediction changed | 95 % interval | abstained |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in sound:
            name = Path(s.model).name
            for o in s.outcomes:
                lo, hi = o.ci95
                out.append(
                    f"| {name} | {s.base} | {o.attacked} | {o.multiplier} | {o.changed} "
                    f"({100 * o.success_rate:.1f} %) | [{100 * lo:.1f}, {100 * hi:.1f}] | {o.abstained} |"
                )
        out.append("")
        for s in sound:
            a = s.attack
            verdict = "passed" if s.passed else "FAILED"
            out.append(
                f"- {Path(s.model).name} ({s.base}): {verdict}; {a.steps} steps, {a.samples} noise samples "
                f"per step, PREDICT n = {s.predict.n}, α = {s.predict.alpha}: `{s.command}`"
            )
    out.append("")
    for folder, _ in runs:
        figure = folder / "certified_accuracy.png"
        if figure.exists():
            link = Path(os.path.relpath(figure.resolve(), page_dir.resolve())).as_posix()
            out.append(f"![{folder.parent.name}: certified accuracy vs L2 radius]({link})")
    return out + [""]


def build_page(results: list[Evaluation], page: Path, notes: str = "") -> str:
    page_dir = page.parent
    mnist = [e for e in results if e.result.dataset == "mnist" and e.is_main]
    cifar = [e for e in results if e.result.dataset.startswith("cifar") and e.is_main]
    parts = [
        "# Results",
        "",
        "Generated by `python -m training.results_page` from the `results.json` files under `docs/results/` "
        "(regenerate everything with `make results MNIST_ROOT=... CIFAR10_ROOT=...`; see docs/evaluation.md). "
        "Accuracies in %, Wilson 95 % interval in brackets; the paper's number in parentheses, marked ≠ when it "
        "lies outside our interval. Purifier-blind attacks (the paper's FGSM/PGD/CW/DeepFool) attack the bare "
        "network; the adaptive table attacks purify-then-classify.",
        "",
    ]
    if notes:
        parts += [notes.strip(), ""]
    if mnist:
        parts += ["## Table 1: MNIST (paper Table 1)", "", paper_table(mnist), ""]
    if cifar:
        parts += [
            "## CIFAR-10 (paper Table 2)",
            "",
            "The CIFAR-10 test images here are JPEG re-encodings (quality ≈ 75) of the originals; accuracies on "
            "them are a little below those on the lossless test set.",
            "",
            paper_table(cifar),
            "",
        ]
    parts += [
        "## Adaptive attacks (min-aux row), next to the undefended network",
        "",
        adaptive_table(results),
        "",
    ]
    pinned = [e for e in results if e.name.endswith(PINNED_SUFFIX)]
    if pinned:
        parts += [
            "## Full-strength suite: SOAP against adversarial training",
            "",
            "The same first n MNIST test images, the same blind attacks and the same APGD settings (100 iterations, 2 "
            "random restarts, CE and DLR losses). SOAP is attacked through its purifier (trajectory BPDA and the full "
            "gradient, and the detector-aware APGD); the adversarially trained network has no purifier, so its "
            "APGD attacks are on the bare network. *Worst case*: an image counts as robust only if it survived every "
            "attack of its group: the L∞ attacks (ε = 0.3: FGSM, PGD, the APGD attacks and, for SOAP, the "
            "auxiliary-aware PGD), or every attack, the L2 ones (CW, DeepFool, ε = 4) included. The last two columns "
            "join, image by image, every evaluation of the same checkpoint on the same images that stored its "
            "per-image outcomes (here the attack libraries: AutoAttack standard and Square with 5,000 queries, "
            "through the purifier for SOAP and on the bare network for PGD-AT), over the first n images all of them "
            "attacked.",
            "",
            pinned_table(pinned, results),
            "",
            "Commands:",
            "",
            *[f"- `{e.name}`: `{e.result.command}`" for e in joined_evaluations(pinned, results)],
            "",
        ]
    detected = [e for e in results if e.result.detector is not None]
    if detected:
        parts += [
            "## The `suspicious` flag under attack",
            "",
            "The service flags an input whose auxiliary loss before purification exceeds the checkpoint's calibrated "
            "quantile of clean test images (`calibration.suspicious_quantile`, the 0.99 quantile over the 10,000 "
            "test images: a 1 % false-positive rate by construction, measured again on the clean row). For each "
            "attack: how often the flag fires on its adversarial images, how often min-aux misclassifies them, and "
            "how often both misclassified and not flagged (what fools a user who acts on the flag). `apgd-evade` "
            "maximises the classification loss through trajectory BPDA while penalising the auxiliary loss above "
            "0.9 × the threshold.",
            "",
            detector_table(detected),
            "",
            "Commands (n, seeds and timings per attack under *Settings of every number*):",
            "",
            *[f"- `{e.name}`: `{e.result.command}`" for e in detected],
            "",
        ]
    parts += certified_section(results, page_dir)
    parts += ["## Sanity checks", ""]
    for e in results:
        parts += sanity_block(e)
    parts += ["", "## Settings of every number", ""]
    for e in results:
        parts += settings_lines(e)
    parts += ["", "## Figures", ""]
    for e in results:
        parts += figures_block(e, page_dir)
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.results_page", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="folder of evaluation outputs")
    parser.add_argument("--page", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--notes", type=Path, default=None, help="Markdown inserted below the introduction")
    parser.add_argument("--run", action="store_true", help="run the evaluations of PLAN first")
    parser.add_argument("--mnist-root", type=Path, default=None)
    parser.add_argument("--cifar10-root", type=Path, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="with --run: evaluate only these model folder names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.run:
        run_plan(args)
    results = _load(args.results)
    if not results:
        print(f"no results.json under {args.results}", file=sys.stderr)
        return 1
    notes = args.notes.read_text() if args.notes and args.notes.exists() else ""
    args.page.write_text(build_page(results, args.page, notes))
    print(f"wrote {args.page} from {len(results)} evaluation(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
