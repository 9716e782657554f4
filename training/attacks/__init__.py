"""Attacks as pure functions of (model, images, labels, settings). Batched; CPU and CUDA.

`model` is any logits function of pixels in [0, 1] (a SoapNetwork in eval mode, or a substitute).
Gradient attacks also accept an `objective` (models.attacks.losses.Objective) in place of the model's own loss: that
is how the adaptive attacks of `adaptive` drive PGD, APGD and FGSM through the purifier. No attack
modifies its inputs or the model's parameters.

Modules: l2 (CW-L2, DeepFool), aux_aware (paper Eq. 9), apgd (APGD-CE/DLR), adaptive (BPDA, trajectory BPDA,
full gradient), eot, blackbox (Papernot substitute), settings (paper defaults per dataset). FGSM, PGD, uniform
noise and the losses live in models.attacks (linf, losses), which the service's demo uses too; they are re-exported
here.
"""

from models.attacks.linf import fgsm, pgd, project_linf, uniform_noise
from models.attacks.losses import Objective, classifier_objective, cross_entropy, dlr, margin

from .adaptive import (
    bpda_objective,
    bpda_trajectory_objective,
    defended_logits,
    full_gradient_objective,
    unrolled_purification,
)
from .apgd import apgd
from .aux_aware import BETA_SCALE, aux_aware_objective, aux_aware_pgd
from .blackbox import SubstituteConfig, substitute_fgsm, train_substitute
from .eot import eot
from .l2 import cw_l2, deepfool, project_l2
from .settings import PAPER_SETTINGS, AttackSettings, paper_settings

__all__ = [
    "fgsm",
    "pgd",
    "project_linf",
    "uniform_noise",
    "cw_l2",
    "deepfool",
    "project_l2",
    "apgd",
    "aux_aware_pgd",
    "aux_aware_objective",
    "BETA_SCALE",
    "bpda_objective",
    "bpda_trajectory_objective",
    "full_gradient_objective",
    "defended_logits",
    "unrolled_purification",
    "eot",
    "train_substitute",
    "substitute_fgsm",
    "SubstituteConfig",
    "Objective",
    "classifier_objective",
    "cross_entropy",
    "dlr",
    "margin",
    "AttackSettings",
    "PAPER_SETTINGS",
    "paper_settings",
]
