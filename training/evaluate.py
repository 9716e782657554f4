"""`python -m training evaluate`: attack a checkpoint and write the paper-style table, JSON, CSV, figures.

Rows: the network without purification, with min-aux purification, and with the oracle budget (an
evaluation-only upper bound). Columns: no attack, then every attack. Purifier-blind attacks (the paper's)
are computed on the bare network and their adversarial images shown to every row; adaptive attacks target
purify-then-classify and are the honest robustness numbers. Baseline checkpoints (vanilla, FGSM-AT,
PGD-AT) have only the "none" row. Every run also executes the sanity checks of `training.sanity`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models import Recipe, create_model, load_checkpoint, oracle_select, purify, resolve_device
from models.checkpoint import LoadedModel

from . import provenance
from .attacks import paper_settings
from .attacks.registry import ATTACKS, DEFAULT_ATTACKS, AttackContext, AttackSpec, get_attack
from .attacks.settings import AttackSettings
from .data import ImageData, load_test_data
from .report import write_all
from .rows import ROWS
from .stats import Accuracy

BASELINE_RECIPES = (Recipe.VANILLA, Recipe.FGSM_AT, Recipe.PGD_AT)


@dataclass
class EvalConfig:
    model: Path
    data_root: Path | None = None
    n: int = 1000
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    seed: int = 0
    device: str = "auto"
    out: Path = Path("results")
    batch_size: int = 250
    beta: float = 0.5
    settings: dict = field(default_factory=dict)  # overrides of AttackSettings fields
    figures: bool = True
    sanity_n: int = 100
    beta_n: int = 500
    adaptive_n: int | None = None  # adaptive attacks on the first adaptive_n images only (CPU budget)


@dataclass
class Batchwise:
    """Per-example outcome of one column of the table."""

    correct: dict[str, torch.Tensor]
    seconds: float = 0.0
    max_linf: float = 0.0
    max_l2: float = 0.0
    out_of_range: int = 0


# ----------------------------------------------------------------------------- data and model


def evaluation_order(data: ImageData, source: str) -> tuple[torch.Tensor, str]:
    """The order in which test images are taken: canonical for torchvision sets (the first n, as Croce et al.),
    a fixed random permutation (seed 0) for ImageFolder trees, whose files are sorted by class."""
    if source.startswith("ImageFolder"):
        return torch.randperm(
            len(data), generator=torch.Generator().manual_seed(0)
        ), "images drawn by a fixed permutation (seed 0) of the folder"
    return torch.arange(len(data)), "the first n images in canonical order"


def is_soap(loaded: LoadedModel) -> bool:
    """Baselines (vanilla / FGSM-AT / PGD-AT) have no trained auxiliary head to purify with."""
    return loaded.meta.training.recipe not in BASELINE_RECIPES


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Classify images under each row of the table; times the purifier."""

    def __init__(self, loaded: LoadedModel, rows: tuple[str, ...]):
        self.model = loaded.network
        self.purifier = loaded.purifier
        self.rows = rows
        self.purify_seconds = 0.0
        self.purified_images = 0

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"none": (self._predict(x) == y).cpu()}
        if "min-aux" in self.rows:
            start = time.perf_counter()
            result = purify(self.model, x, self.purifier, return_candidates="oracle" in self.rows)
            self.purify_seconds += time.perf_counter() - start
            self.purified_images += x.shape[0]
            out["min-aux"] = (self._predict(result.images) == y).cpu()
            if "oracle" in self.rows:
                images, _ = oracle_select(self.model, result, y)
                out["oracle"] = (self._predict(images) == y).cpu()
        return out


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {row: torch.cat([p[row] for p in parts]) for row in parts[0]}


