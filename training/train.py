"""`python -m training train --preset NAME`: joint SOAP training (paper Eq. 2) or a baseline, top to bottom.

Per epoch: shuffle (seeded by seed and epoch), train with SGD, evaluate clean test accuracy, append a line to
`metrics.jsonl`, write the checkpoint (core format) and the resumable state `train_state.pt`. At the end: the
calibration block and MODEL_CARD.md. Every epoch re-seeds all randomness from (seed, epoch, rank), so
`--resume` after an interruption ends with exactly the weights of an uninterrupted run on CPU.

Several processes: `torchrun --nproc_per_node N -m training train ...` (DistributedDataParallel; NCCL on CUDA,
Gloo on CPU). The global batch stays `--batch-size`; each process takes its share of every batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models import SoapNetwork, create_model, get_spec, load_checkpoint, save_checkpoint
from models.checkpoint import meta_for
from models.tasks import TRAINING_NOISE_STD

from . import cli, distributed, model_card, provenance
from .baselines import adversarial_inputs, step_losses, trains_auxiliary
from .calibration import calibrate, clean_accuracy
from .cli import Recorded, option
from .data import DatasetError, ImageData, interleaved_order, load_splits, random_crop_flip
from .presets import PRESETS, RECIPES, TrainConfig, get_preset

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- command line


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How a run is carried out, beside what it trains (TrainConfig); each field is its flag (`training.cli`)."""

    preset: str = option(record=Recorded.ALWAYS, help=f"one of: {', '.join(sorted(PRESETS))}")
    data_root: str | None = option(
        None,
        help="dataset folder: torchvision layout, or an ImageFolder tree (train/ + test/, or one tree split 90/10)",
    )
    download: bool = option(False, help="let torchvision download MNIST/CIFAR into --data-root")
    device: str = option("auto", record=Recorded.NEVER, help="auto | cpu | cuda | cuda:N")
    out: str | None = option(None, help="output folder (default runs/<preset>)")
    resume: bool = option(False, record=Recorded.NEVER, help="continue from --out/train_state.pt")
    # recorded when given: the CPU thread count changes floating-point sums, so bit-exact reproduction needs the same
    threads: int | None = option(None, help="torch CPU threads per process")
    stop_after: int | None = option(
        None,
        record=Recorded.NEVER,
        metavar="N",
        help="stop after N epochs of this invocation (time-sliced jobs); continue with --resume",
    )
    max_steps_per_epoch: int | None = option(None, help="cap the steps of each epoch (smoke tests)")
    calibration_images: int = option(1000, help="images for the per-budget purification curve")
    no_calibration: bool = option(False, help="skip the calibration block at the end")


