"""Accuracy with Wilson 95 % intervals, and attack success rates, from per-example correctness."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from scipy.stats import binomtest


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927; scipy's); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence, method="wilson")
    lo = 0.0 if k == 0 else max(0.0, float(ci.low))  # exact at the ends (no rounding residue)
    hi = 1.0 if k == n else min(1.0, float(ci.high))
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


def worst_case(clean: list[torch.Tensor], attacked: list[torch.Tensor]) -> Accuracy:
    """Per example, correct only if right in every `clean` outcome and under every attack, over the first m examples
    all of them saw (an attack may have run on fewer); success rates against the clean-correct ones."""
    m = min(len(mask) for mask in clean + attacked)
    clean_correct = torch.stack([mask[:m] for mask in clean]).all(0)
    survived = torch.stack([clean_correct, *(mask[:m] for mask in attacked)]).all(0)
    return Accuracy.of(survived, clean_correct)
