"""Which torch device a `--device` option names: one rule for training, evaluation and the service."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when torch sees a GPU, else the CPU. A CUDA device without an index is this process's GPU
    (`local_rank` under torchrun, modulo the GPUs visible). Asking for CUDA where there is none is a ValueError
    saying so, never a silent run on the CPU; a name torch does not know is torch's RuntimeError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine; use cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
