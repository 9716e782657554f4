"""The three self-supervised tasks of SOAP (soap-reference §2-3).

Each task has a training loss (paper Eq. 2, with its input corruption) and a test-time purification
loss (no noise, deterministic). Purification losses are reduced per example (shape `[B]`) so that an
image's purification never depends on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .networks import SoapNetwork

# The reference's "90°" is clockwise: rotation r is rot90(k=-r) on (H, W).
ROTATIONS = (0, 1, 2, 3)
# σ of the Gaussian input noise each task trains on (clamp(x + N(0, σ²), 0, 1)); randomized smoothing's default σ.
# The DR recipe can also train on x + N(0, σ²) unclamped (`clamp=False`): clamping discards what the noise below 0 and
# above 1 says about the image, which costs certified radius at large σ (docs/results.md, issue 26).
TRAINING_NOISE_STD = {"reconstruction": 0.5, "rotation": 0.1, "label_consistency": 0.1}


@dataclass
class TrainingLosses:
    """Batch-mean losses of one training step, and clean-view logits for accuracy."""

    cls_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor
    consistency_loss: torch.Tensor | None = None  # the weighted consistency term, when it is trained (else None)


def rotate(x: torch.Tensor, r: int) -> torch.Tensor:
    """Rotate by r x 90 degrees clockwise (the reference's convention)."""
    return torch.rot90(x, k=-r, dims=(2, 3))


def _noisy(x: torch.Tensor, sigma: float, clamp: bool = True) -> torch.Tensor:
    noisy = x + sigma * torch.randn_like(x)
    return noisy.clamp(0.0, 1.0) if clamp else noisy


# ----------------------------------------------------------------------------- data reconstruction


def reconstruction_training(
    model: SoapNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    noise_std: float = TRAINING_NOISE_STD["reconstruction"],
    clamp: bool = True,
) -> TrainingLosses:
    """The DR loss on one noisy view: clamp(x + δ, 0, 1), or x + δ with `clamp` off (the smoothing papers' noise)."""
    z = model.encode(_noisy(x, noise_std, clamp))
    logits = model.classify(z)
    recon = model.auxiliary(z)
    return TrainingLosses(F.cross_entropy(logits, y), F.mse_loss(recon, x), logits)


def consistency_loss(logits: torch.Tensor, lam: float, eta: float) -> torch.Tensor:
    """Consistency regularisation of the noisy copies (Jeong & Shin, NeurIPS 2020, Eq. 8), batch mean.

    `logits`: [m, B, K], the classifier on m independent noisy copies of each of B images. With p_i the softmax of
    copy i and p̂ = (1/m) Σ_i p_i: λ · (1/m) Σ_i KL(p̂ ‖ p_i) + η · H(p̂). The KL term is 0 when the copies agree;
    the entropy term keeps the (then consistent) prediction confident. p̂ is not detached (as in the paper).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [copies, batch, classes], got shape {tuple(logits.shape)}")
    log_p = logits.log_softmax(dim=-1)
    p_hat = log_p.exp().mean(dim=0)
    p_hat_log_p_hat = torch.xlogy(p_hat, p_hat)  # 0 · log 0 = 0
    kl = (p_hat_log_p_hat - p_hat * log_p).sum(dim=-1).mean(dim=0)  # [B]: mean over copies of KL(p̂ ‖ p_i)
    entropy = -p_hat_log_p_hat.sum(dim=-1)  # [B]
    return (lam * kl + eta * entropy).mean()


def reconstruction_consistency_training(
    model: SoapNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    copies: int,
    lam: float,
    eta: float,
    noise_std: float = TRAINING_NOISE_STD["reconstruction"],
    clamp: bool = True,
) -> TrainingLosses:
    """The DR training loss on `copies` independent noisy copies of each image, plus the consistency term.

    Cross-entropy and reconstruction MSE (target: the clean image) are averaged over all copies; `logits` are those
    of the first copy (as in `reconstruction_training`, a noisy view).
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    b = x.shape[0]
    z = model.encode(_noisy(x.repeat(copies, *([1] * (x.dim() - 1))), noise_std, clamp))
    logits = model.classify(z)
    targets = x.repeat(copies, *([1] * (x.dim() - 1)))
    cls = F.cross_entropy(logits, y.repeat(copies))
    aux = F.mse_loss(model.auxiliary(z), targets)
    consistency = consistency_loss(logits.view(copies, b, -1), lam, eta)
    return TrainingLosses(cls, aux, logits[:b], consistency)


def reconstruction_loss(model: SoapNetwork, x: torch.Tensor) -> torch.Tensor:
    """Per-example reconstruction MSE."""
    recon = model.auxiliary(model.encode(x))
    return (recon - x).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- rotation prediction


def _all_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4B batch [rot0(x); rot1(x); rot2(x); rot3(x)] and its rotation labels."""
    batch = torch.cat([rotate(x, r) for r in ROTATIONS])
    labels = torch.arange(len(ROTATIONS), device=x.device).repeat_interleave(x.shape[0])
    return batch, labels


def rotation_training(
    model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, noise_std: float = TRAINING_NOISE_STD["rotation"]
) -> TrainingLosses:
    batch, rot_labels = _all_rotations(x)
    z = model.encode(_noisy(batch, noise_std))
    logits = model.classify(z)
    cls = F.cross_entropy(logits, y.repeat(len(ROTATIONS)))
    aux = F.cross_entropy(model.auxiliary(z), rot_labels)
    return TrainingLosses(cls, aux, logits[: x.shape[0]])


def rotation_loss(model: SoapNetwork, x: torch.Tensor) -> torch.Tensor:
    """Sum over the 4 rotations of MSE(softmax(h), one-hot): CE under-estimates ε at test time (reference)."""
    b = x.shape[0]
    batch, rot_labels = _all_rotations(x)
    probs = model.auxiliary(model.encode(batch)).softmax(dim=1)
    target = F.one_hot(rot_labels, len(ROTATIONS)).to(probs.dtype)
    per_view = (probs - target).pow(2).mean(1)
    return per_view.view(len(ROTATIONS), b).sum(0)


# ----------------------------------------------------------------------------- label consistency


def deterministic_view(x: torch.Tensor) -> torch.Tensor:
    """The test-time second view: horizontal flip, crop [2:30, 2:30] (for 32 px), nearest resize back."""
    h, w = x.shape[-2:]
    mh, mw = h // 16, w // 16
    crop = x.flip(-1)[..., mh : h - mh, mw : w - mw]
    return F.interpolate(crop, size=(h, w), mode="nearest")


def random_view(x: torch.Tensor, noise_std: float = 0.1, min_scale: float = 0.75) -> torch.Tensor:
    """A random augmentation per example: flip, random crop (side in [min_scale, 1]) resized back, noise.

    Built as one affine resampling so the whole batch is a single vectorised op; the input is not modified.
    """
    b = x.shape[0]
    device, dtype = x.device, x.dtype
    scale = min_scale + (1 - min_scale) * torch.rand(b, device=device, dtype=dtype)
    flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0).to(dtype)
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, device=device, dtype=dtype) - 1)
    theta = torch.zeros(b, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _noisy(view, noise_std)


def label_consistency_training(
    model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, noise_std: float = TRAINING_NOISE_STD["label_consistency"]
) -> TrainingLosses:
    """Paper version: two independent random views with zero-mean noise; CE on both; squared logit distance."""
    b = x.shape[0]
    views = torch.cat([random_view(x, noise_std), random_view(x, noise_std)])
    logits = model(views)
    cls = F.cross_entropy(logits, y.repeat(2))
    aux = (logits[:b] - logits[b:]).pow(2).sum(1).mean()
    return TrainingLosses(cls, aux, logits[:b])


def label_consistency_loss(model: SoapNetwork, x: torch.Tensor) -> torch.Tensor:
    """Per-example ‖g(f(x)) − g(f(view(x)))‖² with the deterministic second view."""
    b = x.shape[0]
    logits = model(torch.cat([x, deterministic_view(x)]))
    return (logits[:b] - logits[b:]).pow(2).sum(1)


# ----------------------------------------------------------------------------- dispatch

_TRAINING = {
    "reconstruction": reconstruction_training,
    "rotation": rotation_training,
    "label_consistency": label_consistency_training,
}
_PURIFICATION = {
    "reconstruction": reconstruction_loss,
    "rotation": rotation_loss,
    "label_consistency": label_consistency_loss,
}


def training_losses(
    model: SoapNetwork, x: torch.Tensor, y: torch.Tensor, noise_std: float | None = None
) -> TrainingLosses:
    """Classification and auxiliary losses of the model's own task, with its training-time corruption (input noise
    of σ `noise_std`; None: the task's default, `TRAINING_NOISE_STD`)."""
    if noise_std is None:
        return _TRAINING[model.aux_task](model, x, y)
    return _TRAINING[model.aux_task](model, x, y, noise_std)


def aux_loss(model: SoapNetwork, x: torch.Tensor) -> torch.Tensor:
    """Test-time auxiliary loss of the model's task, per example (shape [B])."""
    return _PURIFICATION[model.aux_task](model, x)
