"""Expectation over Transformation (Athalye et al. 2018): average an objective over random draws.

For a randomised defence the gradient of one forward pass is a noisy sample; averaging the loss over
`samples` draws averages the gradients. SOAP's purifier is deterministic, so EOT with one sample is
exact for it; the wrapper is here for randomised variants (e.g. noisy inputs) and is tested on one.
"""

from __future__ import annotations

import torch

from models.attacks.losses import Objective, Tensor


def eot(objective: Objective, samples: int) -> Objective:
    """Objective whose loss and logits are means over `samples` independent evaluations."""
    if samples < 1:
        raise ValueError("EOT needs at least one sample")

    def averaged(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses, logits = zip(*(objective(x, y) for _ in range(samples)), strict=True)
        return torch.stack(losses).mean(0), torch.stack(logits).mean(0)

    return averaged
