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

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import Recipe, create_model, load_checkpoint, oracle_select, purify
from models.attacks.seeding import ImageGenerators, derive_seed
from models.checkpoint import LoadedModel

from . import distributed, provenance
from .attacks import paper_settings
from .attacks.registry import ATTACKS, DEFAULT_ATTACKS, AttackContext, AttackSpec, get_attack
from .attacks.settings import AttackSettings
from .data import ImageData, load_test_data
from .distributed import Process
from .partial import BatchRecord, PartialResults, fingerprint
from .records import (
    AttackColumn,
    Detector,
    DetectorRates,
    EvaluationResult,
    PurifierRecord,
    SettingsRecord,
    WorstCase,
    WorstCaseGroup,
    pack_images,
)
from .report import write_all
from .rows import ROWS, Row
from .stats import Accuracy, worst_case

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
    resume: bool = True  # reuse the per-batch partial results under out/.partial (same configuration only)


@dataclass
class Batchwise:
    """Per-example outcome of one column of the table."""

    correct: dict[Row, torch.Tensor]
    flagged: torch.Tensor | None = None
    seconds: float = 0.0
    max_linf: float = 0.0
    max_l2: float = 0.0
    out_of_range: int = 0

    @classmethod
    def of(cls, records: list[BatchRecord]) -> Batchwise:
        records = sorted(records, key=lambda r: r.start)
        flagged = [r.flagged for r in records if r.flagged is not None]
        return cls(
            _cat([r.correct for r in records]),
            torch.cat(flagged) if flagged and len(flagged) == len(records) else None,
            sum(r.seconds for r in records),
            max(r.max_linf for r in records),
            max(r.max_l2 for r in records),
            sum(r.out_of_range for r in records),
        )


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

    def __init__(self, loaded: LoadedModel, rows: tuple[Row, ...], threshold: float | None = None):
        self.model = loaded.network
        self.purifier = loaded.purifier
        self.rows = rows
        self.threshold = threshold  # the service's `suspicious` flag: aux loss before purification above it
        self.purify_seconds = 0.0
        self.purified_images = 0

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[Row, torch.Tensor], torch.Tensor | None]:
        """Per row, whether each image is classified correctly; and whether the detector flags it (or None)."""
        out: dict[Row, torch.Tensor] = {"none": (self._predict(x) == y).cpu()}
        flagged = None
        if "min-aux" in self.rows:
            start = time.perf_counter()
            result = purify(self.model, x, self.purifier, return_candidates="oracle" in self.rows)
            self.purify_seconds += time.perf_counter() - start
            self.purified_images += x.shape[0]
            out["min-aux"] = (self._predict(result.images) == y).cpu()
            if "oracle" in self.rows:
                images, _ = oracle_select(self.model, result, y)
                out["oracle"] = (self._predict(images) == y).cpu()
            if self.threshold is not None:
                flagged = (result.aux_before > self.threshold).cpu()
        return out, flagged

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> dict[Row, torch.Tensor]:
        return self.score(x, y)[0]


def _cat(parts: list[dict[Row, torch.Tensor]]) -> dict[Row, torch.Tensor]:
    return {row: torch.cat([p[row] for p in parts]) for row in parts[0]}


def attack_batch(
    spec: AttackSpec, ctx: AttackContext, scorer: Scorer, x: torch.Tensor, y: torch.Tensor, start: int, keep: bool
) -> BatchRecord:
    """Attack images [start, start + len(x)) with per-image seeds; score every row; time it; check the budget."""
    indices = range(start, start + x.shape[0])
    ctx.rng = ImageGenerators(ctx.seed, spec.name, indices)
    ctx.batch_seed = derive_seed(ctx.seed, spec.name, start) % (1 << 31)
    torch.manual_seed(ctx.batch_seed)  # libraries that draw from the global generator
    began = time.perf_counter()
    adv = spec.run(ctx, x, y).detach()
    if adv.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    delta = (adv - x).flatten(1)
    correct, flagged = scorer.score(adv, y)
    return BatchRecord(
        start=start,
        stop=start + x.shape[0],
        correct=correct,
        flagged=flagged,
        seconds=seconds,
        max_linf=float(delta.abs().max()),
        max_l2=float(delta.norm(dim=1).max()),
        out_of_range=int(((adv < 0) | (adv > 1)).flatten(1).any(1).sum()),
        kept=adv[:16].cpu() if keep else None,
    )


