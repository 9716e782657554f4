"""`python -m training soundness`: try to break certificates with SmoothAdv (a check that can fail).

Reads the per-image log of `evaluate --attacks certify` (certify-<base>.jsonl), takes the first n certified
images, and attacks the smoothed classifier with SmoothAdv at L2 budgets k·R for each multiplier k (R: the
image's certified radius). The smoothed prediction at the adversarial image is then estimated with PREDICT
(fresh noise, n samples, level α). Randomized smoothing guarantees that no perturbation with k ≤ 1 changes it
(up to the α failure probability of each certificate and of each PREDICT); the run fails if one does.
Success at k > 1 shows that the attack can change the prediction when the guarantee no longer applies.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models import load_checkpoint, resolve_device
from models.smoothing import SmoothingConfig, base_classifier, predict

from . import cli, provenance
from .attacks.smoothadv import smoothadv_pgd
from .certify import read_certify_log
from .cli import Recorded, option, recorded
from .data import load_test_data
from .records import PredictSettings, SmoothAdvSettings, SoundnessOutcome, SoundnessResult, SoundnessSmoothing


@dataclass(frozen=True, kw_only=True)
class SoundnessConfig:
    """The settings of `python -m training soundness`; each field is its flag (`training.cli`)."""

    certified: Path = option(record=Recorded.ALWAYS, help="certify-<base>.jsonl of evaluate --attacks certify")
    model: Path | None = option(
        None,
        record=Recorded.CHANGED,
        help="the checkpoint the log certified, where it is now (default: the path in the log's header)",
    )
    data_root: Path | None = option(None)
    n: int = option(100, record=Recorded.ALWAYS, help="certified images to attack (the first n)")
    multipliers: tuple[float, ...] = option((1.0, 1.5, 2.0, 3.0), record=Recorded.ALWAYS)
    steps: int = option(20, record=Recorded.ALWAYS)
    samples: int = option(32, record=Recorded.ALWAYS, help="noise samples per attack step")
    predict_n: int = option(10_000, record=Recorded.ALWAYS)
    alpha: float = option(0.001, record=Recorded.ALWAYS)
    batch_size: int = option(25, record=Recorded.ALWAYS)
    seed: int = option(0, record=Recorded.ALWAYS)
    device: str = option("auto", record=Recorded.NEVER)
    out: Path = option(record=Recorded.ALWAYS)
    threads: int | None = option(None)  # recorded when given: the thread count changes floating-point sums

    def command(self) -> str:
        return " ".join(["python -m training soundness", *recorded(self)])


def run_soundness(config: SoundnessConfig) -> SoundnessResult:
    header, rows = read_certify_log(config.certified)
    certified = [r for r in rows if r.radius is not None][: config.n]
    device = resolve_device(config.device)
    loaded = load_checkpoint(config.model or header.model, device)
    base = base_classifier(loaded.network, header.base)
    meta = loaded.meta
    data, source = load_test_data(meta.dataset, config.data_root, meta.input_shape)
    x, _ = data.batch(torch.tensor([r.index for r in certified]), device)
    c = torch.tensor([r.predicted for r in certified], device=device)
    radius = torch.tensor([r.radius for r in certified], device=device, dtype=x.dtype)
    sigma, clamp = header.smoothing.sigma, header.smoothing.clamp
    check = SmoothingConfig(
        sigma=sigma, n=config.predict_n, alpha=config.alpha, batch_size=header.smoothing.batch_size, clamp=clamp
    )
    generator = torch.Generator().manual_seed(config.seed)
    outcomes = []
    started = time.time()
    for k in config.multipliers:
        changed = abstained = 0
        l2s, ratios = [], []
        for lo in tqdm(range(0, len(certified), config.batch_size), desc=f"k={k}", unit="batch"):
            sl = slice(lo, lo + config.batch_size)
            adv = smoothadv_pgd(
                base,
                x[sl],
                c[sl],
                k * radius[sl],
                sigma,
                steps=config.steps,
                samples=config.samples,
                generator=generator,
                clamp=clamp,
            )
            dist = (adv - x[sl]).flatten(1).norm(dim=1)
            l2s += dist.tolist()
            ratios += (dist / radius[sl]).tolist()
            preds = predict(base, adv, check, len(meta.class_names), seed=config.seed + 1_000_000 + lo)
            for p, target in zip(preds, c[sl].tolist(), strict=True):
                changed += p.label is not None and p.label != target
                abstained += p.abstained
        outcomes.append(SoundnessOutcome.of(k, len(certified), changed, abstained, sum(l2s) / len(l2s), max(ratios)))
    inside = [o for o in outcomes if o.multiplier <= 1.0]
    result = SoundnessResult(
        certified_log=str(config.certified),
        model=str(config.model or header.model),
        base=header.base,
        data=source,
        smoothing=SoundnessSmoothing.model_validate(
            {k: getattr(header.smoothing, k) for k in ("sigma", "n0", "n", "alpha", "clamp")}
        ),
        attack=SmoothAdvSettings(steps=config.steps, samples=config.samples, step_size="2.5·ε/steps", seed=config.seed),
        predict=PredictSettings(n=config.predict_n, alpha=config.alpha),
        images=len(certified),
        outcomes=outcomes,
        passed=all(o.changed == 0 for o in inside),
        command=config.command(),
        git_commit=provenance.git_commit(),
        threads=torch.get_num_threads(),
        device=str(device),
        wall_seconds=time.time() - started,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"soundness-{header.base}.json").write_text(result.to_json())
    (config.out / f"soundness-{header.base}.md").write_text(markdown(result))
    return result


def markdown(result: SoundnessResult) -> str:
    s, a = result.smoothing, result.attack
    verdict = (
        "PASSED: no smoothed prediction changed within the certified radius (k ≤ 1)."
        if result.passed
        else "FAILED: a smoothed prediction changed within the certified radius."
    )
    lines = [
        f"# SmoothAdv against the certificates: {result.model} ({result.base})",
        "",
        f"{result.images} certified images (σ = {s.sigma}, n = {s.n}, α = {s.alpha}); SmoothAdv L2 PGD, "
        f"{a.steps} steps, {a.samples} noise samples per step, step {a.step_size}, seed {a.seed}; "
        f"smoothed prediction at the adversarial image by PREDICT (n = {result.predict.n}, "
        f"α = {result.predict.alpha}). {verdict}",
        "",
        f"Command: `{result.command}`",
        "",
        "| budget (× certified radius) | images | prediction changed | 95 % interval | abstained | mean L2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in result.outcomes:
        lo, hi = o.ci95
        lines.append(
            f"| {o.multiplier} | {o.attacked} | {o.changed} ({100 * o.success_rate:.1f} %) | "
            f"[{100 * lo:.1f}, {100 * hi:.1f}] | {o.abstained} | {o.mean_l2:.3f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_arguments(parser, SoundnessConfig)


def run(args: argparse.Namespace) -> int:
    config: SoundnessConfig = cli.from_args(SoundnessConfig, args)
    if config.threads:
        torch.set_num_threads(config.threads)
    result = run_soundness(config)
    print(markdown(result))
    return 0 if result.passed else 1
