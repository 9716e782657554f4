"""Self-supervised tasks (soap-reference §2-3): training losses, per-example purification losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import aux_loss, create_model, training_losses
from models.tasks import (
    consistency_loss,
    deterministic_view,
    label_consistency_training,
    random_view,
    reconstruction_consistency_training,
    reconstruction_training,
    rotate,
    rotation_training,
)


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return create_model("mnist-fcn-dr").eval()


@pytest.fixture(scope="module")
def rp():
    torch.manual_seed(1)
    return create_model("cifar10-resnet18-rp").eval()


@pytest.fixture(scope="module")
def lc():
    torch.manual_seed(2)
    return create_model("cifar10-resnet18-lc").eval()


# ----------------------------------------------------------------------------- rotation convention


def test_rotation_is_clockwise_like_the_reference() -> None:
    x = torch.rand(2, 3, 5, 5)
    for r in range(4):
        assert torch.equal(rotate(x, r), torch.rot90(x, k=-r, dims=(2, 3)))
    # A concrete pixel: clockwise by 90°, the top-left corner goes to the top-right corner,
    # and the top-right corner goes to the bottom-right one.
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, 0, 0] = 1.0
    img[0, 0, 0, 3] = 2.0
    out = rotate(img, 1)
    assert out[0, 0, 0, 3] == 1.0
    assert out[0, 0, 3, 3] == 2.0
    assert out.sum() == 3.0
    assert torch.equal(rotate(img, 2), img.flip(-1).flip(-2))
    assert torch.equal(rotate(rotate(img, 1), 3), img)


# ----------------------------------------------------------------------------- purification losses


def test_reconstruction_loss_per_example(fcn) -> None:
    x = torch.rand(5, 1, 28, 28)
    loss = aux_loss(fcn, x)
    assert loss.shape == (5,)
    with torch.no_grad():
        recon = fcn.aux_head(fcn.encoder(x))  # MNIST normalisation is the identity
    expected = ((recon - x) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_rotation_loss_is_sum_of_mse_to_one_hot(rp) -> None:
    x = torch.rand(3, 3, 32, 32)
    loss = aux_loss(rp, x)
    assert loss.shape == (3,)
    expected = torch.zeros(3)
    with torch.no_grad():
        for r in range(4):
            probs = rp.auxiliary(rp.encode(torch.rot90(x, k=-r, dims=(2, 3)))).softmax(1)
            target = torch.zeros(3, 4)
            target[:, r] = 1.0
            expected += ((probs - target) ** 2).mean(1)
    assert torch.allclose(loss, expected, atol=1e-5)


def _independent_view(x: torch.Tensor) -> torch.Tensor:
    """Flip, crop [2:30, 2:30], nearest resize 28 -> 32 written as explicit indexing."""
    idx = 2 + torch.div(torch.arange(32) * 28, 32, rounding_mode="floor")
    flipped = x.flip(-1)
    return flipped[:, :, idx][:, :, :, idx]


def test_deterministic_view_is_flip_crop_resize() -> None:
    x = torch.rand(2, 3, 32, 32)
    view = deterministic_view(x)
    assert torch.equal(view, _independent_view(x))
    assert torch.equal(view, deterministic_view(x))  # deterministic
    # Concrete pixel: output (0, 0) is input row 2, column 31 - 2 = 29 (flipped).
    assert view[0, 0, 0, 0] == x[0, 0, 2, 29]


def test_label_consistency_loss(lc) -> None:
    x = torch.rand(4, 3, 32, 32)
    loss = aux_loss(lc, x)
    assert loss.shape == (4,)
    with torch.no_grad():
        expected = ((lc(x) - lc(_independent_view(x))) ** 2).sum(1)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(aux_loss(lc, x), loss)  # no randomness at test time
    assert (loss > 0).all()


@pytest.mark.parametrize("model_name", ["fcn", "rp", "lc"])
def test_purification_loss_does_not_couple_examples(model_name, request) -> None:
    model = request.getfixturevalue(model_name)
    shape = model.input_shape
    x = torch.rand(4, *shape)
    together = aux_loss(model, x)
    alone = torch.cat([aux_loss(model, x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-7)
    # The gradient of the summed loss w.r.t. one image only depends on that image.
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(aux_loss(model, xg).sum(), xg)
    x1 = x[1:2].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(aux_loss(model, x1).sum(), x1)
    assert torch.allclose(g[1:2], g1, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- training losses


def test_reconstruction_training_targets_the_clean_image(fcn) -> None:
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    clean = reconstruction_training(fcn, x, y, noise_std=0.0)
    with torch.no_grad():
        z = fcn.encoder(x)
        assert torch.allclose(clean.cls_loss, F.cross_entropy(fcn.classifier(z), y), atol=1e-6)
        assert torch.allclose(clean.aux_loss, F.mse_loss(fcn.aux_head(z), x), atol=1e-7)
    # With the default N(0, 0.5²) corruption the encoder sees another image, but the target stays x:
    # reproduce the noise from the seed and compare against the clean and the noisy target.
    torch.manual_seed(123)
    noisy = training_losses(fcn, x, y)
    torch.manual_seed(123)
    x_tilde = (x + 0.5 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        recon = fcn.aux_head(fcn.encoder(x_tilde))
        assert torch.allclose(noisy.aux_loss, F.mse_loss(recon, x), atol=1e-6)
        assert not torch.allclose(noisy.aux_loss, F.mse_loss(recon, x_tilde), atol=1e-4)
        assert torch.allclose(noisy.cls_loss, F.cross_entropy(fcn.classifier(fcn.encoder(x_tilde)), y), atol=1e-5)
    assert noisy.logits.shape == (6, 10)
    assert noisy.cls_loss.shape == noisy.aux_loss.shape == ()


def test_rotation_training_is_four_way_cross_entropy(rp) -> None:
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([1, 4, 7])
    out = rotation_training(rp, x, y, noise_std=0.0)
    with torch.no_grad():
        cls, aux = 0.0, 0.0
        for r in range(4):
            z = rp.encode(torch.rot90(x, k=-r, dims=(2, 3)))
            cls += F.cross_entropy(rp.classify(z), y) / 4
            aux += F.cross_entropy(rp.auxiliary(z), torch.full((3,), r)) / 4
        clean_logits = rp(x)
    assert torch.allclose(out.cls_loss, cls, atol=1e-5)
    assert torch.allclose(out.aux_loss, aux, atol=1e-5)
    assert torch.allclose(out.logits, clean_logits, atol=1e-5)  # logits of the unrotated view
    noisy = training_losses(rp, x, y)  # N(0, 0.1²) on each rotated copy
    assert not torch.allclose(noisy.aux_loss, out.aux_loss, atol=1e-6)


def test_training_losses_backpropagate_to_parameters() -> None:
    torch.manual_seed(0)
    for name, shape in (
        ("mnist-fcn-dr", (1, 28, 28)),
        ("cifar10-resnet18-rp", (3, 32, 32)),
        ("cifar10-resnet18-lc", (3, 32, 32)),
    ):
        model = create_model(name).train()
        out = training_losses(model, torch.rand(4, *shape), torch.randint(0, 10, (4,)))
        (out.cls_loss + out.aux_loss).backward()
        # Both losses reach every parameter: encoder, classifier and auxiliary head alike.
        # (Conv biases before training-mode BatchNorm get ~0 gradients, so only presence is checked there.)
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:5]}"
        assert model.classifier.weight.grad.abs().sum() > 0
        if model.aux_head is not None:
            assert all(p.grad.abs().sum() > 0 for p in model.aux_head.parameters())


def test_label_consistency_training_leaves_input_alone_and_uses_two_random_views(lc) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    original = x.clone()
    y = torch.tensor([0, 1, 2, 3])
    seen: list[torch.Tensor] = []
    hook = lc.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        out = label_consistency_training(lc, x, y)
    finally:
        hook.remove()
    assert torch.equal(x, original), "LC training modified the caller's batch in place"
    assert len(seen) == 1
    assert seen[0].shape == (8, 3, 32, 32)  # one forward over both views
    view1, view2 = seen[0][:4], seen[0][4:]
    assert not torch.allclose(view1, view2, atol=1e-3)
    assert not torch.allclose(view1, x, atol=1e-3)
    assert not torch.allclose(view2, deterministic_view(x), atol=1e-3)
    assert view1.min() >= 0
    assert view1.max() <= 1
    # aux = squared logit distance between the views, CE on both views.
    with torch.no_grad():
        l1, l2 = lc(view1), lc(view2)
    assert torch.allclose(out.aux_loss, ((l1 - l2) ** 2).sum(1).mean(), rtol=1e-4)
    assert torch.allclose(out.cls_loss, F.cross_entropy(torch.cat([l1, l2]), y.repeat(2)), rtol=1e-4)


def test_random_views_differ_per_call_and_per_example() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    a, b = random_view(x), random_view(x)
    assert not torch.allclose(a, b, atol=1e-3)
    # Without noise, the 8 examples get different crops/flips (not one transform for the batch).
    same = x[:1].expand(8, -1, -1, -1)
    v = random_view(same, noise_std=0.0)
    assert not all(torch.allclose(v[0], v[i], atol=1e-4) for i in range(1, 8))


def test_label_consistency_noise_is_zero_mean() -> None:
    """The reference clamps the noise (not the image), so it is non-negative; ours must be zero-mean."""
    torch.manual_seed(0)
    x = torch.full((64, 3, 32, 32), 0.5)  # any flip/crop/resize of a constant image is the same constant
    noise = random_view(x) - x
    assert abs(noise.mean().item()) < 0.005
    assert 0.45 < (noise < 0).float().mean().item() < 0.55
    assert 0.09 < noise.std().item() < 0.11


# ----------------------------------------------------------------------------- consistency regularisation


def test_consistency_kl_term_is_zero_for_identical_copies() -> None:
    logits = torch.randn(5, 10)
    same = torch.stack([logits, logits])  # [m = 2, B, K]
    assert consistency_loss(same, lam=10.0, eta=0.0).item() == pytest.approx(0.0, abs=1e-7)
    # What is left with η > 0 is η times the entropy of the (common) prediction.
    p = logits.softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    assert torch.allclose(consistency_loss(same, lam=10.0, eta=0.5), 0.5 * entropy, atol=1e-6)
    assert consistency_loss(same, lam=0.0, eta=0.0).item() == 0.0


def test_consistency_loss_is_positive_when_copies_disagree_and_matches_its_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10)  # m = 3 copies
    kl_only = consistency_loss(logits, lam=1.0, eta=0.0)
    assert kl_only.item() > 0
    p_hat = logits.softmax(-1).mean(0)
    kl = sum(F.kl_div(logits[i].log_softmax(1), p_hat, reduction="none").sum(1) for i in range(3)) / 3
    entropy = -(p_hat * p_hat.log()).sum(1)
    assert torch.allclose(kl_only, kl.mean(), atol=1e-6)
    assert torch.allclose(consistency_loss(logits, lam=5.0, eta=0.5), (5 * kl + 0.5 * entropy).mean(), atol=1e-5)
    # The gradient pulls the copies together: one step along it lowers the KL term.
    leaf = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(consistency_loss(leaf, lam=1.0, eta=0.0), leaf)
    assert consistency_loss(logits - 0.5 * grad, lam=1.0, eta=0.0) < kl_only
    with pytest.raises(ValueError, match="copies, batch, classes"):
        consistency_loss(logits[0], lam=1.0, eta=0.5)


def test_one_copy_without_consistency_is_exactly_the_dr_training_loss(fcn) -> None:
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    torch.manual_seed(7)
    plain = reconstruction_training(fcn, x, y)
    torch.manual_seed(7)
    one = reconstruction_consistency_training(fcn, x, y, copies=1, lam=0.0, eta=0.0)
    assert torch.equal(plain.cls_loss, one.cls_loss)
    assert torch.equal(plain.aux_loss, one.aux_loss)
    assert torch.equal(plain.logits, one.logits)
    assert one.consistency_loss is not None
    assert one.consistency_loss.item() == 0.0


def test_consistency_training_uses_independent_noisy_copies(fcn) -> None:
    x = torch.rand(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    torch.manual_seed(3)
    out = reconstruction_consistency_training(fcn, x, y, copies=2, lam=5.0, eta=0.5)
    torch.manual_seed(3)
    noisy = (x.repeat(2, 1, 1, 1) + 0.5 * torch.randn(8, 1, 28, 28)).clamp(0, 1)
    with torch.no_grad():
        logits = fcn(noisy)
        assert torch.allclose(out.cls_loss, F.cross_entropy(logits, y.repeat(2)), atol=1e-5)
        assert torch.allclose(out.logits, logits[:4], atol=1e-5)
        assert out.consistency_loss is not None
        assert torch.allclose(out.consistency_loss, consistency_loss(logits.view(2, 4, 10), 5.0, 0.5), atol=1e-5)
        assert not torch.allclose(logits[:4], logits[4:])  # the copies' noise differs
    assert out.consistency_loss.item() > 0
