"""Black-box substitute attack (Papernot et al. 2017) as the paper ran it on MNIST (soap-reference §4).

The attacker sees only the target's labels. It labels a small seed set (150 test images the evaluation
does not score) with the target, trains a substitute network, and grows the set by Jacobian-based
augmentation: S ← S ∪ {x + λ·sign(∂F_{O(x)}/∂x)} with λ = 0.1, re-labelled by the target each round.
Adversarial examples are then FGSM on the substitute, transferred to the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.attacks.linf import fgsm
from models.attacks.losses import Tensor

LabelOracle = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SubstituteConfig:
    """Papernot et al.'s MNIST settings: 6 augmentation rounds (ρ), 10 epochs each, λ = 0.1."""

    rounds: int = 6
    epochs: int = 10
    lam: float = 0.1
    batch_size: int = 128
    learning_rate: float = 1e-3
    query_batch_size: int = 500


def _query(oracle: LabelOracle, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([oracle(chunk) for chunk in x.split(batch_size)])


def _fit(model: nn.Module, x: Tensor, y: Tensor, config: SubstituteConfig, generator: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for idx in order.split(config.batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _jacobian_step(model: nn.Module, x: Tensor, labels: Tensor, lam: float) -> Tensor:
    """x + λ·sign(∂ logit_{label}/∂x): the direction in which the substitute's label-logit changes."""
    a = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(a).gather(1, labels[:, None]).sum(), a)
    return (x + lam * grad.sign()).clamp(0.0, 1.0)


def train_substitute(
    substitute: nn.Module,
    oracle: LabelOracle,
    seed_images: Tensor,
    config: SubstituteConfig = SubstituteConfig(),
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Train `substitute` (its parameters are updated in place) on target labels with Jacobian augmentation.

    Papernot et al. alternate the sign of λ every few rounds (τ); with ρ = 6 rounds we keep λ > 0.
    Returns the substitute in eval mode.
    """
    generator = generator or torch.Generator().manual_seed(0)
    data = seed_images.detach()
    labels = _query(oracle, data, config.query_batch_size)
    for rnd in range(config.rounds + 1):
        _fit(substitute, data, labels, config, generator)
        if rnd == config.rounds:
            break
        new = _jacobian_step(substitute, data, labels, config.lam)
        data = torch.cat([data, new])
        labels = torch.cat([labels, _query(oracle, new, config.query_batch_size)])
    for p in substitute.parameters():
        p.requires_grad_(False)
    return substitute.eval()


def substitute_fgsm(substitute: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """FGSM on the substitute: the transferred black-box adversarial examples."""
    return fgsm(substitute, x, y, eps)
