"""Per-image randomness: an image's random draws depend on (seed, stream, its index), nothing else.

With one generator per batch an image's random start would depend on its batch-mates and on how the
images are split over batches and processes; with one generator per image a distributed evaluation
draws exactly what a single process draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def derive_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for (seed, stream, index), stable across runs, platforms and processes."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ImageGenerators:
    """One CPU torch.Generator per image of a batch, seeded by `derive_seed(seed, stream, index)`."""

    def __init__(self, seed: int, stream: str, indices: Sequence[int]):
        self.indices = list(indices)
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, stream, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Uniform [0, 1) draws of `shape` [B, ...]; row i from image i's generator (drawn on the CPU)."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{shape[0]} images but {len(self.generators)} per-image generators")
        rows = [torch.rand(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)
