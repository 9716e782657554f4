"""Adaptive attacks on purify-then-classify (BPDA, BPDA over the trajectory, full gradient).

SOAP's defended prediction is model(purify(x)). `models.purify` detaches its output, so an attacker
needs a gradient for the purifier. Three objectives, each usable by `pgd`, `apgd` or `fgsm`:

- `bpda_objective`: forward through the real min-aux purifier, backward as identity
  (Athalye et al. 2018): ∇_x L(model(purify(x))) ≈ ∇L at the purified image.
- `bpda_trajectory_objective`: identity backward, but the loss is averaged over the iterates x_1..x_T
  of Algorithm 2 at the ε that min-aux chose, so the gradient mixes the classifier's gradients along
  the purification path (as Croce et al. 2022 did for SOAP).
- `full_gradient_objective`: differentiate through Algorithm 2 unrolled at the chosen ε, including
  the auxiliary gradient (second order, `create_graph=True`). sign() has zero derivative almost
  everywhere, so the exact Jacobian of every purification step is just its clip mask and the attack
  would degrade to masked BPDA (`sign_backward="zero"` keeps exactly that). The default
  `sign_backward="tanh"` is a straight-through surrogate: forward sign(g), backward the derivative of
  tanh(g/τ) with τ the per-example mean |g|, so the gradient also sees how the attack moves the
  purifier's own steps. The min-aux choice of ε is piecewise constant in x (zero gradient) and is
  treated as a constant.

All objectives return the defended logits (the prediction the real pipeline makes), so success and
best-iterate tracking in the attacks refer to the defended model.
"""

from __future__ import annotations

from typing import Literal

import torch

from models import PurifierConfig, SoapNetwork, aux_loss, purify
from models.attacks.losses import LossFn, LossName, Objective, Tensor, resolve_loss

SignBackward = Literal["zero", "tanh"]


def defended_logits(model: SoapNetwork, config: PurifierConfig, mode: str = "min-aux", epsilon: float | None = None):
    """The defended classifier x ↦ model(purify(x)) as a (non-differentiable) logits function."""

    def logits(x: Tensor) -> Tensor:
        images = purify(model, x, config, mode=mode, epsilon=epsilon).images
        with torch.no_grad():
            return model(images)

    return logits


def _straight_through(x: Tensor, images: Tensor) -> Tensor:
    """Value of `images`, gradient of the identity with respect to x."""
    return x + (images - x).detach()


def bpda_objective(
    model: SoapNetwork, config: PurifierConfig, loss: LossName | LossFn = "ce", mode: str = "min-aux"
) -> Objective:
    loss_fn = resolve_loss(loss)

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        images = purify(model, x, config, mode=mode).images
        logits = model(_straight_through(x, images))
        return loss_fn(logits, y), logits

    return objective


def _sign(g: Tensor, backward: SignBackward) -> Tensor:
    s = g.sign()
    if backward == "zero":
        return s
    tau = g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    soft = torch.tanh(g / tau)
    return s.detach() + soft - soft.detach()


def unrolled_purification(
    model: SoapNetwork,
    x: Tensor,
    epsilon: Tensor,
    config: PurifierConfig,
    *,
    differentiable: bool = False,
    sign_backward: SignBackward = "tanh",
) -> list[Tensor]:
    """Algorithm 2 at a per-example budget `epsilon` [B]; returns the iterates [x_0 = x, x_1, ..., x_T].

    With `differentiable`, the graph runs through every step including the auxiliary gradient
    (create_graph=True), so ∂x_T/∂x exists; otherwise iterates are detached. Same update as
    models.purifier: δ ← clip(δ − γ·sign(∇L_aux(x + δ)), −ε, ε); δ ← clip(x + δ, 0, 1) − x.
    """
    eps = epsilon.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    delta = torch.zeros_like(x)
    iterates = [x]
    for _ in range(config.steps):
        point = x + delta
        if not differentiable or not point.requires_grad:
            point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(aux_loss(model, point).sum(), point, create_graph=differentiable)
        step = _sign(grad, sign_backward) if differentiable else grad.sign()
        delta = torch.maximum(torch.minimum(delta - config.step_size * step, eps), -eps)
        delta = (x + delta).clamp(0.0, 1.0) - x
        if not differentiable:
            delta = delta.detach()
        iterates.append(x + delta)
    return iterates


def chosen_epsilon(model: SoapNetwork, x: Tensor, config: PurifierConfig) -> Tensor:
    """The per-example budget min-aux picks for x (no gradient)."""
    return purify(model, x, config, mode="min-aux").epsilon


def bpda_trajectory_objective(model: SoapNetwork, config: PurifierConfig, loss: LossName | LossFn = "ce") -> Objective:
    loss_fn = resolve_loss(loss)

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        iterates = unrolled_purification(model, x.detach(), chosen_epsilon(model, x, config), config)[1:]
        logits_t = [model(_straight_through(x, it)) for it in iterates]
        value = torch.stack([loss_fn(lg, y) for lg in logits_t]).mean(0)
        return value, logits_t[-1]

    return objective


def full_gradient_objective(
    model: SoapNetwork,
    config: PurifierConfig,
    loss: LossName | LossFn = "ce",
    sign_backward: SignBackward = "tanh",
) -> Objective:
    loss_fn = resolve_loss(loss)

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        eps = chosen_epsilon(model, x, config)
        purified = unrolled_purification(model, x, eps, config, differentiable=True, sign_backward=sign_backward)[-1]
        logits = model(purified)
        return loss_fn(logits, y), logits

    return objective
