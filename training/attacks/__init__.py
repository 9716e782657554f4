"""Attacks as pure functions of (model, images, labels, settings). Batched; CPU and CUDA.

`model` is any logits function of pixels in [0, 1] (a SoapNetwork, or an adaptive wrapper from
`adaptive`), in eval mode. No attack modifies its inputs or the model's parameters.
"""

from .linf import fgsm, pgd, project_linf, uniform_noise
from .losses import classifier_objective, cross_entropy, dlr, margin

__all__ = ["fgsm", "pgd", "project_linf", "uniform_noise", "classifier_objective", "cross_entropy", "dlr", "margin"]