def run_attack(
    spec: AttackSpec,
    ctx: AttackContext,
    scorer: Scorer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    keep: dict | None = None,
) -> Batchwise:
    """Attack all images batch by batch; score every row; record time, budget and range violations."""
    parts, seconds, max_linf, max_l2, bad = [], 0.0, 0.0, 0.0, 0
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    for i, (xb, yb) in enumerate(tqdm(batches, desc=f"{spec.name:>13}", unit="batch", leave=False)):
        start = time.perf_counter()
        adv = spec.run(ctx, xb, yb).detach()
        if adv.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        delta = (adv - xb).flatten(1)
        max_linf = max(max_linf, float(delta.abs().max()))
        max_l2 = max(max_l2, float(delta.norm(dim=1).max()))
        bad += int(((adv < 0) | (adv > 1)).flatten(1).any(1).sum())
        parts.append(scorer.correct(adv, yb))
        if keep is not None and i == 0:
            keep[spec.name] = adv[:16].cpu()
    return Batchwise(_cat(parts), seconds, max_linf, max_l2, bad)


# ----------------------------------------------------------------------------- the evaluation


def evaluate(config: EvalConfig) -> dict:
    from . import figures, sanity  # here, not at the top: matplotlib loads only when evaluating

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    loaded = load_checkpoint(config.model, device)
    model, meta = loaded.network, loaded.meta
    soap = is_soap(loaded)
    rows = ROWS if soap else ("none",)
    settings: AttackSettings = paper_settings(meta.dataset).with_overrides(**config.settings)
    attacks = [a for a in config.attacks if soap or get_attack(a).kind != "adaptive"]
    for a in config.attacks:
        get_attack(a)

    data, data_source = load_test_data(meta.dataset, config.data_root, meta.input_shape)
    order, selection = evaluation_order(data, data_source)
    reserve = settings.blackbox_seed_images if "blackbox" in attacks else 0
    n = min(config.n, len(data) - reserve)
    if n <= 0:
        raise ValueError(f"the test set has {len(data)} images; the black-box attack reserves {reserve}")
    x, y = data.batch(order[:n], device)
    seed_images = data.batch(order[len(data) - reserve :], device)[0] if reserve else None
    data_source += f"; {selection}" + (f"; black-box seed: the last {reserve} images of that order" if reserve else "")

    generator = torch.Generator().manual_seed(config.seed)
    ctx = AttackContext(
        model=model,
        purifier=loaded.purifier,
        settings=settings,
        generator=generator,
        beta=config.beta,
        substitute_seed=seed_images,
        substitute_factory=lambda: create_model(
            meta.network,
            num_classes=len(meta.class_names),
            input_shape=meta.input_shape,
            mean=meta.normalization.mean,
            std=meta.normalization.std,
        ).to(device),
    )
    scorer = Scorer(loaded, rows)
    started = time.time()

    clean = _cat(
        [scorer.correct(xb, yb) for xb, yb in zip(x.split(config.batch_size), y.split(config.batch_size), strict=True)]
    )
    columns: dict[str, Batchwise] = {}
    kept: dict[str, torch.Tensor] = {}
    for name in tqdm(attacks, desc="attacks", unit="attack"):
        torch.manual_seed(config.seed)  # each column is reproducible on its own, whatever the attack list
        ctx.generator.manual_seed(config.seed)
        m = n if get_attack(name).kind != "adaptive" or not config.adaptive_n else min(n, config.adaptive_n)
        columns[name] = run_attack(get_attack(name), ctx, scorer, x[:m], y[:m], config.batch_size, keep=kept)

    attack_results: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {
        "model": str(config.model),
        "network": meta.network,
        "dataset": meta.dataset,
        "recipe": "soap" if soap else str(meta.training.recipe),
        "provenance": meta.training.provenance,
        "aux_task": meta.aux_task,
        "purifier": asdict(loaded.purifier) | {"budgets": loaded.purifier.budgets()},
        "data": data_source,
        "jpeg_caveat": "jpeg" in data_source.lower(),
        "n": n,
        "seed": config.seed,
        "device": str(device),
        "rows": list(rows),
        "settings": asdict(settings),
        "command": command_line(config),
        "git_commit": provenance.git_commit(),
        "host": (
            f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        ),
        "clean": {row: Accuracy.of(c).to_dict() for row, c in clean.items()},
        "purification_seconds_per_image": scorer.purify_seconds / max(scorer.purified_images, 1) if soap else None,
        "attacks": attack_results,
    }
    for name, col in columns.items():
        spec = get_attack(name)
        attack_results[name] = {
            "kind": spec.kind,
            "norm": spec.norm,
            "budget": spec.budget(settings),
            "description": spec.description(settings) + (f" (β = {config.beta})" if name == "aux-pgd" else ""),
            "n": len(col.correct["none"]),
            "seconds_per_image": col.seconds / len(col.correct["none"]),
            "max_linf": col.max_linf,
            "max_l2": col.max_l2,
            "out_of_range_images": col.out_of_range,
            "rows": {row: Accuracy.of(c, clean[row][: len(c)]).to_dict() for row, c in col.correct.items()},
        }
    result["worst_case"] = _worst_cases(columns, clean)

    extras = sanity.Extras()
    if soap and "aux-pgd" in attacks:
        extras.beta_sweep = sanity.beta_sweep(ctx, scorer, x[: config.beta_n], y[: config.beta_n], config.batch_size)
    extras.budget_sweep = sanity.budget_sweep(ctx, scorer, x[: config.sanity_n], y[: config.sanity_n], soap)
    extras.epsilon_zero = sanity.epsilon_zero(ctx, scorer, x[: config.sanity_n], y[: config.sanity_n])
    result["beta_sweep"] = extras.beta_sweep
    result["budget_sweep"] = extras.budget_sweep
    result["epsilon_zero"] = extras.epsilon_zero
    result["sanity_checks"] = [asdict(c) for c in sanity.run_checks(result, extras)]
    result["wall_seconds"] = time.time() - started

    config.out.mkdir(parents=True, exist_ok=True)
    if config.figures:
        result["figures"] = figures.make_all(result, loaded, x[:16], y[:16], kept, config.out)

    write_all(result, config.out)
    return result


