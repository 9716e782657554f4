"""`python -m training import-reference PATH --out DIR`: the authors' released checkpoint in our format.

The key mapping lives in `models.reference`; this command adds what a shipped model needs: metadata, clean accuracy
and (with --data-root) the calibration block, and a model card.

Accuracy is measured on the full test split, and on its first `--eval-images` images in a documented order: the
JPEG CIFAR-10 set is numbered per class (test/<class>/NNNN.jpg), which does not give the canonical test order, so
images are taken by (NNNN, class): the first 1000 are images 0000-0099 of every class.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from models import CheckpointError, Recipe, get_spec, resolve_device, save_checkpoint
from models.checkpoint import meta_for
from models.reference import convert_reference_state_dict, load_reference_state_dict

from . import model_card, provenance
from .calibration import calibrate, clean_accuracy
from .data import CIFAR10_CLASSES, DatasetError, interleaved_order, load_test_data

REFERENCE_NETWORKS = ("cifar10-resnet18-lc", "cifar10-resnet18-rp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the reference checkpoint (.pth, a bare state dict)")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--network", default="cifar10-resnet18-lc", choices=REFERENCE_NETWORKS)
    parser.add_argument(
        "--data-root", help="CIFAR-10 (torchvision layout or ImageFolder with test/): accuracy + calibration"
    )
    parser.add_argument("--eval-images", type=int, default=1000, help="also report accuracy on the first N test images")
    parser.add_argument(
        "--calibration-images", type=int, default=1000, help="images for the per-budget purification curve"
    )
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    try:
        out = import_reference(args)
    except (CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


def reproducing_options(args: argparse.Namespace) -> list[str]:
    options = [str(args.path), "--out", str(args.out), "--network", args.network]
    if args.data_root:
        options += [
            "--data-root",
            str(args.data_root),
            "--eval-images",
            str(args.eval_images),
            "--calibration-images",
            str(args.calibration_images),
        ]
    return options


def import_reference(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    network = convert_reference_state_dict(load_reference_state_dict(args.path), args.network).to(device)
    spec = get_spec(args.network)
    training: dict[str, object] = {
        "command": provenance.command("import-reference", reproducing_options(args)),
        "recipe": Recipe.IMPORTED,
        "origin": "authors' released checkpoint (GitHub Mishne-Lab/SOAP, commit 0953512)",
        "source": str(args.path),
        "git_commit": provenance.git_commit(),
        "finished_utc": provenance.now_utc(),
    }
    metrics: dict[str, float] = {}
    calibration = None
    if args.data_root:
        test, source = load_test_data("cifar10", args.data_root, spec.input_shape)
        ordered = test.subset(interleaved_order(test.labels))
        first = ordered.subset(slice(0, args.eval_images))
        metrics = {
            "clean_accuracy": clean_accuracy(network, test, device),
            "test_images": float(len(test)),
            f"clean_accuracy_first_{len(first)}": clean_accuracy(network, first, device),
        }
        training |= {"test_data": source, "eval_order": "(per-class index NNNN, class): first N = N/10 of every class"}
        report = calibrate(network, ordered, spec.purifier, device, curve_images=args.calibration_images)
        calibration = report.calibration
        metrics |= {"min_aux_accuracy": report.min_aux_accuracy, "min_aux_images": float(report.curve_images)}
        training["calibration_curve_images"] = report.curve_images
        print(
            f"clean accuracy: {100 * metrics['clean_accuracy']:.2f} % on {len(test)} test images; "
            f"{100 * metrics[f'clean_accuracy_first_{len(first)}']:.2f} % on the first {len(first)} ({source})",
            file=sys.stderr,
        )
    meta = meta_for(
        network,
        network=args.network,
        dataset="cifar10",
        class_names=CIFAR10_CLASSES,
        aux_head_trained=True,  # the released checkpoints were trained with SOAP's auxiliary task
        training=training,
        metrics=metrics,
        calibration=calibration,
    )
    save_checkpoint(network, meta, args.out)
    licence = Path(args.path).parent / model_card.WEIGHTS_LICENSE_FILE
    if licence.is_file():  # the authors' licence travels with their weights (and is quoted in the card)
        shutil.copyfile(licence, Path(args.out) / model_card.WEIGHTS_LICENSE_FILE)
    model_card.write(
        args.out,
        meta,
        notes=(
            "Weights of the authors' released CIFAR-10 label-consistency checkpoint, renamed by `models.reference`; "
            "normalisation buffers added. Accuracies measured on the JPEG re-encoded CIFAR-10 test set (quality ~75), "
            "so they come out slightly below numbers on the original PNG/pickle images."
        ),
    )
    return Path(args.out)
