"""Datasets as in-memory uint8 tensors: MNIST and CIFAR through torchvision, any ImageFolder tree.

Everything is loaded once into a `TensorDataset`-like `ImageData` (uint8 [N, C, H, W] + int64 labels), so
training iterates with plain tensor indexing: no DataLoader workers to fight over 2 CPU cores, and
shuffling/augmentation come from one seeded `torch.Generator` (deterministic and resumable).

ImageFolder trees are decoded once and cached under `$SOAP_CACHE_DIR` (default `~/.cache/soap`), keyed by a
hash of the folder's file list, sizes and modification times, so the data folder itself may be read-only.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MNIST_CLASSES = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CACHE_FORMAT = 1


class DatasetError(RuntimeError):
    """Data is missing or malformed; the message names the path and how to obtain the data."""


@dataclass
class ImageData:
    """Images as uint8 [N, C, H, W], labels as int64 [N], and the class names in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | slice) -> ImageData:
        return ImageData(self.images[indices], self.labels[indices], self.class_names)

    def to(self, device: torch.device | str) -> ImageData:
        """Hold the uint8 images on `device` (a GPU keeps a whole CIFAR-10 in 150 MB; batches then never cross PCIe)."""
        return ImageData(self.images.to(device), self.labels.to(device), self.class_names)

    def batch(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for `indices`, on `device`."""
        indices = indices.to(self.images.device)
        x = self.images[indices].to(device, non_blocking=True).float().div_(255.0)
        return x, self.labels[indices].to(device, non_blocking=True)


@dataclass
class DataSplits:
    train: ImageData | None  # None when only the test split was asked for
    test: ImageData
    source: str  # human-readable description for provenance


def cache_dir() -> Path:
    return Path(os.environ.get("SOAP_CACHE_DIR") or Path.home() / ".cache" / "soap")


# ----------------------------------------------------------------------------- torchvision datasets


def _how_to_get(dataset: str) -> str:
    return {
        "mnist": "pass --data-root DIR where DIR/MNIST/raw/ holds the four IDX files (torchvision layout), "
        "or add --download on a machine with internet access",
        "cifar10": "pass --data-root DIR holding torchvision's cifar-10-batches-py/ (add --download on a machine with "
        "internet access), or an ImageFolder tree DIR/train/<class>/*.png|jpg and DIR/test/<class>/...",
        "cifar100": "pass --data-root DIR holding torchvision's cifar-100-python/ (add --download on a machine with "
        "internet access), or an ImageFolder tree DIR/train/<class>/... and DIR/test/<class>/...",
    }.get(dataset, "pass --data-root pointing at an ImageFolder tree (one subfolder per class)")


def _torchvision_splits(dataset: str, root: Path, download: bool, train_split: bool = True) -> DataSplits:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset]
    try:
        test = cls(root=str(root), train=False, download=download)
        train = cls(root=str(root), train=True, download=download) if train_split else None
    except (RuntimeError, OSError, ValueError) as exc:
        raise DatasetError(
            f"cannot load {dataset} from {root}: {exc}. To get the data: {_how_to_get(dataset)}."
        ) from None

    def to_data(ds) -> ImageData:
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # MNIST [N,H,W]; CIFAR NHWC
        names = MNIST_CLASSES if dataset == "mnist" else list(ds.classes)
        return ImageData(
            images.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), names
        )

    return DataSplits(to_data(train) if train else None, to_data(test), f"torchvision {cls.__name__} at {root}")


# ----------------------------------------------------------------------------- ImageFolder


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_image_folder(root: Path) -> bool:
    """True when `root` has class subfolders that contain image files."""
    return root.is_dir() and any(_image_files(c) for c in _class_folders(root))


def _folder_key(root: Path, classes: list[Path], files: list[list[Path]], shape: tuple[int, int, int]) -> str:
    digest = hashlib.sha256(f"v{CACHE_FORMAT} {shape}".encode())
    for paths in files:
        for p in paths:
            st = p.stat()
            digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    channels, height, width = shape
    try:
        with Image.open(path) as source:
            img = source.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a readable image ({exc}); remove or replace it, then run again") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | Path, shape: tuple[int, int, int], use_cache: bool = True) -> ImageData:
    """Decode `root/<class>/*` into uint8 tensors of `shape` (C, H, W); cached by the folder's contents.

    Labels follow the sorted class folder names (torchvision's ImageFolder order); within a class, files are in
    sorted name order. Only files directly inside a class folder count.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist. {_how_to_get('imagefolder')}")
    classes = _class_folders(root)
    files = [_image_files(c) for c in classes]
    if not classes or not any(files):
        raise DatasetError(
            f"{root} is not an ImageFolder tree: expected one subfolder per class holding images "
            f"({', '.join(IMAGE_EXTENSIONS)}), found {len(classes)} subfolders and no images"
        )
    empty = [c.name for c, f in zip(classes, files, strict=True) if not f]
    if empty:
        raise DatasetError(f"class folder(s) {empty} under {root} hold no images; remove them or add images")
    key = _folder_key(root, classes, files, shape)
    cache_file = cache_dir() / "imagefolder" / f"{key}.pt"
    if use_cache and cache_file.is_file():
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            return ImageData(cached["images"], cached["labels"], list(cached["class_names"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    from tqdm import tqdm

    total = sum(len(f) for f in files)
    images = np.empty((total, *shape), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    i = 0
    with tqdm(
        total=total,
        desc=f"decoding {root}",
        unit="img",
        leave=False,
        disable=total < 2000,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    ) as bar:
        for label, paths in enumerate(files):
            for p in paths:
                images[i], labels[i] = _decode(p, shape), label
                i += 1
                bar.update()
    data = ImageData(torch.from_numpy(images), torch.from_numpy(labels), [c.name for c in classes])
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": data.images, "labels": data.labels, "class_names": data.class_names}, tmp)
        tmp.replace(cache_file)
    return data


def split_holdout(data: ImageData, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """Deterministic train/held-out split (for an ImageFolder with no test/ subfolder)."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(data) * fraction)))
    return data.subset(perm[n_test:]), data.subset(perm[:n_test])


def _image_folder_splits(root: Path, shape: tuple[int, int, int], holdout: float) -> DataSplits:
    if (root / "train").is_dir():
        train = load_image_folder(root / "train", shape)
        if (root / "test").is_dir():
            test = load_image_folder(root / "test", shape)
            if test.class_names != train.class_names:
                raise DatasetError(f"{root}/test has classes {test.class_names}, {root}/train has {train.class_names}")
            return DataSplits(train, test, f"ImageFolder {root}/train + {root}/test")
        train, test = split_holdout(train, holdout)
        return DataSplits(train, test, f"ImageFolder {root}/train ({holdout:.0%} held out, seed 0)")
    train, test = split_holdout(load_image_folder(root, shape), holdout)
    return DataSplits(train, test, f"ImageFolder {root} ({holdout:.0%} held out, seed 0)")


# ----------------------------------------------------------------------------- entry point


def load_splits(
    dataset: str, root: str | Path | None, shape: tuple[int, int, int], download: bool = False, holdout: float = 0.1
) -> DataSplits:
    """Train and test data for `dataset` ("mnist" | "cifar10" | "cifar100" | "imagefolder") under `root`.

    An ImageFolder tree at `root` (with train/ and test/, or a single tree split 90/10) wins over the torchvision
    layout, so `--data-root my_images/` works for every preset whose input shape the images can be resized to.
    """
    root = Path(root) if root is not None else cache_dir() / "datasets"
    if not root.exists() and not download:
        raise DatasetError(f"data root {root} does not exist. To get the data: {_how_to_get(dataset)}.")
    if is_image_folder(root / "train") or is_image_folder(root):
        return _image_folder_splits(root, shape, holdout)
    if dataset in ("mnist", "cifar10", "cifar100"):
        return _torchvision_splits(dataset, root, download)
    raise DatasetError(f"{root} is not an ImageFolder tree. {_how_to_get(dataset)}.")


def load_test_data(
    dataset: str, root: str | Path | None, input_shape: Sequence[int], download: bool = False
) -> tuple[ImageData, str]:
    """Only the test split (root/test or root itself as ImageFolder, or torchvision's test set); no training set
    decoded. `input_shape` is [C, H, W] (a checkpoint's `input_shape`); root None: as load_splits."""
    channels, height, width = input_shape
    shape = (channels, height, width)
    root = Path(root) if root is not None else cache_dir() / "datasets"
    if is_image_folder(root / "test"):
        return load_image_folder(root / "test", shape), f"ImageFolder {root}/test"
    if is_image_folder(root):
        return load_image_folder(root, shape), f"ImageFolder {root} (all images)"
    if dataset in ("mnist", "cifar10", "cifar100"):
        splits = _torchvision_splits(dataset, root, download, train_split=False)
        return splits.test, splits.source
    raise DatasetError(f"{root} has no test/ ImageFolder. {_how_to_get(dataset)}.")


def evaluation_order(data: ImageData, source: str) -> tuple[torch.Tensor, str]:
    """The order in which test images are taken: canonical for torchvision sets (the first n, as Croce et al.),
    a fixed random permutation (seed 0) for ImageFolder trees, whose files are sorted by class."""
    if source.startswith("ImageFolder"):
        return torch.randperm(
            len(data), generator=torch.Generator().manual_seed(0)
        ), "images drawn by a fixed permutation (seed 0) of the folder"
    return torch.arange(len(data)), "the first n images in canonical order"


def interleaved_order(labels: torch.Tensor) -> torch.Tensor:
    """Indices ordering examples by (position within their class, class): 1st of each class, then 2nd, ...

    For an ImageFolder of files numbered per class (test/<class>/NNNN.jpg) this is a deterministic, class-balanced
    order; its first N images hold N / num_classes of each class.
    """
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    rank = torch.zeros_like(labels)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    return torch.argsort(rank * num_classes + labels, stable=True)


# ----------------------------------------------------------------------------- augmentation


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-example random crop after zero padding, and horizontal flip with p = 0.5 (batched, no loop)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
