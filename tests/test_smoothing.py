"""Randomized smoothing (models/smoothing.py): against the closed form of a linear classifier, abstention,
reproducibility, and the real zoo models on real MNIST digits."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

from models import load_checkpoint
from models.checkpoint import read_meta
from models.smoothing import (
    SmoothingConfig,
    base_classifier,
    certify,
    denoised_classifier,
    generators,
    lower_confidence_bound,
    noise_rows,
    predict,
    radius_of,
    sample_counts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"
SHAPE = (1, 4, 4)


def linear(weight: torch.Tensor, bias: float):
    """Binary linear base classifier sign(w·x + b) as two logits."""

    def f(x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ weight.flatten() + bias
        return torch.stack([-s, s], dim=1)

    return f


def point_at(distance: float, weight: torch.Tensor, bias: float) -> torch.Tensor:
    """A point at signed distance `distance` from the hyperplane w·x + b = 0 (class 1 side when positive)."""
    w = weight.flatten()
    x0 = -bias * w / w.dot(w)
    return (x0 + distance * w / w.norm()).view(1, *SHAPE)


@pytest.fixture
def hyperplane() -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(SHAPE, generator=g), 0.3


@pytest.mark.parametrize("distance", [0.1, 0.25, 0.5, 0.8])
def test_linear_certificate_below_exact_radius_and_close(hyperplane, distance):
    """For a linear f the smoothed classifier's exact radius is the distance to the hyperplane (for every σ);
    CERTIFY's bound must never exceed it and, with 100k samples, must come within 0.02 (the Clopper-Pearson
    half-width at α = 0.001 is about 3.1·sqrt(p(1-p)/n) ≈ 0.005 in p, ≈ 0.007 in radius at σ = 0.5)."""
    weight, bias = hyperplane
    sigma = 0.5
    x = point_at(distance, weight, bias)
    config = SmoothingConfig(sigma=sigma, n0=100, n=100_000, alpha=0.001, batch_size=20_000, clamp=False)
    for seed in range(3):
        cert = certify(linear(weight, bias), x, config, num_classes=2, seed=seed)[0]
        assert cert.label == 1
        assert cert.radius is not None
        assert cert.radius <= distance
        assert distance - cert.radius < 0.02
        assert cert.p_lower <= norm.cdf(distance / sigma)
        assert cert.samples == 100_100


def test_other_side_gives_other_label(hyperplane):
    weight, bias = hyperplane
    x = point_at(-0.4, weight, bias)
    cert = certify(linear(weight, bias), x, SmoothingConfig(sigma=0.25, n=2_000, clamp=False), 2, seed=1)[0]
    assert cert.label == 0
    assert 0 < cert.radius <= 0.4


def test_split_vote_abstains(hyperplane):
    """On the hyperplane the vote is 50/50: CERTIFY has no bound above 1/2 and PREDICT's test is not significant."""
    weight, bias = hyperplane
    x = point_at(0.0, weight, bias)
    config = SmoothingConfig(sigma=0.5, n=5_000, alpha=0.001, clamp=False)
    for seed in range(5):
        cert = certify(linear(weight, bias), x, config, 2, seed=seed)[0]
        assert cert.abstained
        assert cert.radius is None
        assert cert.p_lower < 0.5
        pred = predict(linear(weight, bias), x, config, 2, seed=seed)[0]
        assert pred.abstained
        assert pred.p_value > config.alpha


def test_predict_decides_far_from_the_boundary(hyperplane):
    weight, bias = hyperplane
    pred = predict(linear(weight, bias), point_at(1.0, weight, bias), SmoothingConfig(sigma=0.5, n=1_000), 2)[0]
    assert pred.label == 1
    assert pred.p_value < 1e-6


def test_same_seed_same_answer_and_batch_mates_do_not_matter(hyperplane):
    weight, bias = hyperplane
    f = linear(weight, bias)
    x = torch.cat([point_at(d, weight, bias) for d in (0.1, 0.2, 0.3)])
    config = SmoothingConfig(sigma=0.5, n=3_000, batch_size=700, clamp=False)
    first = certify(f, x, config, 2, seed=7)
    assert certify(f, x, config, 2, seed=7) == first
    assert certify(f, x[1:2], config, 2, seed=8) == first[1:2]  # image i is seeded seed + i
    assert certify(f, x, config, 2, seed=9)[0].p_lower != first[0].p_lower


def test_sample_counts_groups_small_pieces_without_changing_them(hyperplane):
    """Pieces of several images share a forward pass; every image still gets exactly `num` draws of its own."""
    weight, bias = hyperplane
    calls: list[int] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return linear(weight, bias)(x)

    x = torch.cat([point_at(d, weight, bias) for d in (0.1, 0.2, 0.3, 0.4)])
    counts = sample_counts(f, x, 300, 0.5, 2, generators(0, 4), batch_size=700, clamp=False)
    assert counts.sum(1).tolist() == [300] * 4
    assert max(calls) <= 700
    assert sum(calls) == 1200
    alone = sample_counts(f, x[2:3], 300, 0.5, 2, generators(2, 1), batch_size=700, clamp=False)
    assert torch.equal(alone[0], counts[2])