def _number(value: object) -> str:
    """A TrainConfig value as the recorded command writes it (floats in %g: 0.01, 5, 1e-05)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_number(v) for v in value)
    return cli.show(value)


# Every TrainConfig field but those the preset names is a flag that overrides the preset's value (unset: the
# preset's); a field added to TrainConfig gets its flag, its override and its place in the recorded command from here.
NAMED_BY_PRESET = ("preset", "network", "dataset")
CONFIG_HELP = {
    "recipe": "override the preset's recipe (soap or a baseline)",
    "epochs": "override the preset's epochs (the lr schedule scales with it)",
    "lr": "override the initial learning rate",
    "batch_size": "global batch size (split over processes)",
    "warmup_epochs": "raise lr linearly over these first epochs (default 0, as the paper)",
    "attack_eps_ramp_epochs": "adversarial-training baselines: grow ε linearly to its preset value over these epochs "
    "(default 0)",
    "consistency_lambda": "DR recipe: weight λ of consistency regularisation (Jeong & Shin 2020) over noisy copies; "
    "0 = off (default)",
    "consistency_eta": "weight η of the entropy of the copies' mean prediction (default 0.5)",
    "consistency_copies": "noisy copies of each image when consistency is on (default 2)",
    "noise_std": "DR recipe: σ of the Gaussian training noise, the σ to certify at (default 0.5)",
    "noise_clamp": "DR recipe: clamp the noisy training inputs to [0, 1] (default; --no-noise-clamp: x + δ as the "
    "smoothing papers train)",
    "smoothmix_eta": "DR recipe: weight η of SmoothMix (Jeong et al. 2021); 0 = off (default)",
    "smoothmix_copies": "SmoothMix: noise draws per image (default 4)",
    "smoothmix_steps": "SmoothMix: L2 steps of its adversary on the smoothed classifier (default 4)",
    "smoothmix_step_size": "SmoothMix: L2 size of each adversary step (default 1.0)",
    "smoothmix_mix_step": "SmoothMix: the step whose point starts the mix; 1 = the one-step adversary (default 0)",
    "smoothmix_warmup_epochs": "SmoothMix: epochs over which η and the mix start grow to full (default 10)",
    "init_from": "fine-tune: start from this checkpoint folder's weights (the same network) instead of random ones",
}
CONFIG_FLAGS = cli.flags(
    TrainConfig,
    {
        f.name: cli.Option(
            help=CONFIG_HELP.get(f.name, "override the preset's {field}"),
            choices=RECIPES if f.name == "recipe" else None,
            show=_number,
        )
        for f in fields(TrainConfig)
        if f.name not in NAMED_BY_PRESET
    },
)

# When a TrainConfig field is written into the recorded command. By default when it differs from the preset's value
# (an override); the options of a part of the recipe that is off (a field named after the part) never, bar its weight.
SPELLED_OUT = ("epochs", "lr", "batch_size", "seed")  # always, the preset's values included
PARTS = {"consistency_": "consistency_lambda", "smoothmix_": "smoothmix_eta"}  # field prefix -> its weight (off at 0)
# also at the preset's value while they are on (non-zero, or their part on): how such runs have always been recorded
SPELLED_OUT_WHILE_ON = (
    "warmup_epochs",
    "attack_eps_ramp_epochs",
    "consistency_lambda",
    "consistency_eta",
    "consistency_copies",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_arguments(parser, TrainOptions)
    group = parser.add_argument_group("overrides of the preset (TrainConfig; unset: the preset's value)")
    for flag in CONFIG_FLAGS:
        flag.add_to(group, None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.field: getattr(args, f.dest) for f in CONFIG_FLAGS if getattr(args, f.dest, None) is not None}
    config = replace(get_preset(args.preset), **overrides)
    if config.consistency and (config.recipe != "soap" or get_spec(config.network).aux_task != "reconstruction"):
        raise ValueError(
            f"--consistency-lambda applies to the DR recipe (soap on a reconstruction network), not {config.preset!r} "
            f"with recipe {config.recipe!r}"
        )
    if config.smoothmix and (config.recipe != "soap" or get_spec(config.network).aux_task != "reconstruction"):
        raise ValueError(
            f"--smoothmix-eta applies to the DR recipe (soap on a reconstruction network), not {config.preset!r} "
            f"with recipe {config.recipe!r}"
        )
    return config


def run(args: argparse.Namespace) -> int:
    options: TrainOptions = cli.from_args(TrainOptions, args)
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        config = config_from_args(args)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    process = distributed.start(options.device)
    try:
        train(config, options, process)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.stop(process)
    return 0


# ----------------------------------------------------------------------------- the loop


def lr_at(config: TrainConfig, epoch: int, progress: float = 1.0) -> float:
    """Step schedule: ÷10 at every milestone already passed; during warm-up a linear rise (progress = the
    fraction of the epoch done after this step)."""
    lr = config.lr * 0.1 ** sum(epoch >= m for m in config.milestones())
    if epoch < config.warmup_epochs:
        lr *= (epoch + progress) / config.warmup_epochs
    return lr


def seed_epoch(config: TrainConfig, epoch: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """Re-seed everything for one epoch: (order generator shared by all ranks, augmentation generator of this rank).

    The global RNG (training noise of the tasks, attacks' random starts) is seeded per (seed, epoch, rank) too.
    """
    torch.manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank)
    order = torch.Generator().manual_seed(config.seed * 7919 + epoch)
    augment = torch.Generator().manual_seed(config.seed * 104_729 + epoch * 31 + rank)
    return order, augment


class Objective(nn.Module):
    """The loss as a module, so DistributedDataParallel sees one forward per step."""

    def __init__(self, network: SoapNetwork, config: TrainConfig) -> None:
        super().__init__()
        self.network, self.config = network, config

    def forward(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, epoch: int):
        losses = step_losses(self.network, x, x_adv, y, self.config, epoch)
        regulariser = losses.consistency_loss if losses.consistency_loss is not None else losses.smoothmix_loss
        consistency = regulariser if regulariser is not None else x.new_zeros(())
        return (
            losses.total,
            losses.cls_loss.detach(),
            losses.aux_loss.detach(),
            losses.logits.detach(),
            consistency.detach(),
        )


def train_step(
    objective: nn.Module,
    network: SoapNetwork,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    augment: torch.Generator,
    epoch: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on a batch: augmentation, the recipe's attack (baselines), loss, update. Returns detached stats:
    loss, cls, aux, logits, and the smoothing regulariser (consistency or SmoothMix; 0 when neither is trained)."""
    if config.crop_flip:
        x = random_crop_flip(x, augment)
    x_adv = adversarial_inputs(network, x, y, config)
    loss, cls, aux, logits, consistency = objective(x, x_adv, y, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), cls, aux, logits, consistency


def make_optimizer(network: SoapNetwork, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        network.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train_one_epoch(
    objective: nn.Module,
    network: SoapNetwork,
    optimizer: torch.optim.Optimizer,
    data: ImageData,
    config: TrainConfig,
    epoch: int,
    process: distributed.Process,
    max_steps: int | None,
) -> dict[str, float]:
    order, augment = seed_epoch(config, epoch, process.rank)
    perm = torch.randperm(len(data), generator=order)
    steps = len(data) // config.batch_size  # drop the last partial batch: every step has the same global batch
    if steps == 0:
        raise DatasetError(
            f"{len(data)} training images are fewer than one batch of {config.batch_size}; lower --batch-size"
        )
    steps = min(steps, max_steps or steps)
    local_batch = config.batch_size // process.world_size
    network.train()
    totals = torch.zeros(6, dtype=torch.float64)  # loss, cls, aux, correct, seen, consistency
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not process.is_main,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
    for step in bar:
        if epoch < config.warmup_epochs:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, epoch, (step + 1) / steps)
        batch = perm[step * config.batch_size : (step + 1) * config.batch_size]
        x, y = data.batch(batch[process.rank * local_batch : (process.rank + 1) * local_batch], process.device)
        loss, cls, aux, logits, consistency = train_step(objective, network, optimizer, x, y, config, augment, epoch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower --lr")
        n = len(y)
        totals += torch.tensor(
            [
                loss.item() * n,
                cls.item() * n,
                aux.item() * n,
                (logits.argmax(1) == y).sum().item(),
                n,
                consistency.item() * n,
            ],
            dtype=torch.float64,
        )
        bar.set_postfix(
            loss=f"{totals[0] / totals[4]:.4f}",
            acc=f"{totals[3] / totals[4]:.3f}",
            aux=f"{totals[2] / totals[4]:.4f}",
            refresh=False,
        )
    bar.close()
    totals = distributed.all_reduce_sum(totals, process)
    seen = totals[4].item()
    stats = {
        "train_loss": totals[0].item() / seen,
        "train_cls_loss": totals[1].item() / seen,
        "train_aux_loss": totals[2].item() / seen,
        "train_acc": totals[3].item() / seen,
        "train_steps": steps,
    }
    if config.consistency:
        stats["train_consistency_loss"] = totals[5].item() / seen
    if config.smoothmix:
        stats["train_smoothmix_loss"] = totals[5].item() / seen
    return stats


def train(config: TrainConfig, options: TrainOptions, process: distributed.Process) -> Path:
    out = Path(options.out or Path("runs") / config.preset)
    if config.batch_size % process.world_size:
        raise SystemExit(f"--batch-size {config.batch_size} is not divisible by {process.world_size} processes")
    spec = get_spec(config.network)
    splits = load_splits(config.dataset, options.data_root, spec.input_shape, download=options.download)
    train_data = splits.train
    if train_data is None:
        raise SystemExit(f"{options.data_root} holds no training split for {config.dataset}")
    if process.device.type == "cuda":
        train_data = train_data.to(process.device)
        splits = replace(splits, train=train_data, test=splits.test.to(process.device))

    torch.manual_seed(config.seed)
    network = create_model(config.network, num_classes=len(train_data.class_names)).to(process.device)
    if config.init_from is not None:
        start = load_checkpoint(config.init_from, process.device)
        if start.meta.network != config.network:
            raise SystemExit(f"--init-from {config.init_from} holds a {start.meta.network}, not a {config.network}")
        network.load_state_dict(start.network.state_dict())
    optimizer = make_optimizer(network, config)
    start_epoch, elapsed = 0, 0.0
    state_file = out / STATE_FILE
    if options.resume and state_file.is_file():
        state = torch.load(state_file, map_location=process.device, weights_only=True)
        if state["config"] != asdict(config):
            raise SystemExit(f"{state_file} was written with a different configuration; resume with the same options")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, elapsed = state["epoch"], state["elapsed_seconds"]
        if process.is_main:
            print(f"resuming {out} after epoch {start_epoch}", file=sys.stderr)
    elif process.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).unlink(missing_ok=True)

    objective: nn.Module = Objective(network, config)
    if process.distributed:
        ids = [process.device.index] if process.device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=ids, find_unused_parameters=config.recipe != "soap"
        )

    record_base = _provenance(config, options, splits.source, process)
    test_acc = float("nan")
    last_epoch = min(config.epochs, start_epoch + options.stop_after) if options.stop_after else config.epochs
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, epoch)
        epoch_config = replace(config, attack_eps=config.attack_eps_at(epoch))  # the ε ramp, when one is set
        stats = train_one_epoch(
            objective, network, optimizer, train_data, epoch_config, epoch, process, options.max_steps_per_epoch
        )
        if config.recipe in ("fgsm-at", "pgd-at"):
            stats["attack_eps"] = epoch_config.attack_eps
        epoch_seconds = time.perf_counter() - t0
        elapsed += epoch_seconds
        if process.is_main:
            test_acc = clean_accuracy(network, splits.test, process.device)
            record = {
                "epoch": epoch + 1,
                "lr": lr_at(config, epoch),
                **stats,
                "test_acc": test_acc,
                "epoch_seconds": round(epoch_seconds, 2),
                "time_utc": provenance.now_utc(),
            }
            with (out / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), file=sys.stderr)
            training = record_base | {
                "epochs": epoch + 1,
                "duration_seconds": round(elapsed, 1),
                "finished_utc": provenance.now_utc(),
            }
            _save(network, config, splits, out, training, {"clean_accuracy": test_acc, "test_images": len(splits.test)})
            torch.save(
                {
                    "model": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "elapsed_seconds": elapsed,
                    "config": asdict(config),
                },
                state_file.with_suffix(".tmp"),
            )
            state_file.with_suffix(".tmp").replace(state_file)
        distributed.barrier(process)

    if last_epoch < config.epochs:
        if process.is_main:
            print(f"stopped after epoch {last_epoch} of {config.epochs}; continue with --resume", file=sys.stderr)
        return out
    if process.is_main:
        if math.isnan(test_acc):
            test_acc = clean_accuracy(network, splits.test, process.device)
        training = record_base | {
            "epochs": config.epochs,
            "duration_seconds": round(elapsed, 1),
            "finished_utc": provenance.now_utc(),
        }
        metrics, calibration = {"clean_accuracy": test_acc, "test_images": len(splits.test)}, None
        if not options.no_calibration:
            # Class-balanced order, so the curve's first N images are not all of one class (ImageFolder sorts by class).
            balanced = splits.test.subset(interleaved_order(splits.test.labels))
            report = calibrate(
                network, balanced, spec.purifier, process.device, curve_images=options.calibration_images
            )
            calibration = report.calibration
            metrics |= {"min_aux_accuracy": report.min_aux_accuracy, "min_aux_images": report.curve_images}
            training["calibration_curve_images"] = report.curve_images
        meta = _save(network, config, splits, out, training, metrics, calibration)
        model_card.write(out, meta)
        print(f"done: {out} clean test accuracy {100 * test_acc:.2f} %", file=sys.stderr)
    distributed.barrier(process)  # every rank leaves together: no rank tears the group down under another
    return out


