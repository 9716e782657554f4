"""Accuracy with Wilson 95 % intervals, and attack success rates, from per-example correctness."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


class Accuracy(BaseModel):
    """An accuracy (or any rate) with its Wilson 95 % interval: every cell of every table, and the record each one is
    stored as in results.json and certify.json (one definition, validated when a stored file is read back)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    correct: int
    n: int
    accuracy: float
    ci95: tuple[float, float]
    success_rate: float | None = None  # fraction of clean-correct examples the attack turned wrong

    @classmethod
    def of(cls, correct: torch.Tensor, clean_correct: torch.Tensor | None = None) -> Accuracy:
        k, n = int(correct.sum()), int(correct.numel())
        success = None
        if clean_correct is not None and int(clean_correct.sum()) > 0:
            success = float((clean_correct & ~correct).sum()) / float(clean_correct.sum())
        return cls(correct=k, n=n, accuracy=k / n if n else 0.0, ci95=wilson_interval(k, n), success_rate=success)

    def text(self) -> str:
        lo, hi = self.ci95
        return f"{100 * self.accuracy:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"
