"""SmoothMix (training/smoothmix.py): the adversary climbs the smoothed classifier's loss within [0, 1], the mix
starts where the paper says, and the mixup term is counted only for correctly classified images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from training.smoothmix import SmoothMixSettings, reconstruction_smoothmix_training, smoothmix_adversary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smoothed_nll(model, x, y, noises, clamp: bool = True) -> torch.Tensor:
    noisy = x.unsqueeze(0) + noises
    probs = model((noisy.clamp(0, 1) if clamp else noisy).flatten(0, 1)).softmax(1).view(noises.shape[0], len(x), -1)
    return F.nll_loss(probs.mean(0).log(), y, reduction="none")


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = create_model("mnist-fcn-dr").eval()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    noises = 0.5 * torch.randn(4, *x.shape)
    return model, x, y, noises


def test_the_adversary_raises_the_smoothed_loss_and_stays_an_image(batch):
    model, x, y, noises = batch
    settings = SmoothMixSettings(copies=4, steps=3, step_size=0.5, mix_step=0, eta=1.0)
    start, end = smoothmix_adversary(model, x, y, noises, settings)
    assert torch.equal(start, x)  # mix step 0: the mix starts at the clean image
    assert end.min() >= 0
    assert end.max() <= 1
    assert (end - x).flatten(1).norm(dim=1).max() <= 3 * 0.5 + 1e-5  # at most steps x step_size in L2
    with torch.no_grad():
        assert (smoothed_nll(model, end, y, noises) > smoothed_nll(model, x, y, noises)).all()
    assert not any(p.grad is not None for p in model.parameters())  # gradients of the input only


def test_the_one_step_start_is_projected_onto_its_warmed_up_radius(batch):
    model, x, y, noises = batch
    settings = SmoothMixSettings(copies=4, steps=3, step_size=0.5, mix_step=1, eta=1.0, ramp=0.5)
    start, _ = smoothmix_adversary(model, x, y, noises, settings)
    radii = (start - x).flatten(1).norm(dim=1)
    assert radii.max() <= 0.5 * 1 * 0.5 + 1e-5
    assert radii.min() > 0


def test_the_mixup_term_counts_only_correctly_classified_images(batch):
    model, x, _, _ = batch
    settings = SmoothMixSettings(copies=4, steps=2, step_size=0.5, mix_step=0, eta=5.0)
    torch.manual_seed(1)
    noises = 0.5 * torch.randn(4, *x.shape)  # the draws the loss makes first under the same seed
    with torch.no_grad():
        probs = model((x.unsqueeze(0) + noises).clamp(0, 1).flatten(0, 1)).softmax(1).view(4, len(x), -1).mean(0)
        predicted = probs.argmax(1)  # F(x): the smoothed prediction the mask compares with the label
    wrong = (predicted + 1) % 10
    torch.manual_seed(1)
    losses = reconstruction_smoothmix_training(model, x, wrong, 0.5, settings)
    torch.manual_seed(1)
    right = reconstruction_smoothmix_training(model, x, predicted, 0.5, settings)
    assert right.mixup_loss > 0
    assert losses.mixup_loss == 0  # no image is correct under F: no term
    assert losses.cls_loss > right.cls_loss


def test_unclamped_noise_is_the_noise_the_adversary_attacks_and_the_loss_trains_on(batch):
    """`clamp=False` (a `--no-noise-clamp` model): the adversary climbs the smoothed loss of f(x + δ) unclamped, and
    the DR loss is taken on x + δ unclamped (its cross-entropy differs from the clamped one on the same draws)."""
    model, x, y, noises = batch
    settings = SmoothMixSettings(copies=4, steps=3, step_size=0.5, mix_step=0, eta=1.0, clamp=False)
    _, end = smoothmix_adversary(model, x, y, noises, settings)
    with torch.no_grad():
        assert (smoothed_nll(model, end, y, noises, clamp=False) > smoothed_nll(model, x, y, noises, clamp=False)).all()
    torch.manual_seed(1)
    unclamped = reconstruction_smoothmix_training(model, x, y, 0.5, settings)
    torch.manual_seed(1)
    noises = 0.5 * torch.randn(4, *x.shape)  # the draws the loss makes first under the same seed
    with torch.no_grad():
        logits = model((x.unsqueeze(0) + noises).flatten(0, 1))
    assert unclamped.cls_loss.item() == pytest.approx(F.cross_entropy(logits, y.repeat(4)).item(), rel=1e-5)
    torch.manual_seed(1)
    clamped = reconstruction_smoothmix_training(model, x, y, 0.5, SmoothMixSettings(4, 3, 0.5, 0, 1.0))
    assert clamped.cls_loss != unclamped.cls_loss


def test_settings_are_checked():
    with pytest.raises(ValueError, match="mix step"):
        SmoothMixSettings(copies=4, steps=2, step_size=1.0, mix_step=2, eta=1.0)
    with pytest.raises(ValueError, match="copies and steps"):
        SmoothMixSettings(copies=0, steps=2, step_size=1.0, mix_step=0, eta=1.0)
