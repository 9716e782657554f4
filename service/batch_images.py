"""A batch's images on their way to the compute: decoded pixels, or image files whose pixels are decoded where the
batch is computed.

The event loop is the service's one serial stage: every request's bytes pass through it, and while it decodes one
request's image the compute processes wait for the next batch. Decoding a small image there cost ~100 µs of its
~270 µs per request (in-process, 64 clients, docs/performance.md), against ~40 µs in a tight loop: so a small image's
header is checked on the event loop (service/pipeline.py: a bad file is still refused with 422 before it is queued)
and its pixels are decoded in the compute process, one batch at a time. Large images are decoded before queueing, as
before, in a bounded thread pool, so a compute process never holds more than one image's pixels at full size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .decode import DecodeLimits, ImageRejected, decode_image


@dataclass(frozen=True, slots=True)
class ImageFiles:
    """One request's image files, each already through `open_image` with these limits on the event loop: only their
    pixels remain to be decoded, into the model's input shape."""

    files: tuple[bytes, ...]
    input_shape: tuple[int, int, int]
    limits: DecodeLimits

    def __len__(self) -> int:
        return len(self.files)

    def decode(self) -> tuple[np.ndarray, dict[int, str]]:
        """[N, C, H, W] float32 pixels in [0, 1]; a file whose pixels cannot be decoded (truncated, corrupt) becomes
        zeros, and its row's reason is in the dict."""
        pixels = np.zeros((len(self.files), *self.input_shape), dtype=np.float32)
        rejected: dict[int, str] = {}
        for row, data in enumerate(self.files):
            try:
                pixels[row] = decode_image(data, self.input_shape, self.limits).numpy()
            except ImageRejected as exc:
                rejected[row] = exc.detail
        return pixels, rejected


RequestImages = torch.Tensor | ImageFiles  # one request's images, as queued: [n, C, H, W] pixels, or files
WirePart = np.ndarray | ImageFiles  # the same through a pipe (a tensor would be sent as shared memory)


class BatchImages:
    """Requests' images in batch order, pixels and files mixed: `len` counts images, a slice takes rows, `decode`
    gives one pixel batch. (A batch of pixels only is a plain tensor and never becomes one of these.)"""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[RequestImages]) -> None:
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, rows: slice) -> BatchImages:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("BatchImages slices take consecutive rows")
        taken: list[RequestImages] = []
        offset = 0
        for part in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, len(part))
            if lo < hi:
                if isinstance(part, ImageFiles):
                    taken.append(ImageFiles(part.files[lo:hi], part.input_shape, part.limits))
                else:
                    taken.append(part[lo:hi])
            offset += len(part)
        return BatchImages(taken)

    def to_wire(self) -> list[WirePart]:
        return [part if isinstance(part, ImageFiles) else part.numpy() for part in self.parts]

    @staticmethod
    def from_wire(parts: list[WirePart]) -> BatchImages:
        return BatchImages([part if isinstance(part, ImageFiles) else torch.from_numpy(part) for part in parts])

    def decode(self) -> tuple[torch.Tensor, dict[int, str]]:
        """All rows as one [N, C, H, W] tensor, and the rows whose files could not be decoded (zeros in the
        tensor) with the reason for each."""
        arrays: list[np.ndarray] = []
        rejected: dict[int, str] = {}
        offset = 0
        for part in self.parts:
            if isinstance(part, ImageFiles):
                pixels, bad = part.decode()
                rejected.update({offset + row: detail for row, detail in bad.items()})
                arrays.append(pixels)
            else:
                arrays.append(part.numpy())
            offset += len(part)
        return torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0]), rejected


def pixels_of(images: torch.Tensor | BatchImages) -> tuple[torch.Tensor, dict[int, str]]:
    """What a worker computes on: the batch's pixels and its undecodable rows (none for a pixel batch)."""
    return (images, {}) if isinstance(images, torch.Tensor) else images.decode()
