"""The defended classifier (min-aux purification, then the network) as an `nn.Module`, for attack libraries.

torchattacks (AutoAttack, APGD, APGDT, FAB, Square) and foolbox attack any module that maps pixels in [0, 1]
to logits. `models.purify` has no gradient, so the module's backward is a choice (`Backward`):

- `bpda`: identity backward through the real purifier (Athalye et al. 2018);
- `bpda-traj`: identity backward, with the gradient of the logits averaged over the purification iterates
  x_1..x_T at the ε min-aux chose (Croce et al. 2022). A library applies its own loss to the returned logits,
  so here the logits (not the losses, as in `bpda_trajectory_objective`) are averaged in the backward pass;
- `full`: the gradient through Algorithm 2 unrolled at the chosen ε (`unrolled_purification`, sign straight-through).

Whatever the backward, the forward value is the real pipeline's logits, so a library's success checks are right.
The pieces are those of `adaptive` (one definition of each).
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import nn

from models import PurifierConfig, SoapNetwork, purify
from models.attacks.losses import Tensor

from .adaptive import SignBackward, _straight_through, chosen_epsilon, unrolled_purification


class Backward(StrEnum):
    BPDA = "bpda"
    TRAJECTORY = "bpda-traj"
    FULL = "full"


class DefendedClassifier(nn.Module):
    """x ↦ network(min-aux purify(x)), differentiable by `backward`. Its parameters are the network's (frozen)."""

    def __init__(
        self,
        network: SoapNetwork,
        purifier: PurifierConfig,
        backward: Backward | str = Backward.TRAJECTORY,
        sign_backward: SignBackward = "tanh",
    ):
        super().__init__()
        self.network = network
        self.purifier = purifier
        self.backward = Backward(backward)
        self.sign_backward: SignBackward = sign_backward
        self.queries = 0  # images classified so far (a gradient-free attack's query count)

    def forward(self, x: Tensor) -> Tensor:
        self.network.eval()
        self.queries += x.shape[0]
        if self.backward is Backward.BPDA:
            images = purify(self.network, x, self.purifier).images
            return self.network(_straight_through(x, images))
        eps = chosen_epsilon(self.network, x, self.purifier)
        if self.backward is Backward.FULL:
            iterates = unrolled_purification(
                self.network, x, eps, self.purifier, differentiable=True, sign_backward=self.sign_backward
            )
            return self.network(iterates[-1])
        iterates = unrolled_purification(self.network, x.detach(), eps, self.purifier)[1:]
        logits = [self.network(_straight_through(x, it)) for it in iterates]
        mean = torch.stack(logits).mean(0)
        return logits[-1].detach() + mean - mean.detach()

    def train(self, mode: bool = True) -> DefendedClassifier:
        """Always evaluates (BatchNorm/dropout must not couple examples); libraries may call train()/eval()."""
        super().train(False)
        return self