def test_the_noise_batch_changes_no_count(hyperplane):
    """`batch_size` bounds memory only: each image's noise stream is the same in pieces of any size, which is why a
    certification log may be continued with another batch (training.certify.CertifyLogHeader.continued_by)."""
    weight, bias = hyperplane
    x = torch.cat([point_at(d, weight, bias) for d in (0.05, 0.1, 0.2)])
    counts = [
        sample_counts(linear(weight, bias), x, 1_000, 0.5, 2, generators(3, 3), batch_size=b, clamp=False)
        for b in (1_000, 256, 7)
    ]
    assert torch.equal(counts[0], counts[1])
    assert torch.equal(counts[0], counts[2])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 3, 3), (3, 5, 5)])
def test_noise_rows_are_one_stream_however_they_are_split(shape):
    """Also for rows whose size is not a multiple of 16 (torch's sampler block), where plain torch.randn pieces of 7
    rows would differ from one call of 14; MNIST and CIFAR rows get exactly torch.randn's values."""
    one = noise_rows(14, torch.Size(shape), torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    split = torch.cat([noise_rows(m, torch.Size(shape), gen) for m in (7, 3, 4)])
    assert torch.equal(one, split)
    if torch.Size(shape).numel() % 16 == 0:
        assert torch.equal(one, torch.randn((14, *shape), generator=torch.Generator().manual_seed(5)))


def test_statistics_match_scipy_definitions():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    # Clopper-Pearson one-sided lower bound: the alpha quantile of Beta(k, n - k + 1).
    from scipy.stats import beta

    assert lower_confidence_bound(990, 1000, 0.001) == pytest.approx(beta.ppf(0.001, 990, 11), rel=1e-9)
    assert radius_of(0.5, 1.0) is None
    assert radius_of(norm.cdf(2.0), 0.25) == pytest.approx(0.5)


def test_config_rejects_bad_settings():
    for bad in ({"sigma": 0.0}, {"sigma": 0.5, "n": 0}, {"sigma": 0.5, "alpha": 0.7}, {"sigma": 0.5, "batch_size": 0}):
        with pytest.raises(ValueError, match="must be"):
            SmoothingConfig(**bad)


# ----------------------------------------------------------------------------- the zoo models


def mnist_digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for digit in range(count):
        path = sorted((ROOT / "tests" / "data" / "mnist" / str(digit)).glob("*.png"))[0]
        images.append(torch.from_numpy(np.array(Image.open(path), dtype=np.float32) / 255.0)[None])
        labels.append(digit)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("kind", ["noisy", "denoised"])
def test_zoo_dr_model_certifies_real_digits(kind):
    loaded = load_checkpoint(ZOO / "mnist-fcn-dr")
    x, y = mnist_digits(10)
    config = SmoothingConfig(sigma=loaded.meta.training_noise_std, n0=50, n=500, alpha=0.001)
    certs = certify(base_classifier(loaded.network, kind), x, config, 10, seed=0)
    correct = [c.label == int(t) and c.radius is not None and c.radius > 0.25 for c, t in zip(certs, y, strict=True)]
    assert sum(correct) >= 9
    # With n = 500 the bound cannot exceed 0.001 ** (1 / 500): radius ≤ σ·Φ⁻¹ of that.
    assert max(c.radius or 0.0 for c in certs) <= 0.5 * norm.ppf(0.001 ** (1 / 500)) + 1e-9


def test_denoised_needs_a_reconstruction_head():
    loaded = load_checkpoint(ZOO / "cifar10-resnet18-rp")
    with pytest.raises(ValueError, match="reconstruction"):
        denoised_classifier(loaded.network)
    with pytest.raises(ValueError, match="unknown base classifier"):
        base_classifier(loaded.network, "median")


def test_sigma_defaults_to_the_training_noise():
    assert read_meta(ZOO / "mnist-fcn-dr").training_noise_std == 0.5
    assert read_meta(ZOO / "mnist-cnn-dr").noise_std == 0.5
    rp = read_meta(ZOO / "cifar10-resnet18-rp")
    assert rp.noise_std is None
    assert rp.training_noise_std == 0.1  # rotation task's training noise (models.tasks)


# ----------------------------------------------------------------------------- SmoothAdv (training/attacks)


def test_smoothadv_crosses_only_beyond_the_exact_radius(hyperplane):
    """Linear f in the [0, 1] box: the smoothed classifier flips exactly at the hyperplane (distance 0.3).
    SmoothAdv with ε = 0.25 must not flip PREDICT; with ε = 0.6 it must (the attack has teeth)."""
    from training.attacks.smoothadv import smoothadv_pgd

    weight, _ = hyperplane
    w = weight.flatten()
    x = torch.full((1, *SHAPE), 0.5)
    bias = float(0.3 * w.norm() - w @ x.flatten())  # x at distance 0.3 on the class-1 side
    f = linear(weight, bias)
    config = SmoothingConfig(sigma=0.25, n=2_000, clamp=False)
    c = torch.tensor([1])
    g = torch.Generator().manual_seed(0)
    inside = smoothadv_pgd(f, x, c, torch.tensor([0.25]), 0.25, steps=10, samples=64, generator=g, clamp=False)
    outside = smoothadv_pgd(f, x, c, torch.tensor([0.6]), 0.25, steps=10, samples=64, generator=g, clamp=False)
    assert (inside - x).norm() <= 0.25 + 1e-5
    assert predict(f, inside, config, 2)[0].label == 1
    assert predict(f, outside, config, 2)[0].label == 0
