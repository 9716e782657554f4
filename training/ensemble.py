"""`python -m training ensemble MEMBER... --out DIR`: trained checkpoints joined into one ensemble checkpoint.

The ensemble (models/ensemble.py) averages its members' logits, which lowers the variance of the base classifier
under randomized smoothing (Horváth et al., ICLR 2022). Nothing is trained: the members' weights are copied into a
`<network>-x<k>` checkpoint, which certifies, purifies and serves like any other. Members must share network,
dataset, classes and training σ (a smoothed classifier is certified at the σ its base was trained on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import CheckpointError, LoadedModel, Recipe, get_spec, load_checkpoint, resolve_device, save_checkpoint
from models.checkpoint import meta_for
from models.ensemble import ensemble

from . import model_card, provenance
from .calibration import calibrate, clean_accuracy
from .data import DatasetError, interleaved_order, load_test_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", nargs="+", help="the member checkpoints (folders), 2 or more")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--data-root", help="the test set: clean accuracy and the calibration block")
    parser.add_argument(
        "--calibration-images", type=int, default=1000, help="images for the per-budget purification curve"
    )
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    try:
        out = join(args)
    except (CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


def ensemble_network_name(members: list[LoadedModel]) -> str:
    """`<member network>-x<k>`, which must be registered (models/registry.py: ENSEMBLE_SIZES)."""
    networks = {m.meta.network for m in members}
    if len(networks) != 1:
        raise ValueError(f"members must share one network; got {sorted(networks)}")
    name = f"{networks.pop()}-x{len(members)}"
    get_spec(name)  # KeyError names the registered networks
    return name


def _check_compatible(members: list[LoadedModel]) -> None:
    first = members[0].meta
    for m in members[1:]:
        if (m.meta.dataset, m.meta.class_names) != (first.dataset, first.class_names):
            raise ValueError(f"{m.path} has another dataset or other classes than {members[0].path}")
        if m.meta.training_noise_std != first.training_noise_std:
            raise ValueError(
                f"{m.path} was trained at σ = {m.meta.training_noise_std}, {members[0].path} at "
                f"σ = {first.training_noise_std}: an ensemble is certified at one σ"
            )
        if m.meta.noise_clamp != first.noise_clamp:
            raise ValueError(
                f"{m.path} and {members[0].path} differ in whether their training noise was clamped to [0, 1]: "
                "an ensemble is certified with one kind of noise"
            )


def join(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    members = [load_checkpoint(path, device) for path in args.members]
    try:
        name = ensemble_network_name(members)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    _check_compatible(members)
    network = ensemble([m.network for m in members]).eval()
    first = members[0].meta
    options = [*map(str, args.members), "--out", str(args.out)]
    if args.data_root:
        options += ["--data-root", str(args.data_root), "--calibration-images", str(args.calibration_images)]
    training: dict[str, object] = {
        "recipe": Recipe.SOAP,  # every member was trained jointly with its auxiliary task (checked below)
        "command": provenance.command("ensemble", options),
        "git_commit": provenance.git_commit(),
        "finished_utc": provenance.now_utc(),
        "aggregation": "mean of the members' logits (Horváth et al., ICLR 2022)",
        "members": [
            {"path": str(m.path), "weights_sha256": m.meta.weights_sha256, "command": m.meta.training.command}
            for m in members
        ],
    }
    metrics: dict[str, float] = {}
    calibration = None
    if args.data_root:
        test, source = load_test_data(first.dataset, args.data_root, first.input_shape)
        metrics = {"clean_accuracy": clean_accuracy(network, test, device), "test_images": float(len(test))}
        balanced = test.subset(interleaved_order(test.labels))
        report = calibrate(network, balanced, get_spec(name).purifier, device, curve_images=args.calibration_images)
        calibration = report.calibration
        metrics |= {"min_aux_accuracy": report.min_aux_accuracy, "min_aux_images": float(report.curve_images)}
        training |= {"test_data": source, "calibration_curve_images": report.curve_images}
        print(f"clean accuracy: {100 * metrics['clean_accuracy']:.2f} % on {len(test)} test images", file=sys.stderr)
    meta = meta_for(
        network,
        network=name,
        dataset=first.dataset,
        class_names=first.class_names,
        aux_head_trained=all(m.meta.aux_head_trained for m in members),
        training=training,
        metrics=metrics,
        calibration=calibration,
        noise_std=first.training_noise_std,
        noise_clamp=first.noise_clamp,
    )
    save_checkpoint(network, meta, args.out)
    model_card.write(
        args.out,
        meta,
        notes=(
            f"An ensemble of {len(members)} `{first.network}` checkpoints (listed in model.json, `training.members`), "
            "joined without further training: its logits are the mean of the members' logits."
        ),
    )
    return Path(args.out)