# ----------------------------------------------------------------------------- records


def reproducing_options(config: TrainConfig, options: TrainOptions) -> list[str]:
    """Options that reproduce this run: the preset, its overrides (SPELLED_OUT and SPELLED_OUT_WHILE_ON with the
    preset's values too), and how it ran where that changes the result."""
    preset = get_preset(config.preset)
    first = ("recipe", *SPELLED_OUT)
    words = cli.recorded(options, only=("preset",))
    for flag in sorted(CONFIG_FLAGS, key=lambda f: first.index(f.field) if f.field in first else len(first)):
        if _records(flag.field, config, preset):
            words += flag.words(getattr(config, flag.field))
    return words + cli.recorded(options, skip=("preset",))


def _records(field: str, config: TrainConfig, preset: TrainConfig) -> bool:
    """Whether the recorded command carries this TrainConfig field (the rules above CONFIG_FLAGS' use)."""
    if field in SPELLED_OUT:
        return True
    part = next((prefix for prefix in PARTS if field.startswith(prefix)), None)
    on = getattr(config, PARTS[part]) > 0 if part else bool(getattr(config, field))
    if field in SPELLED_OUT_WHILE_ON and on:
        return True
    if part and not on and field != PARTS[part]:
        return False
    return getattr(config, field) != getattr(preset, field)


