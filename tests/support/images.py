"""Real test images (tests/data/mnist) and the malformed ones every decoder must refuse."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from benchmarks.harness import ROOT

MNIST = ROOT / "tests" / "data" / "mnist"


def mnist_files(per_digit: int = 3) -> list[tuple[int, Path]]:
    """(label, path) of real MNIST test digits, `per_digit` of each class."""
    return [(d, p) for d in range(10) for p in sorted((MNIST / str(d)).glob("*.png"))[:per_digit]]


def mnist_path(digit: int = 7, index: int = 0) -> Path:
    """The `index`-th real MNIST test image of class `digit` (tests/data/mnist), as a file."""
    return sorted((MNIST / str(digit)).glob("*.png"))[index]


def mnist_png(digit: int = 7, index: int = 0) -> bytes:
    """The same image's PNG bytes."""
    return mnist_path(digit, index).read_bytes()


def mnist_image(digit: int = 7, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(mnist_png(digit, index))).convert("L")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- bad inputs


def truncated_png() -> bytes:
    data = mnist_png(3)
    return data[: len(data) // 2]


def bomb_png(side: int = 6000) -> bytes:
    """A small file declaring side x side pixels (36 M for 6000): a decompression bomb under the default limit."""
    return encode(Image.new("L", (side, side)), "PNG", optimize=False)


def absurd_png() -> bytes:
    return encode(Image.new("L", (20000, 1)), "PNG")


def animated_gif() -> bytes:
    frames = [mnist_image(d) for d in (1, 2, 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    frames = [mnist_image(d) for d in (4, 5)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


_BAD_CACHE: dict[str, bytes] = {}


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (payload, a word the error detail must contain); every one must be refused with 422."""
    if not _BAD_CACHE:
        _BAD_CACHE.update(bomb=bomb_png(), absurd=absurd_png(), gif=animated_gif(), tiff=multipage_tiff())
    return {
        "empty": (b"", "empty"),
        "not_an_image": (b"%PDF-1.4 this is not an image at all" * 10, "not an image"),
        "truncated": (truncated_png(), "truncated"),
        "decompression_bomb": (_BAD_CACHE["bomb"], "decompression bomb"),
        "absurd_dimensions": (_BAD_CACHE["absurd"], "dimensions"),
        "animated_gif": (_BAD_CACHE["gif"], "animated"),
        "multipage_tiff": (_BAD_CACHE["tiff"], "multi-page"),
    }
