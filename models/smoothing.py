"""Randomized smoothing: certified L2 predictions (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I). If the top class has probability
at least p_A > 1/2, g is constant on the L2 ball of radius σ·Φ⁻¹(p_A) around x (Cohen et al., Theorem 1).
PREDICT and CERTIFY estimate this by Monte Carlo: PREDICT abstains unless a binomial test separates the
top two classes at level α; CERTIFY picks the class on n0 samples, then lower-bounds its probability on n
fresh samples with a one-sided Clopper–Pearson bound at level α and abstains when that bound is ≤ 1/2.

Base classifiers f (any callable from a batch of images to logits works):
- `noisy_classifier`: the network on the noisy input (our DR models are trained on exactly such inputs);
- `denoised_classifier`: the classifier on the DR head's reconstruction of the noisy input
  (denoised smoothing, Salman et al., NeurIPS 2020).

Clamping: by default the noisy input is clamped to [0, 1], as in DR training (`models.tasks`). The clamp is
part of the base classifier f'(u) = f(clamp(u, 0, 1)); the theorem holds for any base classifier, so the
certificate stays valid, and it is a radius in the unclamped input space, on the [0, 1] pixel scale.

Noise is drawn per image from its own generator (seeded per call), in pieces of at most `batch_size` rows,
so an image's answer depends only on its seed and the settings, never on the images it is batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy.stats import binomtest, norm

from .networks import SoapNetwork

BaseClassifier = Callable[[torch.Tensor], torch.Tensor]
"""A batch of images [B, C, H, W] -> logits (or any scores) [B, K]; the predicted class is the argmax."""

BASE_CLASSIFIERS = ("noisy", "denoised")


@dataclass(frozen=True)
class SmoothingConfig:
    """Settings of one certification; `batch_size` bounds the rows of one forward pass (memory)."""

    sigma: float
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    batch_size: int = 1_000
    clamp: bool = True

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.n0 < 1 or self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n0, n and batch_size must be >= 1, got {self.n0}, {self.n}, {self.batch_size}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one image. `label`/`radius` are None when it abstains."""

    label: int | None
    radius: float | None
    p_lower: float
    sigma: float
    samples: int  # forward passes spent: n0 + n

    @property
    def abstained(self) -> bool:
        return self.label is None


@dataclass(frozen=True)
class Prediction:
    """PREDICT's answer for one image: `label` None when the vote is not significant at level α."""

    label: int | None
    p_value: float
    samples: int

    @property
    def abstained(self) -> bool:
        return self.label is None


# ----------------------------------------------------------------------------- base classifiers


def noisy_classifier(model: SoapNetwork) -> BaseClassifier:
    """(a) The network itself on the noisy input."""
    return model


def denoised_classifier(model: SoapNetwork) -> BaseClassifier:
    """(b) Denoised smoothing: classify the DR head's reconstruction h(f(x + δ)) of the noisy input."""
    if model.aux_task != "reconstruction":
        raise ValueError(f"denoised smoothing needs a reconstruction head; this model's task is {model.aux_task!r}")

    def classify_reconstruction(x: torch.Tensor) -> torch.Tensor:
        return model(model.auxiliary(model.encode(x)))

    return classify_reconstruction


def base_classifier(model: SoapNetwork, kind: str) -> BaseClassifier:
    """The named base classifier of `BASE_CLASSIFIERS`."""
    if kind == "noisy":
        return noisy_classifier(model)
    if kind == "denoised":
        return denoised_classifier(model)
    raise ValueError(f"unknown base classifier {kind!r}; expected one of {BASE_CLASSIFIERS}")


# ----------------------------------------------------------------------------- sampling


def generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded `seed + i`: image i's noise does not depend on its batch-mates."""
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def noise_rows(m: int, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """The next m standard normal rows of an image's noise stream, the same however the rows are split into calls.

    torch's CPU normal sampler fills blocks of 16 values, so pieces whose size is not a multiple of 16 would make the
    stream depend on the piece sizes, i.e. on `batch_size`. Each row is drawn padded to a multiple of 16 values and
    the padding dropped; MNIST's 784 and CIFAR's 3,072 values per image need no padding. So the batch size is a
    memory setting only, and a certification may continue with another one (a GPU with a far larger batch).
    """
    size = shape.numel()
    padded = -(-size // 16) * 16
    return torch.randn((m, padded), generator=gen)[:, :size].reshape(m, *shape)


@torch.no_grad()
def sample_counts(
    base: BaseClassifier,
    x: torch.Tensor,
    num: int,
    sigma: float,
    num_classes: int,
    gens: Sequence[torch.Generator],
    batch_size: int = 1_000,
    clamp: bool = True,
) -> torch.Tensor:
    """Class counts [B, K] of f(x_i + δ) over `num` noise draws per image; forward passes of ≤ batch_size rows.

    Image i's noise is drawn from gens[i] in pieces of min(batch_size, remaining) rows; small pieces of
    several images share one forward pass.
    """
    if len(gens) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(gens)} for {x.shape[0]} images")
    counts = torch.zeros(x.shape[0], num_classes, dtype=torch.long)
    pieces = [(i, min(batch_size, num - done)) for i in range(x.shape[0]) for done in range(0, num, batch_size)]
    group: list[tuple[int, int]] = []
    rows = 0
    for piece in [*pieces, None]:
        if piece is not None and rows + piece[1] <= batch_size:
            group.append(piece)
            rows += piece[1]
            continue
        if group:
            _count_group(base, x, group, sigma, num_classes, gens, clamp, counts)
        if piece is not None:
            group, rows = [piece], piece[1]
    return counts


def _count_group(
    base: BaseClassifier,
    x: torch.Tensor,
    group: list[tuple[int, int]],
    sigma: float,
    num_classes: int,
    gens: Sequence[torch.Generator],
    clamp: bool,
    counts: torch.Tensor,
) -> None:
    shape = x.shape[1:]
    parts = []
    for i, m in group:
        noise = noise_rows(m, shape, gens[i]).to(device=x.device, dtype=x.dtype)
        parts.append(x[i].unsqueeze(0) + sigma * noise)
    batch = torch.cat(parts)
    if clamp:
        batch = batch.clamp(0.0, 1.0)
    labels = base(batch).argmax(1).cpu()
    start = 0
    for i, m in group:
        counts[i] += torch.bincount(labels[start : start + m], minlength=num_classes)[:num_classes]
        start += m


# ----------------------------------------------------------------------------- statistics


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion (scipy's exact interval)."""
    if successes == 0:
        return 0.0
    ci = binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    return float(ci.low)


def radius_of(p_lower: float, sigma: float) -> float | None:
    """σ·Φ⁻¹(p_lower), or None when p_lower ≤ 1/2 (no certificate)."""
    if p_lower <= 0.5:
        return None
    return float(sigma * norm.ppf(p_lower))


# ----------------------------------------------------------------------------- PREDICT and CERTIFY


def certify(
    base: BaseClassifier,
    x: torch.Tensor,
    config: SmoothingConfig,
    num_classes: int,
    seed: int = 0,
) -> list[Certificate]:
    """Cohen et al.'s CERTIFY for each image of x [B, C, H, W]; image i is seeded `seed + i`."""
    gens = generators(seed, x.shape[0])
    select = sample_counts(base, x, config.n0, config.sigma, num_classes, gens, config.batch_size, config.clamp)
    estimate = sample_counts(base, x, config.n, config.sigma, num_classes, gens, config.batch_size, config.clamp)
    return certificates(select, estimate, config)


def certificates(select: torch.Tensor, estimate: torch.Tensor, config: SmoothingConfig) -> list[Certificate]:
    """CERTIFY's decision from the selection counts (n0 draws) and the estimation counts (n fresh draws), [B, K].

    Callers that draw the n estimation samples in slices (the service, between other work) get the same answer
    as `certify` when every slice is a multiple of `config.batch_size`: the generators then see the same calls.
    """
    out = []
    for i in range(select.shape[0]):
        top = int(select[i].argmax())
        p_lower = lower_confidence_bound(int(estimate[i, top]), int(estimate[i].sum()), config.alpha)
        radius = radius_of(p_lower, config.sigma)
        label = top if radius is not None else None
        out.append(Certificate(label, radius, p_lower, config.sigma, config.n0 + config.n))
    return out


def predict(
    base: BaseClassifier,
    x: torch.Tensor,
    config: SmoothingConfig,
    num_classes: int,
    seed: int = 0,
) -> list[Prediction]:
    """Cohen et al.'s PREDICT (n samples): the top class unless the binomial test of top-1 vs top-2 has p > α."""
    gens = generators(seed, x.shape[0])
    counts = sample_counts(base, x, config.n, config.sigma, num_classes, gens, config.batch_size, config.clamp)
    out = []
    for row in counts:
        top2 = row.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        p_value = binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b else 1.0
        label = int(top2.indices[0]) if p_value <= config.alpha else None
        out.append(Prediction(label, float(p_value), config.n))
    return out