def _provenance(config: TrainConfig, options: TrainOptions, data_source: str, process: distributed.Process) -> dict:
    record = {
        "command": provenance.command("train", reproducing_options(config, options), process),
        "preset": config.preset,
        "recipe": config.recipe,
        "epochs_planned": config.epochs,
        "lr": config.lr,
        "lr_milestones": config.milestones(),
        "batch_size": config.batch_size,
        "alpha": config.alpha,
        "seed": config.seed,
        "data": data_source,
        "world_size": process.world_size,
        "hardware": provenance.hardware(process),
        "git_commit": provenance.git_commit(),
        "started_utc": provenance.now_utc(),
        "torch": torch.__version__,
        "config": asdict(config),
    }
    if config.consistency:  # how the weights were trained, in words for the model card (the numbers are in config)
        record["consistency"] = consistency_description(config)
    if config.smoothmix:
        record["smoothmix"] = smoothmix_description(config)
    return record


def consistency_description(config: TrainConfig) -> str:
    return (
        f"consistency regularisation (Jeong & Shin, NeurIPS 2020): {config.consistency_copies} noisy copies per "
        f"image, λ = {config.consistency_lambda:g} (KL to the copies' mean prediction), "
        f"η = {config.consistency_eta:g} (its entropy)"
    )


