"""What a finished model is measured on: clean accuracy, and the calibration block the service uses.

Calibration = quantiles of the test-time auxiliary loss on clean held-out images (the service flags inputs above
one of them as suspicious) and the mean auxiliary loss after purification at every budget of the grid (paper Fig. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import PurifierConfig, SoapNetwork, aux_loss, purify
from models.checkpoint import Calibration

from .data import ImageData

QUANTILES = ("0.5", "0.9", "0.95", "0.99")


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size))


@torch.no_grad()
def clean_accuracy(
    model: SoapNetwork, data: ImageData, device: torch.device | str = "cpu", batch_size: int = 500
) -> float:
    """Top-1 accuracy of the model (eval mode) on all of `data`."""
    was_training = model.training
    model.eval()
    correct = 0
    for idx in _batches(len(data), batch_size):
        x, y = data.batch(idx, device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train(was_training)
    return correct / max(1, len(data))


@torch.no_grad()
def aux_losses(
    model: SoapNetwork, data: ImageData, device: torch.device | str = "cpu", batch_size: int = 500
) -> torch.Tensor:
    """Per-example test-time auxiliary loss (no purification) over `data`."""
    model.eval()
    out = [aux_loss(model, data.batch(idx, device)[0]).cpu() for idx in _batches(len(data), batch_size)]
    return torch.cat(out)


@dataclass
class CalibrationReport:
    """The calibration block, and the accuracy of min-aux purified images on the curve images (a by-product)."""

    calibration: Calibration
    min_aux_accuracy: float
    curve_images: int


def calibrate(
    model: SoapNetwork,
    data: ImageData,
    purifier: PurifierConfig,
    device: torch.device | str = "cpu",
    curve_images: int = 1000,
    batch_size: int = 250,
    suspicious_quantile: str = "0.99",
) -> CalibrationReport:
    """Aux-loss quantiles over all of `data`; mean aux loss per budget over its first `curve_images` images."""
    losses = aux_losses(model, data, device)
    quantiles = {q: float(torch.quantile(losses.double(), float(q))) for q in QUANTILES}
    n_curve = min(curve_images, len(data))
    curve_sum = torch.zeros(purifier.num_budgets, dtype=torch.float64)
    correct = 0
    for idx in _batches(n_curve, batch_size):
        x, y = data.batch(idx, device)
        result = purify(model, x, purifier, mode="min-aux")
        curve_sum += result.curve.double().sum(0).cpu()
        with torch.no_grad():
            correct += (model(result.images).argmax(1) == y).sum().item()
    calibration = Calibration(
        n=len(data),
        aux_loss_quantiles=quantiles,
        mean_aux_loss_per_budget=(curve_sum / max(1, n_curve)).tolist(),
        suspicious_quantile=suspicious_quantile,
    )
    return CalibrationReport(calibration, correct / max(1, n_curve), n_curve)
