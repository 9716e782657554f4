"""Importing the authors' released CIFAR-10 LC checkpoint (../shared/reference/official-checkpoint/).

The converted network must compute exactly what the original state dict computes: we check it against a
forward pass written here from scratch with torch.nn.functional over the original tensors, on real
CIFAR-10 test JPEGs. (The `import-reference` CLI and the 1000-image accuracy report live with training.)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import CheckpointError, load_checkpoint, purify, save_checkpoint
from models.checkpoint import meta_for
from models.reference import convert_reference_state_dict, load_reference_state_dict

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "official-checkpoint" / "cifar10-resnet-lc.pth"
CIFAR_TEST_DATA = REPO / "tests" / "data" / "cifar10"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)

needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason=f"reference checkpoint not found at {REFERENCE}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_cifar_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 80 test JPEGs of tests/data/cifar10 as [N, 3, 32, 32] in [0, 1], with labels."""
    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        for path in sorted((CIFAR_TEST_DATA / name).glob("*.jpg")):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The authors' thin ResNet written out with torch.nn.functional (BatchNorm in eval mode)."""

    def bn(h, prefix):
        return F.batch_norm(
            h,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    def conv(h, prefix, stride=1, padding=1):
        return F.conv2d(h, state[f"{prefix}.weight"], state[f"{prefix}.bias"], stride=stride, padding=padding)

    h = (x - MEAN) / STD
    h = F.relu(bn(conv(h, "conv1"), "bn1"))
    for layer in (1, 2, 3):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            out = F.relu(bn(conv(h, f"{p}.conv1", stride=stride), f"{p}.bn1"))
            out = bn(conv(out, f"{p}.conv2"), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in state:
                short = bn(conv(h, f"{p}.shortcut.0", stride=stride, padding=0), f"{p}.shortcut.1")
            else:
                short = h
            h = F.relu(out + short)
    h = F.avg_pool2d(h, 8).flatten(1)
    return F.linear(h, state["linear.weight"], state["linear.bias"])


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return load_reference_state_dict(REFERENCE)


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    return load_cifar_images()


@needs_reference
def test_reference_file_is_the_documented_state_dict(original) -> None:
    assert len(original) == 107
    assert sum(v.numel() for k, v in original.items() if "running" not in k and "num_batches" not in k) == 175_818
    assert "linear.weight" in original
    assert not any(k.startswith("module.") for k in original)


@needs_reference
def test_converted_logits_equal_an_independent_forward_pass(original, cifar) -> None:
    images, labels = cifar
    assert images.shape == (80, 3, 32, 32)
    model = convert_reference_state_dict(original, "cifar10-resnet18-lc")
    assert not model.training
    with torch.no_grad():
        ours = model(images)
        theirs = reference_forward(original, images)
    assert (ours - theirs).abs().max() <= 1e-4
    accuracy = (ours.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.7, f"reference LC model: clean accuracy {accuracy:.3f} on the 80 test JPEGs"


@needs_reference
def test_import_then_save_and_load_keeps_the_logits(original, cifar, tmp_path: Path) -> None:
    images, labels = cifar
    model = convert_reference_state_dict(original, "cifar10-resnet18-lc")
    meta = meta_for(
        model,
        network="cifar10-resnet18-lc",
        dataset="cifar10",
        class_names=CIFAR10_CLASSES,
        training={"source": "Mishne-Lab/SOAP released checkpoint"},
    )
    loaded = load_checkpoint(save_checkpoint(model, meta, tmp_path / "cifar10-resnet18-lc-reference"))
    with torch.no_grad():
        assert torch.equal(loaded.network(images[:16]), model(images[:16]))
    # Purifying clean images with the imported model keeps them (mostly) correctly classified.
    result = purify(loaded.network, images[:16], loaded.purifier)
    with torch.no_grad():
        purified_accuracy = (loaded.network(result.images).argmax(1) == labels[:16]).float().mean().item()
    assert (result.aux_after <= result.aux_before).all()
    assert purified_accuracy >= 0.6


@needs_reference
def test_wrong_target_network_is_rejected(original) -> None:
    with pytest.raises(CheckpointError, match="unexpected tensors|missing tensors|wrong shape"):
        convert_reference_state_dict(original, "cifar10-wrn28-lc")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_reference_loader_does_not_execute_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": _Exploit(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="not a readable reference checkpoint"):
        load_reference_state_dict(path)
    assert not marker.exists()


def test_reference_loader_rejects_non_state_dicts(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_reference_state_dict(path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(2, 2)}}, wrapped)
    assert list(load_reference_state_dict(wrapped)) == ["linear.weight"]
