"""Detector-aware objective: fool the defended classifier while keeping the `suspicious` flag down.

The service flags an input whose auxiliary loss (before purification) exceeds a calibrated quantile of clean
images. A user who acts on the flag is fooled only by images that are misclassified and not flagged. This
objective adds to any attack objective a penalty on the auxiliary loss above a margin under the threshold,
and reports a flagged image as not fooled (its true-class logit is lifted), so that the attacks' best-iterate
tracking keeps iterates that are both misclassified and unflagged.
"""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from models import SoapNetwork, aux_loss
from models.attacks.losses import Objective, Tensor


def evasion_objective(
    base: Objective, model: SoapNetwork, threshold: float, weight: float = 10.0, margin: float = 0.9
) -> Objective:
    """base loss − weight·relu(L_aux(x)/(margin·threshold) − 1); flagged images (L_aux(x) > threshold) count as
    correctly classified in the returned logits."""

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = base(x, y)
        aux = aux_loss(model, x)
        penalty = torch.relu(aux / (margin * threshold) - 1.0)
        flagged = (aux > threshold).detach()
        lift = torch.where(flagged, logits.detach().abs().amax(1) * 2 + 1, torch.zeros_like(aux))
        shown = logits + lift[:, None] * one_hot(y, logits.shape[1]).to(logits.dtype)
        return loss - weight * penalty, shown

    return objective