def _worst_cases(columns: dict[str, Batchwise], clean: dict[str, torch.Tensor]) -> dict:
    """Per example, correct only if it survives every attack of the group (and is correct when clean)."""
    out: dict[str, dict[str, Any]] = {}
    groups = {
        "adaptive": [c for name, c in columns.items() if get_attack(name).kind == "adaptive"],
        "all": [c for name, c in columns.items() if get_attack(name).kind != "control"],
    }
    for group, cols in groups.items():
        if not cols:
            continue
        out[group] = {}
        m = min(len(c.correct["none"]) for c in cols)  # the images every attack of the group saw
        for row in clean:
            survived = clean[row][:m].clone()
            for c in cols:
                survived &= c.correct[row][:m]
            out[group][row] = Accuracy.of(survived, clean[row][:m]).to_dict()
        out[group]["attacks"] = [n for n, c in columns.items() if any(c is x for x in cols)]
    return out


def command_line(config: EvalConfig) -> str:
    """The command that reproduces this evaluation."""
    parts = ["python -m training evaluate", f"--model {config.model}"]
    if config.data_root is not None:
        parts.append(f"--data-root {config.data_root}")
    parts += [
        f"--n {config.n}",
        f"--attacks {','.join(config.attacks)}",
        f"--seed {config.seed}",
        f"--out {config.out}",
        f"--batch-size {config.batch_size}",
        f"--beta {config.beta}",
        f"--sanity-n {config.sanity_n}",
        f"--beta-n {config.beta_n}",
    ]
    if config.adaptive_n:
        parts.append(f"--adaptive-n {config.adaptive_n}")
    flags = {name: flag for flag, (name, _) in _OVERRIDES.items()}
    parts += [f"--{flags[k].replace('_', '-')} {v}" for k, v in config.settings.items() if v is not None]
    return " ".join(parts)


# ----------------------------------------------------------------------------- CLI

