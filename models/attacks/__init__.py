"""Gradient attacks on a classifier that both the evaluation (training.attacks builds the rest on them) and the
service's demo page (POST /v1/attack) use: L∞ FGSM/PGD and the losses and objectives they ascend.

Pure functions of (model, images, labels, settings); inputs and parameters are never modified.
"""

from .linf import fgsm, pgd, project_linf, uniform_noise
from .losses import Objective, classifier_objective, cross_entropy, dlr, margin

__all__ = [
    "fgsm",
    "pgd",
    "project_linf",
    "uniform_noise",
    "Objective",
    "classifier_objective",
    "cross_entropy",
    "dlr",
    "margin",
]