def smoothmix_description(config: TrainConfig) -> str:
    return (
        f"SmoothMix (Jeong et al., NeurIPS 2021): {config.smoothmix_copies} noise draws per image, an adversary of "
        f"{config.smoothmix_steps} L2 steps of {config.smoothmix_step_size:g} on the smoothed classifier, mix "
        f"from step {config.smoothmix_mix_step}, η = {config.smoothmix_eta:g} "
        f"(warm-up {config.smoothmix_warmup_epochs} epochs)"
    )


def training_noise_std(config: TrainConfig, aux_task: str) -> float | None:
    """σ of the noise the weights were trained on (None for baselines, which train on clean images)."""
    if not trains_auxiliary(config.recipe):
        return None
    return config.noise_std if config.noise_std is not None else TRAINING_NOISE_STD[aux_task]


def _save(network, config, splits, out, training, metrics, calibration=None):
    meta = meta_for(
        network,
        network=config.network,
        dataset=config.dataset,
        class_names=splits.train.class_names,
        aux_head_trained=trains_auxiliary(config.recipe),
        training=training,
        metrics=metrics,
        calibration=calibration,
        noise_std=training_noise_std(config, network.aux_task),
        noise_clamp=config.noise_clamp,
    )
    save_checkpoint(network, meta, out)
    return meta
