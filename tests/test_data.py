"""Datasets: ImageFolder decoding and its cache, torchvision layouts, clear errors, batched augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from training.data import (
    CIFAR10_CLASSES,
    DatasetError,
    interleaved_order,
    load_image_folder,
    load_splits,
    load_test_data,
    random_crop_flip,
)

TESTS = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOAP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mnist_image_folder_decodes_to_uint8_with_folder_labels():
    data = load_image_folder(TESTS / "mnist", (1, 28, 28))
    assert data.images.shape == (300, 1, 28, 28)
    assert data.images.dtype == torch.uint8
    assert data.class_names == [str(d) for d in range(10)]
    counts = torch.bincount(data.labels, minlength=10)
    for digit in range(10):
        assert counts[digit] == len(list((TESTS / "mnist" / str(digit)).iterdir()))
    assert data.images.float().mean() > 10  # real digits, not blank


def test_cifar_image_folder_classes_in_canonical_order():
    data = load_image_folder(TESTS / "cifar10", (3, 32, 32))
    assert data.class_names == CIFAR10_CLASSES
    assert data.images.shape == (80, 3, 32, 32)
    x, y = data.batch(torch.arange(4))
    assert x.dtype == torch.float32
    assert x.min() >= 0
    assert x.max() <= 1
    assert y.tolist() == [0, 0, 0, 0]


def test_cache_is_reused_and_keyed_by_folder_contents(tmp_path, private_cache):
    folder = tmp_path / "digits"
    shutil.copytree(TESTS / "mnist", folder)
    first = load_image_folder(folder, (1, 28, 28))
    cached = list((private_cache / "imagefolder").glob("*.pt"))
    assert len(cached) == 1
    again = load_image_folder(folder, (1, 28, 28))
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    assert list((private_cache / "imagefolder").glob("*.pt")) == cached
    # Removing an image changes the key: the stale cache is not used.
    next((folder / "3").iterdir()).unlink()
    changed = load_image_folder(folder, (1, 28, 28))
    assert len(changed) == len(first) - 1
    assert len(list((private_cache / "imagefolder").glob("*.pt"))) == 2


def test_corrupt_image_names_the_file(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(TESTS / "mnist", folder)
    bad = next((folder / "7").iterdir())
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(DatasetError, match=str(bad)):
        load_image_folder(folder, (1, 28, 28))


def test_missing_or_empty_data_root_says_how_to_get_data(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*--data-root"):
        load_splits("mnist", tmp_path / "nowhere", (1, 28, 28))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*MNIST/raw"):
        load_splits("mnist", tmp_path / "empty", (1, 28, 28))
    with pytest.raises(DatasetError, match=r"cifar100.*cifar-100-python.*--download"):
        load_splits("cifar100", tmp_path / "empty", (3, 32, 32))
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not an ImageFolder tree"):
        load_image_folder(tmp_path / "tree", (3, 32, 32))


def test_single_tree_is_split_deterministically():
    a = load_splits("mnist", TESTS / "mnist", (1, 28, 28))
    b = load_splits("mnist", TESTS / "mnist", (1, 28, 28))
    assert (len(a.train), len(a.test)) == (270, 30)
    assert torch.equal(a.test.images, b.test.images)


def test_images_of_another_size_are_resized_to_the_network_input():
    data = load_image_folder(TESTS / "mnist", (3, 32, 32))
    assert data.images.shape == (300, 3, 32, 32)


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="full MNIST not available")
def test_full_mnist_through_torchvision():
    splits = load_splits("mnist", SHARED, (1, 28, 28))
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.test.labels).tolist()[:2] == [980, 1135]  # canonical MNIST test class counts


def test_test_split_of_a_flat_folder_and_interleaved_order():
    data, source = load_test_data("cifar10", TESTS / "cifar10", (3, 32, 32))
    assert len(data) == 80
    assert "cifar10" in source
    order = interleaved_order(data.labels)
    assert data.labels[order][:10].tolist() == list(range(10))  # image 0000 of every class first
    assert sorted(order.tolist()) == list(range(80))


def test_random_crop_flip_is_a_seeded_shifted_crop():
    x = torch.rand(16, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == x.shape
    assert not torch.equal(a, x)
    plain = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    for i in range(16):  # without padding only the flip remains
        assert torch.equal(plain[i], x[i]) or torch.equal(plain[i], x[i].flip(-1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        found = any(
            torch.equal(a[i], padded[i, :, dy : dy + 32, dx : dx + 32])
            or torch.equal(a[i], padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1))
            for dy in range(9)
            for dx in range(9)
        )
        assert found
