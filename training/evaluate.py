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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import Recipe, create_model, load_checkpoint, oracle_select, purify
from models.attacks.seeding import ImageGenerators, derive_seed
from models.checkpoint import LoadedModel

from . import cli, distributed, provenance, sanity
from .attacks import paper_settings
from .attacks.registry import AttackContext, AttackSpec, get_attack
from .attacks.settings import AttackSettings
from .certify import evaluate_certify
from .data import evaluation_order, load_test_data
from .distributed import Process
from .eval_config import EvalConfig
from .model_info import write as write_model_info
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
    if config.threads:
        torch.set_num_threads(config.threads)
    process = distributed.start(config.device)
    try:
        return _evaluate(config, process)
    finally:
        distributed.stop(process)


def _evaluate(config: EvalConfig, process: Process) -> EvaluationResult | None:
    from . import figures  # noqa: PLC0415  (here, not at the top: matplotlib loads only when evaluating)

    torch.manual_seed(config.seed)
    device = process.device
    loaded = load_checkpoint(config.model, device)
    model, meta = loaded.network, loaded.meta
    soap = is_soap(loaded)
    rows: tuple[Row, ...] = ROWS if soap else ("none",)
    settings: AttackSettings = paper_settings(meta.dataset).with_overrides(**config.settings.given())
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
        command=config.command(),
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


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    config: EvalConfig = cli.from_args(EvalConfig, args)
    try:
        for name in config.attacks:
            if name != "certify":
                get_attack(name)
        if "certify" in config.attacks and len(config.attacks) > 1:
            raise ValueError("--attacks certify runs on its own (it certifies; it does not attack)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "certify" in config.attacks:
        return _run_certify(config)
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


def _run_certify(config: EvalConfig) -> int:
    if config.threads:
        torch.set_num_threads(config.threads)
    result = evaluate_certify(config)
    if result is None:  # a torchrun rank other than 0: rank 0 writes the result
        return 0
    print(f"wrote {config.out}/certify.md, certify.json")
    for kind, base in result.bases.items():
        cells = ", ".join(f"r={r}: {100 * base.certified_accuracy[str(r)].accuracy:.1f}" for r in result.radii)
        print(f"{kind}: {cells}")
    return 0
