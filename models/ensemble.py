"""Ensembles of SOAP networks as one SOAP network (Horváth et al., ICLR 2022: "Boosting randomized smoothing with
variance reduced classifiers").

Under randomized smoothing the base classifier's vote on x + δ varies with δ; averaging k independently trained
members' logits lowers that variance, so the top class wins more of the n noise draws, p_A's lower bound rises and so
does the certified radius. Horváth et al.'s default aggregation, the mean of the members' logits, is used here.

The ensemble is itself a `SoapNetwork`, so everything that takes one (checkpoints, certification, purification, the
service) takes it unchanged:
- encoder f: the members' encoders side by side, z = [f_1(x), ..., f_k(x)];
- classifier g: one linear layer [W_1 ... W_k] / k with bias mean(b_i), which is exactly the mean of the members'
  logits g_i(f_i(x));
- auxiliary head h: the mean of the members' heads, each on its own slice of z (for DR members, the mean
  reconstruction, which purification descends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .networks import SoapNetwork


class ConcatEncoders(nn.Module):
    """k encoders on the same input, their representations concatenated along the feature axis."""

    def __init__(self, encoders: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(x) for member in self.members], dim=1)


class MeanOfHeads(nn.Module):
    """The mean of k heads, head i applied to slice i (of `widths[i]` features) of the concatenated representation."""

    def __init__(self, heads: Sequence[nn.Module], widths: Sequence[int]) -> None:
        super().__init__()
        if len(heads) != len(widths):
            raise ValueError(f"need one width per head: {len(widths)} widths for {len(heads)} heads")
        self.members = nn.ModuleList(heads)
        self.widths = [int(w) for w in widths]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.split(self.widths, dim=1)
        return torch.stack([head(part) for head, part in zip(self.members, parts, strict=True)]).mean(0)


def ensemble(members: Sequence[SoapNetwork]) -> SoapNetwork:
    """One network whose logits are the mean of the members' logits (weights shared with the members, not copied).

    Members must agree on what they read and predict: input shape, normalisation, classes and auxiliary task."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = members[0]
    for i, member in enumerate(members[1:], start=1):
        same = (
            member.input_shape == first.input_shape
            and member.num_classes == first.num_classes
            and member.aux_task == first.aux_task
            and torch.equal(member.mean, first.mean)
            and torch.equal(member.std, first.std)
        )
        if not same:
            raise ValueError(
                f"member {i} differs from member 0 in input shape, classes, auxiliary task or normalisation"
            )
    widths = [member.classifier.in_features for member in members]
    classifier = nn.Linear(sum(widths), first.num_classes)
    with torch.no_grad():
        classifier.weight.copy_(torch.cat([m.classifier.weight for m in members], dim=1) / len(members))
        classifier.bias.copy_(torch.stack([m.classifier.bias for m in members]).mean(0))
    heads = [m.aux_head for m in members]
    aux_head = None if any(h is None for h in heads) else MeanOfHeads(heads, widths)  # type: ignore[arg-type]
    return SoapNetwork(
        ConcatEncoders([m.encoder for m in members]),
        classifier,
        aux_head,
        first.aux_task,
        first.input_shape,
        first.mean.flatten().tolist(),
        first.std.flatten().tolist(),
    )


def ensemble_builder(member: Callable[..., SoapNetwork], size: int) -> Callable[..., SoapNetwork]:
    """A registry builder: `size` randomly initialised members of `member`'s architecture as one ensemble."""

    def build(num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> SoapNetwork:
        return ensemble([member(num_classes, input_shape, mean, std) for _ in range(size)])

    build.__name__ = f"{member.__name__}_x{size}"
    return build
