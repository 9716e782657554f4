"""`python -m training import-reference`: the authors' checkpoint becomes a loadable, calibrated model of ours."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from models import load_checkpoint
from models.reference import load_reference_state_dict
from training import import_reference
from training.calibration import aux_losses, clean_accuracy
from training.data import interleaved_order, load_image_folder

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "reference" / "official-checkpoint" / "cifar10-resnet-lc.pth"
pytestmark = pytest.mark.skipif(not OFFICIAL.is_file(), reason="official checkpoint not available")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOAP_CACHE_DIR", str(tmp_path / "cache"))


def import_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    import_reference.add_arguments(parser)
    return import_reference.run(parser.parse_args([str(a) for a in argv]))


def test_import_with_data_root_writes_a_calibrated_checkpoint(tmp_path):
    out = tmp_path / "official"
    rc = import_cli(
        OFFICIAL,
        "--out",
        out,
        "--data-root",
        ROOT / "tests" / "data" / "cifar10",
        "--eval-images",
        40,
        "--calibration-images",
        16,
        "--device",
        "cpu",
    )
    assert rc == 0
    loaded = load_checkpoint(out)
    reference = load_reference_state_dict(OFFICIAL)
    assert torch.equal(loaded.network.encoder.conv1.weight, reference["conv1.weight"])
    assert torch.equal(loaded.network.classifier.weight, reference["linear.weight"])
    meta = loaded.meta
    assert meta.network == "cifar10-resnet18-lc"
    assert meta.dataset == "cifar10"
    assert meta.class_names[3] == "cat"
    # The authors' model is a real CIFAR-10 classifier: ~85 % on the JPEG test set; 80 images here.
    assert meta.metrics["clean_accuracy"] >= 0.7
    assert meta.metrics["test_images"] == 80
    assert 0.6 <= meta.metrics["clean_accuracy_first_40"] <= 1.0
    assert meta.metrics["clean_accuracy"] == pytest.approx(
        clean_accuracy(loaded.network, load_image_folder(ROOT / "tests" / "data" / "cifar10", (3, 32, 32)))
    )
    cal = meta.calibration
    assert cal.n == 80
    assert len(cal.mean_aux_loss_per_budget) == 11
    assert min(cal.mean_aux_loss_per_budget) < cal.mean_aux_loss_per_budget[0]  # some budget lowers the LC loss
    data = load_image_folder(ROOT / "tests" / "data" / "cifar10", (3, 32, 32))
    first16 = data.subset(interleaved_order(data.labels)[:16])
    assert cal.mean_aux_loss_per_budget[0] == pytest.approx(aux_losses(loaded.network, first16).mean().item(), rel=1e-4)
    assert meta.training.command.startswith("python -m training import-reference")
    assert "released" in (out / "MODEL_CARD.md").read_text()
    assert json.loads((out / "model.json").read_text())["aux_head_trained"] is True  # SOAP-trained by the authors


def test_import_without_data_has_no_calibration(tmp_path):
    assert import_cli(OFFICIAL, "--out", tmp_path / "bare", "--device", "cpu") == 0
    meta = load_checkpoint(tmp_path / "bare").meta
    assert meta.calibration is None
    assert meta.metrics == {}


def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"not a torch file")
    assert import_cli(bogus, "--out", tmp_path / "x") == 2
    assert str(bogus) in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
