"""Per-example attack objectives. An attack maximises the loss; the logits decide success.

An `Objective` maps (x, y) to (loss [B], logits [B, C]). The loss is reduced per example so that an
example's attack never depends on its batch-mates (its gradient is the gradient of the sum). The
default objective is a loss of the classifier's own logits; adaptive attacks (adaptive.py) supply
objectives that go through the purifier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LogitsFn = Callable[[Tensor], Tensor]
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
LossName = Literal["ce", "dlr", "margin"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{i≠y} z_i − z_y: positive exactly when the example is misclassified (CW's f_6 without κ)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), scale invariant."""
    top = logits.sort(dim=1, descending=True).values
    return margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "dlr": dlr, "margin": margin}


def resolve_loss(loss: LossName | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; expected one of {sorted(LOSSES)} or a callable")
    return LOSSES[loss]


def classifier_objective(model: LogitsFn, loss: LossName | LossFn = "ce") -> Objective:
    """The plain objective: a loss of model(x)."""
    loss_fn = resolve_loss(loss)

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return loss_fn(logits, y), logits

    return objective


def input_gradient(objective: Objective, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(∇_x Σ loss, loss, logits) at x, without touching parameter gradients or the caller's tensor."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, logits = objective(x, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.detach(), loss.detach(), logits.detach()
