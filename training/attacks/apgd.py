"""Auto-PGD (Croce & Hein, ICML 2020), L∞, with the CE or DLR loss, driven by any objective.

Step-size free: starts at 2ε, momentum 0.75, and halves an example's step size at checkpoints where
fewer than ρ of the steps since the last checkpoint increased its loss, or where neither step size nor
best loss changed. Each example keeps its highest-loss iterate (misclassified iterates first). Pass an
adaptive objective (adaptive.py) to attack purify-then-classify end to end.
"""

from __future__ import annotations

import math

import torch

from models.attacks.linf import Random, _keep_better, _score, uniform_noise
from models.attacks.losses import LogitsFn, LossFn, LossName, Objective, Tensor, classifier_objective, input_gradient


def _checkpoints(steps: int) -> list[int]:
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p if q <= 1})[1:]


def apgd(
    model: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 100,
    *,
    loss: LossName | LossFn = "ce",
    objective: Objective | None = None,
    restarts: int = 1,
    random_start: bool = True,
    rho: float = 0.75,
    momentum: float = 0.75,
    generator: Random = None,
) -> Tensor:
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    obj = objective if objective is not None else classifier_objective(model, loss)
    shape = (-1,) + (1,) * (x.dim() - 1)
    best_adv = x.clone()
    best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
    checkpoints = set(_checkpoints(steps))
    for _ in range(restarts):
        x_k = uniform_noise(x, eps, generator) if random_start else x.clone()
        step = torch.full((x.shape[0],), 2.0 * eps, device=x.device)
        grad, loss_k, logits = input_gradient(obj, x_k, y)
        best_adv, best_score = _keep_better(best_adv, best_score, x_k, _score(loss_k, logits, y))
        run_best_loss = loss_k.clone()
        run_best_x, run_best_grad = x_k.clone(), grad.clone()
        x_prev = x_k.clone()
        increases = torch.zeros_like(step)
        last_check, step_at_check, best_at_check = 0, step.clone(), run_best_loss.clone()
        for k in range(steps):
            eta = step.view(shape)
            z = (x + (x_k + eta * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
            a = momentum if k > 0 else 1.0
            x_next = x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev)
            x_next = (x + (x_next - x).clamp(-eps, eps)).clamp(0, 1)
            x_prev, x_k = x_k, x_next
            grad, loss_new, logits = input_gradient(obj, x_k, y)
            best_adv, best_score = _keep_better(best_adv, best_score, x_k, _score(loss_new, logits, y))
            increases += (loss_new > loss_k).float()
            loss_k = loss_new
            improved = loss_new > run_best_loss
            run_best_x = torch.where(improved.view(shape), x_k, run_best_x)
            run_best_grad = torch.where(improved.view(shape), grad, run_best_grad)
            run_best_loss = torch.where(improved, loss_new, run_best_loss)
            if k + 1 in checkpoints:
                span = k + 1 - last_check
                few_increases = increases < rho * span
                stalled = (step == step_at_check) & (run_best_loss == best_at_check)
                halve = few_increases | stalled
                step_at_check, best_at_check = step.clone(), run_best_loss.clone()
                step = torch.where(halve, step / 2, step)
                # Restart the halved examples from their best point.
                x_k = torch.where(halve.view(shape), run_best_x, x_k)
                grad = torch.where(halve.view(shape), run_best_grad, grad)
                increases.zero_()
                last_check = k + 1
    return best_adv