_OVERRIDES = {  # CLI flag -> AttackSettings field
    "eps": ("linf_eps", float),
    "l2_eps": ("l2_eps", float),
    "pgd_step": ("pgd_step", float),
    "pgd_steps": ("pgd_steps", int),
    "cw_steps": ("cw_steps", int),
    "cw_binary_steps": ("cw_binary_steps", int),
    "df_steps": ("df_steps", int),
    "adaptive_steps": ("adaptive_steps", int),
    "apgd_steps": ("apgd_steps", int),
    "eot_samples": ("eot_samples", int),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (model.safetensors + model.json)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="dataset root: torchvision layout (MNIST/raw/...) or an ImageFolder tree (ROOT/test/<class>/)",
    )
    parser.add_argument("--n", type=int, default=1000, help="number of test images (the first n; default 1000)")
    parser.add_argument(
        "--attacks", default=",".join(DEFAULT_ATTACKS), help=f"comma-separated subset of: {', '.join(ATTACKS)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--beta", type=float, default=0.5, help="β of the aux-aware PGD column (paper scale)")
    parser.add_argument("--sanity-n", type=int, default=100, help="images for the budget sweep and ε = 0 checks")
    parser.add_argument("--beta-n", type=int, default=500, help="images for the β sweep (Fig. 5)")
    parser.add_argument(
        "--adaptive-n",
        type=int,
        default=None,
        help="run adaptive attacks on the first N of the n images only (they cost ~T·K gradients per step)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    smooth = parser.add_argument_group("--attacks certify: randomized smoothing (Cohen et al. 2019)")
    smooth.add_argument("--sigma", type=float, default=None, help="noise σ (default: the checkpoint's training noise)")
    smooth.add_argument("--n0", type=int, default=100, help="noise samples to select the class")
    smooth.add_argument("--certify-n", type=int, default=10_000, help="noise samples to estimate p_A")
    smooth.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    smooth.add_argument("--noise-batch", type=int, default=1_000, help="noisy copies per forward pass (memory)")
    smooth.add_argument("--bases", default="noisy,denoised", help="base classifiers: noisy, denoised")
    smooth.add_argument("--no-clamp", action="store_true", help="do not clamp noisy inputs to [0, 1]")
    group = parser.add_argument_group("attack settings (defaults: the paper's for the checkpoint's dataset)")
    for flag, (name, kind) in _OVERRIDES.items():
        group.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=f"override {name}")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    return EvalConfig(
        model=args.model,
        data_root=args.data_root,
        n=args.n,
        attacks=attacks,
        seed=args.seed,
        device=args.device,
        out=args.out,
        batch_size=args.batch_size,
        beta=args.beta,
        figures=not args.no_figures,
        sanity_n=args.sanity_n,
        beta_n=args.beta_n,
        adaptive_n=args.adaptive_n,
        settings={name: getattr(args, flag) for flag, (name, _) in _OVERRIDES.items()},
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        for name in config.attacks:
            if name != "certify":
                get_attack(name)
        if "certify" in config.attacks and len(config.attacks) > 1:
            raise ValueError("--attacks certify runs on its own (it certifies; it does not attack)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "certify" in config.attacks:
        return _run_certify(config, args)
    result = evaluate(config)
    failed = [c for c in result["sanity_checks"] if not c["passed"]]
    print(
        f"wrote {config.out}/results.md, results.json, results.csv; "
        f"{len(failed)} sanity check(s) failed" + (": " + ", ".join(c["name"] for c in failed) if failed else "")
    )
    print(json.dumps(dict(result["clean"].items()), indent=None))
    return 0


def _run_certify(config: EvalConfig, args: argparse.Namespace) -> int:
    from .certify import CertifyOptions, evaluate_certify  # noqa: PLC0415

    options = CertifyOptions(
        sigma=args.sigma,
        n0=args.n0,
        n=args.certify_n,
        alpha=args.alpha,
        noise_batch=args.noise_batch,
        bases=tuple(b.strip() for b in args.bases.split(",") if b.strip()),
        clamp=not args.no_clamp,
    )
    result = evaluate_certify(config, options)
    print(f"wrote {config.out}/certify.md, certify.json")
    for kind, base in result["bases"].items():
        cells = ", ".join(f"r={r}: {100 * base['certified_accuracy'][str(r)]['accuracy']:.1f}" for r in result["radii"])
        print(f"{kind}: {cells}")
    return 0
