"""L∞ attacks: FGSM, PGD (random start, restarts, best-loss tracking) and the uniform-noise control.

Inputs are pixels in [0, 1]; `model` maps them to logits and should be in eval mode (BatchNorm and
dropout must not couple examples). Inputs and parameters are never modified. The update order of PGD
is torchattacks' (x ← x + α·sign(g); δ ← clip(x − x₀, −ε, ε); x ← clip(x₀ + δ, 0, 1)) so the two agree
to float precision.
"""

from __future__ import annotations

import torch

from .losses import LogitsFn, LossFn, LossName, Objective, Tensor, classifier_objective, input_gradient
from .seeding import ImageGenerators

Random = torch.Generator | ImageGenerators | None


def project_linf(x0: Tensor, x: Tensor, eps: float) -> Tensor:
    """Nearest point of the L∞ ball of radius eps around x0 that is also in [0, 1]."""
    return (x0 + (x - x0).clamp(-eps, eps)).clamp(0.0, 1.0)


def _objective(model: LogitsFn, loss: LossName | LossFn, objective: Objective | None) -> Objective:
    return objective if objective is not None else classifier_objective(model, loss)


def fgsm(
    model: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    loss: LossName | LossFn = "ce",
    objective: Objective | None = None,
) -> Tensor:
    """Fast gradient sign method: one step of size eps along sign(∇ loss), clipped to [0, 1]."""
    x = x.detach()
    if eps == 0:
        return x.clone()
    grad, _, _ = input_gradient(_objective(model, loss, objective), x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0)


def uniform_noise(x: Tensor, eps: float, generator: Random = None) -> Tensor:
    """Uniform noise in the L∞ ball: the control every gradient attack must beat."""
    if isinstance(generator, ImageGenerators):
        unit = generator.rand(x.shape, x.dtype, x.device)
    else:
        device = generator.device if generator is not None else x.device
        unit = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    noise = unit * 2 - 1
    return (x.detach() + eps * noise).clamp(0.0, 1.0)


def pgd(
    model: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = False,
    *,
    restarts: int = 1,
    keep_best: bool = False,
    loss: LossName | LossFn = "ce",
    objective: Objective | None = None,
    generator: Random = None,
) -> Tensor:
    """Projected gradient ascent in the L∞ ball (Madry et al. 2018).

    With `keep_best`, each example keeps the iterate of highest loss seen (misclassified iterates rank
    above correctly classified ones); across `restarts` (each from a fresh random start when
    `random_start`, otherwise restarts are pointless and rejected) an example keeps its best run.
    Without `keep_best` and with one restart it returns the final iterate, as torchattacks does.
    """
    if restarts < 1:
        raise ValueError("restarts must be >= 1")
    if restarts > 1 and not random_start:
        raise ValueError("restarts without random_start repeat the same deterministic run")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    obj = _objective(model, loss, objective)
    best = x.clone()
    best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
    for _ in range(restarts):
        adv = uniform_noise(x, eps, generator) if random_start else x.clone()
        for _ in range(steps):
            grad, loss_val, logits = input_gradient(obj, adv, y)
            if keep_best or restarts > 1:
                best, best_score = _keep_better(best, best_score, adv, _score(loss_val, logits, y))
            adv = adv + step_size * grad.sign()
            adv = (x + (adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)
        if not (keep_best or restarts > 1):
            return adv
        with torch.no_grad():
            loss_val, logits = obj(adv, y)
        best, best_score = _keep_better(best, best_score, adv, _score(loss_val, logits, y))
    return best


def _score(loss: Tensor, logits: Tensor, y: Tensor) -> Tensor:
    """Rank iterates: any misclassified one beats any correctly classified one, then higher loss wins."""
    wrong = (logits.argmax(1) != y).to(loss.dtype)
    return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).atan() + 4.0 * wrong


def _keep_better(best: Tensor, best_score: Tensor, cand: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    better = score > best_score
    mask = better.view(-1, *([1] * (cand.dim() - 1)))
    return torch.where(mask, cand, best), torch.where(better, score, best_score)
