"""The objectives a training step minimises: SOAP's joint loss (paper Eq. 2) and the paper's baselines.

- soap:    L_cls + α·L_aux of the network's own self-supervised task (models.training_losses); with
           `consistency_lambda` > 0 (DR networks only) on m noisy copies per image, + the consistency term of
           Jeong & Shin (NeurIPS 2020, models.tasks.consistency_loss); with `smoothmix_eta` > 0 (DR networks only)
           on m noisy copies, + SmoothMix's mixup term (Jeong et al., NeurIPS 2021, training.smoothmix).
- vanilla: cross-entropy only (no defence).
- fgsm-at: ½·CE(x) + ½·CE(FGSM(x)) (Goodfellow et al.'s mix of clean and adversarial examples).
- pgd-at:  CE(PGD(x)) with a random start (Madry et al.); MNIST ε 0.3, 40 steps of 0.01; CIFAR ε 8/255, 7 of 2/255.

Adversarial examples are generated with the network in eval mode (BatchNorm statistics and dropout must not
see the attack's probing forwards) and with the attacks of `training.attacks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import SoapNetwork, training_losses
from models.tasks import TRAINING_NOISE_STD, reconstruction_consistency_training, reconstruction_training

from .presets import TrainConfig
from .smoothmix import SmoothMixSettings, reconstruction_smoothmix_training


@dataclass
class StepLosses:
    """Batch-mean losses of one step; `logits` are on the images whose accuracy is reported."""

    total: torch.Tensor
    cls_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor
    consistency_loss: torch.Tensor | None = None  # the weighted consistency term, when trained
    smoothmix_loss: torch.Tensor | None = None  # the weighted SmoothMix mixup term, when trained


def trains_auxiliary(recipe: str) -> bool:
    """Whether the recipe's objective includes the auxiliary loss (only soap's does): recorded in the checkpoint as
    `aux_head_trained`, without which the service does not purify."""
    return recipe == "soap"


def adversarial_inputs(model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The attack of the recipe on the current weights (eval mode); `x` itself for soap/vanilla."""
    if config.recipe not in ("fgsm-at", "pgd-at"):
        return x
    from .attacks import fgsm, pgd

    was_training = model.training
    model.eval()
    try:
        if config.recipe == "fgsm-at":
            x_adv = fgsm(model, x, y, config.attack_eps)
        else:
            x_adv = pgd(model, x, y, config.attack_eps, config.attack_step_size, config.attack_steps, random_start=True)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return x_adv.detach()


def step_losses(
    model: SoapNetwork, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, config: TrainConfig, epoch: int = 0
) -> StepLosses:
    """The recipe's loss on a batch (`x_adv` from `adversarial_inputs`) in `epoch` (0-based: warm-ups)."""
    zero = x.new_zeros(())
    if config.recipe == "soap" and (config.consistency or config.smoothmix) and model.aux_task != "reconstruction":
        raise ValueError(f"consistency and SmoothMix are implemented for the DR recipe, not {model.aux_task!r}")
    noise_std = config.noise_std if config.noise_std is not None else TRAINING_NOISE_STD[model.aux_task]
    if config.recipe == "soap" and config.smoothmix:
        settings = SmoothMixSettings(
            copies=config.smoothmix_copies,
            steps=config.smoothmix_steps,
            step_size=config.smoothmix_step_size,
            mix_step=config.smoothmix_mix_step,
            eta=config.smoothmix_eta,
            ramp=config.smoothmix_ramp(epoch),
            clamp=config.noise_clamp,
        )
        mixed = reconstruction_smoothmix_training(model, x, y, noise_std, settings)
        return StepLosses(
            mixed.cls_loss + config.alpha * mixed.aux_loss + mixed.mixup_loss,
            mixed.cls_loss,
            mixed.aux_loss,
            mixed.logits,
            smoothmix_loss=mixed.mixup_loss,
        )
    if config.recipe == "soap" and config.consistency:
        losses = reconstruction_consistency_training(
            model,
            x,
            y,
            config.consistency_copies,
            config.consistency_lambda,
            config.consistency_eta,
            noise_std,
            clamp=config.noise_clamp,
        )
        assert losses.consistency_loss is not None
        return StepLosses(
            losses.cls_loss + config.alpha * losses.aux_loss + losses.consistency_loss,
            losses.cls_loss,
            losses.aux_loss,
            losses.logits,
            losses.consistency_loss,
        )
    if config.recipe == "soap":
        if model.aux_task == "reconstruction":
            losses = reconstruction_training(model, x, y, noise_std, clamp=config.noise_clamp)
        elif config.noise_clamp:
            losses = training_losses(model, x, y, noise_std)
        else:
            raise ValueError(f"--no-noise-clamp applies to the DR recipe, not {model.aux_task!r}")
        return StepLosses(
            losses.cls_loss + config.alpha * losses.aux_loss, losses.cls_loss, losses.aux_loss, losses.logits
        )
    if config.recipe == "vanilla":
        logits = model(x)
        cls = F.cross_entropy(logits, y)
        return StepLosses(cls, cls, zero, logits)
    if config.recipe == "fgsm-at":
        logits = model(torch.cat([x, x_adv]))
        cls = 0.5 * F.cross_entropy(logits[: len(x)], y) + 0.5 * F.cross_entropy(logits[len(x) :], y)
        return StepLosses(cls, cls, zero, logits[len(x) :])
    if config.recipe == "pgd-at":
        logits = model(x_adv)
        cls = F.cross_entropy(logits, y)
        return StepLosses(cls, cls, zero, logits)
    raise ValueError(f"unknown recipe {config.recipe!r}")