def run_attack(
    spec: AttackSpec,
    ctx: AttackContext,
    scorer: Scorer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    process: Process,
    store: PartialResults | None = None,
) -> list[BatchRecord]:
    """This process's share of the batches (batch i goes to rank i mod world size), each resumed from `store`
    when it holds it (`BatchRecord.resumed`). Returns the records of every batch on rank 0 (empty elsewhere)."""
    starts = list(range(0, x.shape[0], batch_size))[process.rank :: process.world_size]
    records = []
    for start in tqdm(starts, desc=f"{spec.name:>13}", unit="batch", leave=False, disable=not process.is_main):
        stop = min(start + batch_size, x.shape[0])
        record = store.load(spec.name, start, stop) if store is not None else None
        if record is None:
            record = attack_batch(spec, ctx, scorer, x[start:stop], y[start:stop], start, keep=start == 0)
            if store is not None:
                store.save(spec.name, record)
        records.append(record)
    if process.distributed:
        gathered: list[list[BatchRecord]] = [[] for _ in range(process.world_size)]
        dist.gather_object(records, gathered if process.is_main else None, dst=0)
        if not process.is_main:
            return []
        records = [r for part in gathered for r in part]
    return records


# ----------------------------------------------------------------------------- the evaluation


def evaluate(config: EvalConfig) -> EvaluationResult | None:
    """Run the evaluation; under torchrun the attacks' batches are shared out over the ranks and rank 0 writes
    (and returns) the result, which equals a single process's. Other ranks return None."""
    process = distributed.start(config.device)
    try:
        return _evaluate(config, process)
    finally:
        distributed.stop(process)


def _evaluate(config: EvalConfig, process: Process) -> EvaluationResult | None:
    from . import figures, sanity  # here, not at the top: matplotlib loads only when evaluating

    torch.manual_seed(config.seed)
    device = process.device
    loaded = load_checkpoint(config.model, device)
    model, meta = loaded.network, loaded.meta
    soap = is_soap(loaded)
    rows: tuple[Row, ...] = ROWS if soap else ("none",)
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

    threshold = meta.calibration.suspicious_threshold if soap and meta.calibration is not None else None
    ctx = AttackContext(
        model=model,
        purifier=loaded.purifier,
        settings=settings,
        seed=config.seed,
        suspicious_threshold=threshold,
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
    scorer = Scorer(loaded, rows, threshold)
    started = time.time()
    store = None
    if config.resume:
        key = fingerprint(
            config.model / "model.safetensors",
            data=data_source,
            settings=asdict(settings),
            seed=config.seed,
            beta=config.beta,
            batch_size=config.batch_size,
            threshold=threshold,
            device=device.type,
        )
        store = PartialResults(config.out, key)

    columns: dict[str, Batchwise] = {}
    kept: dict[str, torch.Tensor] = {}
    resumed: dict[str, int] = {}
    resumed_seconds = 0.0
    for name in tqdm(attacks, desc="attacks", unit="attack", disable=not process.is_main):
        spec = get_attack(name)
        m = n if spec.kind != "adaptive" or not config.adaptive_n else min(n, config.adaptive_n)
        records = run_attack(spec, ctx, scorer, x[:m], y[:m], config.batch_size, process, store)
        if process.is_main:
            resumed[name] = sum(r.resumed for r in records)
            resumed_seconds += sum(r.seconds for r in records if r.resumed)
            columns[name] = Batchwise.of(records)
            kept.update((name, r.kept) for r in records if r.kept is not None)
    if not process.is_main:
        return None
    # A resumed run's wall time includes what its stored batches cost when they ran (spread over the ranks that ran
    # them), not only the seconds it took to read them back.
    resumed_attack_seconds = resumed_seconds / process.world_size

    parts = [
        scorer.score(xb, yb) for xb, yb in zip(x.split(config.batch_size), y.split(config.batch_size), strict=True)
    ]
    clean = _cat([c for c, _ in parts])
    flags = [f for _, f in parts if f is not None]
    clean_flagged = torch.cat(flags) if flags else None

    detector = None
    if clean_flagged is not None and meta.calibration is not None and threshold is not None:
        detector = Detector(
            threshold=threshold,
            quantile=meta.calibration.suspicious_quantile,
            calibration_images=meta.calibration.n,
            clean=detector_rates(clean_flagged, clean["min-aux"]),
        )
    beta_sweep = None
    if soap and "aux-pgd" in attacks:
        beta_sweep = sanity.beta_sweep(ctx, scorer, x[: config.beta_n], y[: config.beta_n], config.batch_size)
    result = EvaluationResult(
        model=str(config.model),
        network=meta.network,
        dataset=meta.dataset,
        recipe=Recipe.SOAP if soap else meta.training.recipe,
        provenance=meta.training.provenance,
        aux_task=meta.aux_task,
        purifier=PurifierRecord.of(loaded.purifier),
        data=data_source,
        jpeg_caveat="jpeg" in data_source.lower(),
        n=n,
        seed=config.seed,
        device=str(device),
        rows=list(rows),
        settings=SettingsRecord.model_validate(asdict(settings)),
        command=command_line(config),
        git_commit=provenance.git_commit(),
        host=f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f" × {process.world_size} processes" if process.distributed else ""),
        clean={row: Accuracy.of(c) for row, c in clean.items()},
        clean_images={row: pack_images(c) for row, c in clean.items()},
        purification_seconds_per_image=scorer.purify_seconds / max(scorer.purified_images, 1) if soap else None,
        attacks={
            name: attack_column(name, col, clean, settings, config.beta, resumed[name]) for name, col in columns.items()
        },
        detector=detector,
        worst_case=_worst_cases(columns, clean),
        beta_sweep=beta_sweep,
        budget_sweep=sanity.budget_sweep(ctx, scorer, x[: config.sanity_n], y[: config.sanity_n], soap),
        epsilon_zero=sanity.epsilon_zero(ctx, scorer, x[: config.sanity_n], y[: config.sanity_n]),
        sanity_checks=[],
        wall_seconds=0.0,
    )
    result.sanity_checks = sanity.run_checks(result)
    result.wall_seconds = time.time() - started + resumed_attack_seconds

    config.out.mkdir(parents=True, exist_ok=True)
    if config.figures:
        result.figures = figures.make_all(result, loaded, x[:16], y[:16], kept, config.out)
    from .model_info import write as write_model_info  # noqa: PLC0415  (model_info imports results_page)

    write_all(result, config.out)
    write_model_info(result, config.out)
    return result


