"""Checkpoints for the tests: the shipped default model, and a tiny one trained here (weights unlike the shipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import ROOT
from models import aux_loss, create_model, save_checkpoint, training_losses
from models.checkpoint import Calibration, meta_for
from support.images import mnist_files

SHIPPED = ROOT / "models" / "zoo" / "mnist-fcn-dr"


def _mnist_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    files = mnist_files(per_digit=30)
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0).unsqueeze(0)
            for _, p in files
        ]
    )
    y = torch.tensor([d for d, _ in files])
    return x, y


def train_tiny_checkpoint(directory: Path, steps: int = 30) -> Path:
    """A freshly trained mnist-fcn-dr (a few SGD steps on the 300 test-data digits), saved with a calibration."""
    torch.manual_seed(0)
    model = create_model("mnist-fcn-dr")
    x, y = _mnist_tensors()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        losses = training_losses(model, x[idx], y[idx])
        loss = losses.cls_loss + 100.0 * losses.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        aux = aux_loss(model, x)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    quantiles = {q: torch.quantile(aux, float(q)).item() for q in ("0.5", "0.9", "0.95", "0.99")}
    meta = meta_for(
        model,
        network="mnist-fcn-dr",
        dataset="mnist",
        class_names=[str(i) for i in range(10)],
        aux_head_trained=True,  # trained with the reconstruction loss above
        training={"note": "test fixture: 30 SGD steps on tests/data/mnist"},
        metrics={"clean_accuracy": accuracy},
        calibration=Calibration(n=len(x), aux_loss_quantiles=quantiles, suspicious_quantile="0.99"),
    )
    return save_checkpoint(model, meta, directory)
