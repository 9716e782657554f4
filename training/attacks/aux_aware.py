"""The auxiliary-aware PGD of the paper (§4.1, Eq. 9): maximise L_cls − β·L_aux.

β is on the paper's scale: the authors' code multiplies it by `BETA_SCALE` = 100 before use, so the
objective is CE − 100·β·L_aux. β > 0 looks for low-auxiliary-loss ("on-manifold") adversarials that
purification should leave alone; β = 0 is plain PGD.
"""

from __future__ import annotations

import torch

from models import SoapNetwork, aux_loss
from models.attacks.linf import pgd
from models.attacks.losses import Objective, Tensor, cross_entropy

BETA_SCALE = 100.0


def aux_aware_objective(model: SoapNetwork, beta: float, beta_scale: float = BETA_SCALE) -> Objective:
    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = model.encode(x)
        logits = model.classify(z)
        loss = cross_entropy(logits, y)
        if beta != 0:
            loss = loss - beta * beta_scale * aux_loss(model, x)
        return loss, logits

    return objective


def aux_aware_pgd(
    model: SoapNetwork,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    beta: float,
    random_start: bool = False,
    *,
    beta_scale: float = BETA_SCALE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L∞ PGD on CE − beta_scale·β·L_aux (same update and projection as `pgd`)."""
    return pgd(
        model,
        x,
        y,
        eps,
        step_size,
        steps,
        random_start,
        objective=aux_aware_objective(model, beta, beta_scale),
        generator=generator,
    )
