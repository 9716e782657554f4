"""Ensembles as one network (models/ensemble.py) and the `training ensemble` command: the logits are the mean of the
members' logits, the head the mean of their heads, and a joined checkpoint loads, certifies and keeps its record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import ROOT, mnist_image

from models import create_model, load_checkpoint
from models.ensemble import ensemble
from models.smoothing import SmoothingConfig, certify, noisy_classifier
from training.__main__ import main as training_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CANDIDATES = ROOT / "candidates"
SIGMA_05 = [CANDIDATES / "mnist-lenet-dr-consistency-a10-s05", CANDIDATES / "mnist-lenet-dr-gaussian-a10-s05"]
SIGMA_025 = CANDIDATES / "mnist-lenet-dr-consistency-a10-s025"


def digits() -> torch.Tensor:
    images = [np.asarray(mnist_image(d), dtype=np.float32) / 255.0 for d in range(10)]
    return torch.from_numpy(np.stack(images))[:, None]


def test_logits_and_reconstruction_are_the_members_means() -> None:
    torch.manual_seed(0)
    members = [create_model("mnist-lenet-dr").eval() for _ in range(3)]
    joined = ensemble(members).eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        logits = torch.stack([m(x) for m in members]).mean(0)
        heads = torch.stack([m.auxiliary(m.encode(x)) for m in members]).mean(0)
        assert torch.allclose(joined(x), logits, atol=1e-5)
        assert torch.allclose(joined.auxiliary(joined.encode(x)), heads, atol=1e-6)
    # One classifier over the concatenated representations replaces the members' three.
    assert joined.classifier.in_features == 3 * 500
    assert joined.num_classes == 10


def test_the_registered_ensemble_has_the_joined_networks_tensors() -> None:
    """A joined network's state dict is what `mnist-lenet-dr-x2` builds, so its checkpoint loads by name."""
    joined = ensemble([create_model("mnist-lenet-dr") for _ in range(2)])
    built = create_model("mnist-lenet-dr-x2")
    assert {k: v.shape for k, v in joined.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    built.load_state_dict(joined.state_dict())


def test_members_that_read_other_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ensemble([create_model("mnist-lenet-dr")])
    with pytest.raises(ValueError, match="member 1 differs"):
        ensemble([create_model("mnist-lenet-dr"), create_model("mnist-lenet-dr", num_classes=5)])


def test_the_command_joins_real_checkpoints_into_one_that_loads_and_certifies(tmp_path) -> None:
    out = tmp_path / "joined"
    assert training_main(["ensemble", *map(str, SIGMA_05), "--out", str(out), "--device", "cpu"]) == 0
    loaded = load_checkpoint(out)
    members = [load_checkpoint(p).network for p in SIGMA_05]
    x = digits()
    with torch.no_grad():
        assert torch.allclose(loaded.network(x), torch.stack([m(x) for m in members]).mean(0), atol=1e-5)
    assert loaded.meta.network == "mnist-lenet-dr-x2"
    assert loaded.meta.training_noise_std == 0.5
    assert loaded.meta.aux_head_trained
    record = json.loads((out / "model.json").read_text())["training"]
    assert [m["path"] for m in record["members"]] == [str(p) for p in SIGMA_05]
    assert record["command"].startswith("python -m training ensemble")
    assert (out / "MODEL_CARD.md").is_file()
    # The joined network is a base classifier like any other: it certifies a real digit.
    config = SmoothingConfig(sigma=0.5, n0=50, n=500, alpha=0.01, batch_size=250)
    (cert,) = certify(noisy_classifier(loaded.network), x[7:8], config, 10, seed=0)
    assert cert.label == 7
    assert cert.radius is not None
    assert cert.radius > 0


def test_the_command_refuses_members_trained_at_other_noise_levels(tmp_path, capsys) -> None:
    out = tmp_path / "mixed"
    assert training_main(["ensemble", str(SIGMA_05[0]), str(SIGMA_025), "--out", str(out), "--device", "cpu"]) == 2
    assert "σ = 0.25" in capsys.readouterr().err
    assert not out.exists()


def test_the_command_refuses_members_trained_on_clamped_and_unclamped_noise(tmp_path, capsys) -> None:
    unclamped = tmp_path / "unclamped"
    unclamped.mkdir()
    for name in ("model.safetensors", "model.json"):
        (unclamped / name).write_bytes((SIGMA_05[1] / name).read_bytes())
    meta = json.loads((unclamped / "model.json").read_text())
    (unclamped / "model.json").write_text(json.dumps(meta | {"noise_clamp": False}))
    out = tmp_path / "mixed"
    assert training_main(["ensemble", str(SIGMA_05[0]), str(unclamped), "--out", str(out), "--device", "cpu"]) == 2
    assert "clamped" in capsys.readouterr().err
    assert not out.exists()
