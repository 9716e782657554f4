"""Minimal-perturbation L2 attacks: Carlini–Wagner L2 and DeepFool, projected onto the L2 ball.

Both search for the smallest perturbation that changes the prediction. As in the paper (§4.1), a result
whose perturbation exceeds the budget ε is projected onto the ε-ball (then clipped to [0, 1]); examples
the attack could not fool are returned unperturbed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.attacks.losses import LogitsFn, Tensor, margin


def _norms(d: Tensor) -> Tensor:
    return d.flatten(1).norm(dim=1)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def project_l2(x0: Tensor, x: Tensor, eps: float) -> Tensor:
    """Scale x − x0 down to L2 norm ≤ eps, then clip to [0, 1] (clipping only shrinks the norm)."""
    delta = x - x0
    scale = (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x0 + delta * _expand(scale, delta)).clamp(0.0, 1.0)


def cw_l2(
    model: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps: float | None = None,
    *,
    binary_search_steps: int = 5,
    steps: int = 100,
    learning_rate: float = 0.01,
    initial_const: float = 1e-3,
    confidence: float = 0.0,
    abort_early: bool = True,
) -> Tensor:
    """Carlini & Wagner (2017) L2 attack, batched, then projected onto the L2 ball of radius `eps`.

    Minimises ‖x' − x‖² + c·max(z_y − max_{i≠y} z_i, −κ) over x' = (tanh(w) + 1)/2 with Adam; a
    per-example binary search over c (×10 until the first success) keeps the smallest successful
    perturbation. `eps=None` returns the minimal adversarials unprojected.
    """
    x = x.detach()
    if eps is not None and eps == 0:
        return x.clone()
    b = x.shape[0]
    device = x.device
    w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    lower = torch.zeros(b, device=device)
    upper = torch.full((b,), math.inf, device=device)
    const = torch.full((b,), initial_const, device=device)
    best = x.clone()
    best_norm = torch.full((b,), math.inf, device=device)
    for _ in range(binary_search_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=learning_rate)
        found = torch.zeros(b, dtype=torch.bool, device=device)
        previous = math.inf
        for step in range(steps):
            with torch.enable_grad():
                adv = (torch.tanh(w) + 1) / 2
                dist = (adv - x).flatten(1).pow(2).sum(1)
                logits = model(adv)
                gap = -margin(logits, y)  # z_y − max_{i≠y} z_i
                loss = dist + const * (gap + confidence).clamp_min(0)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
            opt.step()
            with torch.no_grad():
                success = gap < -confidence if confidence > 0 else logits.argmax(1) != y
                norm = dist.sqrt()
                improved = success & (norm < best_norm)
                best = torch.where(_expand(improved, x), adv.detach(), best)
                best_norm = torch.where(improved, norm.detach(), best_norm)
                found |= success
            if abort_early and step % max(steps // 10, 1) == 0:
                total = loss.sum().item()
                if total > previous * 0.9999:
                    break
                previous = total
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
    return best if eps is None else project_l2(x, best, eps)


def deepfool(
    model: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps: float | None = None,
    *,
    steps: int = 50,
    overshoot: float = 0.02,
    num_classes: int | None = None,
) -> Tensor:
    """DeepFool L2 (Moosavi-Dezfooli et al. 2016) over all classes, batched, projected onto the ε-ball.

    Each step linearises f_k − f_y for every class k ≠ y, moves the still-correct examples to the
    nearest linearised boundary (plus 1e-4), and sets x' = clip(x + (1 + overshoot)·Σ r, 0, 1).
    """
    x = x.detach()
    if eps is not None and eps == 0:
        return x.clone()
    with torch.no_grad():
        c = num_classes or model(x[:1]).shape[1]
    total = torch.zeros_like(x)
    adv = x.clone()
    others = list(range(c))
    for _ in range(steps):
        with torch.enable_grad():
            a = adv.detach().requires_grad_(True)
            logits = model(a)
            active = logits.argmax(1) == y
            if not active.any():
                break
            true = logits.gather(1, y[:, None]).squeeze(1)
            diffs, grads = [], []
            for k in others:
                diff = logits[:, k] - true
                (g,) = torch.autograd.grad(diff.sum(), a, retain_graph=k != others[-1])
                diffs.append(diff.detach())
                grads.append(g)
        diffs_t = torch.stack(diffs, 1)  # [B, C]
        grads_t = torch.stack(grads, 1)  # [B, C, ...]
        gnorm = grads_t.flatten(2).norm(dim=2)  # [B, C]
        distance = diffs_t.abs() / (gnorm + 1e-8)
        distance = distance.masked_fill(F.one_hot(y, c).bool(), math.inf)
        k = distance.argmin(1)
        idx = torch.arange(x.shape[0], device=x.device)
        dist_k, g_k, n_k = distance[idx, k], grads_t[idx, k], gnorm[idx, k]
        step = _expand((dist_k + 1e-4) / (n_k + 1e-8), x) * g_k
        total = total + torch.where(_expand(active, x), step, torch.zeros_like(step))
        adv = (x + (1 + overshoot) * total).clamp(0.0, 1.0)
    # Examples that never flipped are returned unperturbed (they are not adversarial).
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    adv = torch.where(_expand(fooled, x), adv, x)
    return adv if eps is None else project_l2(x, adv, eps)