def attack_column(
    name: str, col: Batchwise, clean: dict[Row, torch.Tensor], settings: AttackSettings, beta: float, resumed: int
) -> AttackColumn:
    """One attack's column: success rates against the same images clean (the first len(col) of them)."""
    spec = get_attack(name)
    n = len(col.correct["none"])
    return AttackColumn(
        kind=spec.kind,
        norm=spec.norm,
        budget=spec.budget(settings),
        description=spec.description(settings) + (f" (β = {beta})" if name == "aux-pgd" else ""),
        n=n,
        seconds_per_image=col.seconds / n,
        max_linf=col.max_linf,
        max_l2=col.max_l2,
        out_of_range_images=col.out_of_range,
        rows={row: Accuracy.of(c, clean[row][: len(c)]) for row, c in col.correct.items()},
        resumed_batches=resumed,
        detector=detector_rates(col.flagged, col.correct["min-aux"]) if col.flagged is not None else None,
        correct_images={row: pack_images(c) for row, c in col.correct.items()},
    )


def detector_rates(flagged: torch.Tensor, correct: torch.Tensor) -> DetectorRates:
    """How often the `suspicious` flag fires, and how often an image is misclassified (min-aux) and not flagged:
    what fools a user who acts on the flag. Rates as Accuracy records (Wilson intervals)."""
    return DetectorRates(flagged=Accuracy.of(flagged), fooled_unflagged=Accuracy.of(~correct & ~flagged))


def _worst_cases(columns: dict[str, Batchwise], clean: dict[Row, torch.Tensor]) -> dict[WorstCaseGroup, WorstCase]:
    """Per example, correct only if it survives every attack of the group (and is correct when clean)."""
    out: dict[WorstCaseGroup, WorstCase] = {}
    groups: dict[WorstCaseGroup, list[Batchwise]] = {
        "adaptive": [c for name, c in columns.items() if get_attack(name).kind == "adaptive"],
        "all": [c for name, c in columns.items() if get_attack(name).kind != "control"],
        "linf": [
            c for name, c in columns.items() if get_attack(name).kind != "control" and get_attack(name).norm == "linf"
        ],
    }
    for group, cols in groups.items():
        if not cols:
            continue
        rows = {row: worst_case([clean[row]], [c.correct[row] for c in cols]) for row in clean}
        out[group] = WorstCase(rows=rows, attacks=[n for n, c in columns.items() if any(c is x for x in cols)])
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
    "apgd_restarts": ("apgd_restarts", int),
    "square_queries": ("square_queries", int),
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
    parser.add_argument(
        "--n",
        "--images",
        dest="n",
        type=int,
        default=1000,
        help="number of test images (the first n; default 1000). Under torchrun write --images: torchrun's own "
        "parser rejects --n as an ambiguous abbreviation of its options",
    )
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
    parser.add_argument(
        "--no-resume", action="store_true", help="recompute every batch (default: reuse OUT/.partial of this config)"
    )
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
        resume=not args.no_resume,
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
    if result is None:  # a torchrun rank other than 0: rank 0 writes the result
        return 0
    failed = [c for c in result.sanity_checks if not c.passed]
    print(
        f"wrote {config.out}/results.md, results.json, results.csv; "
        f"{len(failed)} sanity check(s) failed" + (": " + ", ".join(c.name for c in failed) if failed else "")
    )
    print(json.dumps(result.model_dump(mode="json")["clean"]))
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
    for kind, base in result.bases.items():
        cells = ", ".join(f"r={r}: {100 * base.certified_accuracy[str(r)].accuracy:.1f}" for r in result.radii)
        print(f"{kind}: {cells}")
    return 0
