"""SmoothAdv (Salman et al., NeurIPS 2019): L2 PGD on the soft smoothed classifier.

The hard smoothed classifier has no useful gradient, so the attack maximises the loss of the soft one,
−log( (1/m) Σ_i softmax(f(clamp(x' + δ_i)))_c ), a Monte-Carlo estimate with m noise draws per step
(fresh draws each step), where c is the class to move away from. Steps are normalised-gradient L2 steps,
projected onto the ε-ball around x and onto [0, 1].
"""

from __future__ import annotations

import torch

from models.attacks.losses import LogitsFn, Tensor

from .l2 import _expand, _norms


def soft_smoothed_log_prob(
    base: LogitsFn, x: Tensor, c: Tensor, sigma: float, samples: int, generator: torch.Generator, clamp: bool = True
) -> Tensor:
    """log of the Monte-Carlo soft smoothed probability of class c[i] at x[i]: shape [B], differentiable in x."""
    b = x.shape[0]
    noise = torch.randn((samples, *x.shape), generator=generator).to(x.device, x.dtype)
    noisy = (x.unsqueeze(0) + sigma * noise).flatten(0, 1)
    if clamp:
        noisy = noisy.clamp(0.0, 1.0)
    probs = base(noisy).softmax(1).view(samples, b, -1).mean(0)
    return probs.gather(1, c.view(-1, 1)).squeeze(1).clamp_min(1e-12).log()


def smoothadv_pgd(
    base: LogitsFn,
    x: Tensor,
    c: Tensor,
    eps: Tensor,
    sigma: float,
    *,
    steps: int = 20,
    samples: int = 32,
    generator: torch.Generator,
    clamp: bool = True,
) -> Tensor:
    """Adversarial images within L2 distance eps[i] of x[i] (per-image budgets) that push the smoothed
    classifier away from class c[i]; step size 2.5·ε/steps as Madry et al. and Salman et al."""
    x0 = x.detach()
    step = _expand(2.5 * eps / steps, x0)
    adv = x0.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = -soft_smoothed_log_prob(base, adv, c, sigma, samples, generator, clamp).sum()
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad / _expand(_norms(grad).clamp_min(1e-12), grad)
            delta = adv - x0
            scale = (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
            adv = (x0 + delta * _expand(scale, delta)).clamp(0.0, 1.0)
    return adv.detach()
