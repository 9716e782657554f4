"""How the purifier evaluates the auxiliary loss: numeric precision and compilation.

Purification is ~11 gradient evaluations of the auxiliary loss per image, so this loss is where a GPU spends its
time. Two accelerations, both off by default until measured on the device (benchmarks/gpu_check.py):
- bf16 autocast: the network's forward and backward run in bfloat16 where autocast allows (inputs, the returned loss
  and the gradient w.r.t. the float32 input stay float32). The purifier steps by the gradient's *sign*, so small
  rounding rarely changes a step; whether it changes the chosen ε is what the GPU check measures.
- torch.compile: the loss is compiled once per model (forward and, through AOTAutograd, its backward). The purifier
  calls it with a few batch shapes (one per number of live trajectories); after the first change of shape torch
  compiles a shape-generic graph, so a server's varying batch sizes do not recompile without end.

`aux_loss_fn` builds the callable once per model; `models.purify(..., loss_fn=...)` uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch

from .networks import SoapNetwork
from .tasks import aux_loss

AuxLossFn = Callable[[torch.Tensor], torch.Tensor]
"""Per-example auxiliary loss of a batch in [0, 1] ([B, C, H, W] -> [B], float32)."""


class Precision(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class Acceleration:
    """Precision of the auxiliary loss and whether it is compiled; the defaults are plain float32 eager."""

    precision: Precision = Precision.FLOAT32
    compile: bool = False
    compile_backend: str = "inductor"  # "aot_eager" compiles without code generation (fast; tests)

    @property
    def enabled(self) -> bool:
        return self.precision is not Precision.FLOAT32 or self.compile


def aux_loss_fn(model: SoapNetwork, acceleration: Acceleration = Acceleration()) -> AuxLossFn:
    """The model's test-time auxiliary loss with `acceleration` applied. Build once per model and reuse:
    compilation happens on the first call of each input shape."""
    loss: AuxLossFn = partial(aux_loss, model)
    if acceleration.compile:
        loss = torch.compile(loss, backend=acceleration.compile_backend)
    if acceleration.precision is Precision.FLOAT32:
        return loss
    dtype = torch.bfloat16

    def autocast_loss(x: torch.Tensor) -> torch.Tensor:
        context = (
            torch.autocast(device_type=x.device.type, dtype=dtype)
            if x.device.type in ("cuda", "cpu")
            else nullcontext()
        )
        with context:
            return loss(x).float()

    return autocast_loss
