"""The job each peer server of benchmarks/peers.py serves: decode one encoded image, then the service's own predict
step (`service.predict.predict`: `models.purify` with the model's min-aux search, then the classifier) on a batch.

The peers import this and nothing else of the service, so that what they compute per image is what the service
computes; only the HTTP front end, the batching and the worker layout differ. Decoding is Pillow's, to the model's
channels and [0, 1] as the service's decoder does for images already at the model's size (the benchmark's real test
digits and CIFAR images are); benchmarks/peers.py checks every answer's label, so a decoding difference would show
up as a different served accuracy."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import LoadedModel, load_checkpoint
from service.predict import Predictions, PurifyRequest, predict


@dataclass
class PeerJob:
    """One loaded model and its predict step, for one worker (process or thread) of a peer server."""

    name: str  # the checkpoint folder's name, as the service names the model
    model: LoadedModel

    @classmethod
    def load(cls, model_dir: str | Path, torch_threads: int = 1) -> PeerJob:
        torch.set_num_threads(torch_threads)
        job = cls(Path(model_dir).name, load_checkpoint(model_dir))
        channels, height, width = job.model.meta.input_shape
        job.predict([torch.zeros(channels, height, width)])  # warm-up, as the service does before it is ready
        return job

    @property
    def class_names(self) -> list[str]:
        return self.model.meta.class_names

    def decode(self, data: bytes) -> torch.Tensor:
        """An encoded image (PNG, JPEG, ...) as a [C, H, W] float tensor in [0, 1]."""
        channels, height, width = self.model.meta.input_shape
        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(255.0)

    def predict(self, images: list[torch.Tensor]) -> Predictions:
        """Purify and classify a batch (the service's predict step, default request: the min-aux search)."""
        return predict(self.model, torch.stack(images), PurifyRequest())

    def result(self, predictions: Predictions, row: int, top_k: int = 5) -> dict:
        """One image's answer, with the fields of the service's /classify result that the predict step gives."""
        probs = predictions.probs[row]
        values, labels = probs.topk(min(top_k, probs.numel()))
        label = int(labels[0])
        return {
            "label": label,
            "class_name": self.class_names[label],
            "confidence": float(values[0]),
            "top_k": [
                {"label": int(k), "class_name": self.class_names[int(k)], "probability": float(p)}
                for p, k in zip(values, labels, strict=True)
            ],
            "epsilon": float(predictions.epsilon[row]),
            "aux_loss": float(predictions.aux_after[row]),
            "aux_loss_before": float(predictions.aux_before[row]),
        }
