"""SmoothMix (Jeong, Park, Kim & Shin, NeurIPS 2021) on a DR network: mixup between an input and its adversary on the
smoothed classifier, trained to be as confident as the mix (github.com/jh-jeong/smoothmix, `code/train.py`; our own
code, same algorithm).

For each image x with m noise draws δ_1..δ_m (shared by the adversary and the loss):
1. The adversary ascends the cross-entropy of the smoothed soft classifier F(x') = (1/m) Σ_i softmax(f(x' + δ_i)) in
   normalised L2 steps of size `step_size` for `steps` steps; x_start is the point after `mix_step` steps (projected
   onto the L2 ball of radius step_size · mix_step · ramp, so 0 steps: the clean image), x_end the last point.
2. A mix x_mix = (1 − λ)·x_start + λ·x_end with λ ~ U[0, ½] per image, and a target that mixes F(x) with the uniform
   distribution by the same λ: confidence should fall off only as far as the mix moves towards the adversary.
3. The loss: the DR loss on the m noisy copies of x (cross-entropy + α·MSE of the reconstruction, in `step_losses`)
   + η·ramp · KL(target ‖ f(x_mix + δ_i)), averaged over copies, counted only for images F classifies correctly.

The base classifier is ours: f(clamp(x + δ, 0, 1)) (or f(x + δ) with `--no-noise-clamp`), the same noise as training
and certification (models.smoothing), so the adversary attacks the classifier that is certified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import SoapNetwork


@dataclass(frozen=True)
class SmoothMixSettings:
    """One step's SmoothMix settings; `ramp` in (0, 1] is the warm-up (scales η and the mix start's radius)."""

    copies: int
    steps: int
    step_size: float
    mix_step: int
    eta: float
    ramp: float = 1.0
    clamp: bool = True  # the noisy copies are clamp(x + δ, 0, 1); off: x + δ (the model's training noise)

    def __post_init__(self) -> None:
        if self.copies < 1 or self.steps < 1:
            raise ValueError(f"SmoothMix needs copies and steps >= 1, got {self.copies} and {self.steps}")
        if not 0 <= self.mix_step < self.steps:
            raise ValueError(f"SmoothMix's mix step must be in [0, steps), got {self.mix_step} of {self.steps}")


@dataclass
class SmoothMixLosses:
    """Batch-mean losses of a SmoothMix step (the weighted mixup term separately) and the first copy's logits."""

    cls_loss: torch.Tensor
    aux_loss: torch.Tensor
    mixup_loss: torch.Tensor
    logits: torch.Tensor


def _noisy_copies(x: torch.Tensor, noises: torch.Tensor, clamp: bool) -> torch.Tensor:
    """[m·B, ...]: clamp(x + δ_i, 0, 1) (or x + δ_i) for each of the m noise draws in `noises` [m, B, ...]."""
    noisy = x.unsqueeze(0) + noises
    return (noisy.clamp(0.0, 1.0) if clamp else noisy).flatten(0, 1)


def _smoothed_probs(model: SoapNetwork, x: torch.Tensor, noises: torch.Tensor, clamp: bool) -> torch.Tensor:
    """F(x): the mean over the m noise draws of the base classifier's softmax, [B, K]."""
    logits = model(_noisy_copies(x, noises, clamp))
    return logits.softmax(dim=1).view(noises.shape[0], x.shape[0], -1).mean(dim=0)


def _l2_project(x: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Onto the L2 ball of `radius` around `center` (per image), then into [0, 1]."""
    delta = (x - center).flatten(1)
    norms = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    delta = delta * (radius / norms).clamp(max=1.0)
    return (center + delta.view_as(x)).clamp(0.0, 1.0)


def smoothmix_adversary(
    model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor, settings: SmoothMixSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_start, x_end) of the adversary on the smoothed soft classifier (module docstring, step 1); detached.

    Gradients are taken with respect to the input only; the network runs in eval mode, as for every attack.
    """
    was_training = model.training
    model.eval()
    try:
        adv, start = x.detach(), x.detach()
        for i in range(settings.steps):
            if i == settings.mix_step:
                start = adv
            adv = adv.clone().requires_grad_(True)
            probs = _smoothed_probs(model, adv, noises, settings.clamp)
            loss = F.nll_loss(probs.clamp_min(1e-20).log(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [adv])
            grad = grad / (grad.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1))) + 1e-8)
            adv = (adv + settings.step_size * grad).clamp(0.0, 1.0).detach()
    finally:
        model.train(was_training)
    start = _l2_project(start, x, settings.step_size * settings.mix_step * settings.ramp)
    return start.detach(), adv


def reconstruction_smoothmix_training(
    model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, noise_std: float, settings: SmoothMixSettings
) -> SmoothMixLosses:
    """The DR losses on m noisy copies of x and SmoothMix's weighted mixup term (module docstring)."""
    m, b = settings.copies, x.shape[0]
    noises = noise_std * torch.randn(m, *x.shape, device=x.device, dtype=x.dtype)
    start, end = smoothmix_adversary(model, x, y, noises, settings)

    z = model.encode(_noisy_copies(x, noises, settings.clamp))
    logits = model.classify(z)
    cls = F.cross_entropy(logits, y.repeat(m))
    aux = F.mse_loss(model.auxiliary(z), x.repeat(m, *([1] * (x.dim() - 1))))
    clean_probs = logits.softmax(dim=1).view(m, b, -1).mean(dim=0)  # F(x), not detached (as the authors' code)

    lam = torch.rand(b, device=x.device, dtype=x.dtype) / 2
    lam_img = lam.view(-1, *([1] * (x.dim() - 1)))
    mixed = (1 - lam_img) * start + lam_img * end
    uniform = torch.full_like(clean_probs, 1.0 / clean_probs.shape[1])
    target = (1 - lam[:, None]) * clean_probs + lam[:, None] * uniform
    log_mixed = model(_noisy_copies(mixed, noises, settings.clamp)).log_softmax(dim=1)
    kl = F.kl_div(log_mixed, target.repeat(m, 1), reduction="none").sum(dim=1)
    correct = (clean_probs.argmax(dim=1) == y).to(x.dtype).repeat(m)
    mixup = settings.eta * settings.ramp * (correct * kl).mean()
    return SmoothMixLosses(cls, aux, mixup, logits[:b])
