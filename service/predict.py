"""The predict step: purify a batch with SOAP, then classify the purified images. Runs in the model's compute
process (service/compute_process.py) or, with --no-compute-process, in the batcher's thread.

`predict` is a plain function of a loaded model and a CPU tensor, so the batcher, the tests and the demo page
all use the same code; `predict_in_chunks` adds the CUDA out-of-memory policy (halve the chunk and retry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from models import Acceleration, AuxLossFn, LoadedModel, Mode, aux_loss_fn, purify

from .batch_images import BatchImages, pixels_of

log = logging.getLogger("service.predict")


@dataclass(frozen=True)
class PurifyRequest:
    """What every image of one batch shares: the purification mode and, for "fixed", the budget."""

    mode: Mode = Mode.MIN_AUX
    epsilon: float | None = None


@dataclass
class Predictions:
    """One row per image, on the CPU. `curve` is the auxiliary loss at each budget the mode evaluated. `rejected`:
    the rows whose image files the worker could not decode (service/batch_images.py), with the reason for each;
    their other columns are the prediction for a blank image and are not an answer."""

    probs: torch.Tensor  # [n, classes]
    epsilon: torch.Tensor  # [n]
    aux_before: torch.Tensor  # [n]
    aux_after: torch.Tensor  # [n]
    curve: torch.Tensor  # [n, budgets]
    purified: torch.Tensor  # [n, C, H, W] in [0, 1]
    rejected: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def rows(self, start: int, stop: int) -> PredictionRows:
        return PredictionRows(self, start, stop)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.probs, self.epsilon, self.aux_before, self.aux_after, self.curve, self.purified

    @staticmethod
    def of(tensors: Iterable[torch.Tensor], rejected: dict[int, str] | None = None) -> Predictions:
        """From the six columns in `tensors()` order (a slice, a concatenation, the compute process's reply)."""
        probs, epsilon, aux_before, aux_after, curve, purified = tensors
        return Predictions(probs, epsilon, aux_before, aux_after, curve, purified, rejected or {})

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        if len(parts) == 1:
            return parts[0]
        rejected: dict[int, str] = {}
        offset = 0
        for part in parts:
            rejected.update({offset + row: detail for row, detail in part.rejected.items()})
            offset += len(part)
        return Predictions.of((torch.cat(ts) for ts in zip(*(p.tensors() for p in parts), strict=True)), rejected)

    # The batch's columns as Python lists, each converted once per batch on first use: every request of the batch
    # and the metrics read the same lists. (Slicing six tensors per request, then topk and tolist() on each slice,
    # cost ~20 µs of event loop per request; one conversion per batch costs ~1 µs per row.)

    @cached_property
    def ranked(self) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's probabilities in descending order and their classes (ties in class order, as argmax)."""
        values, classes = self.probs.sort(dim=1, descending=True, stable=True)
        return values.tolist(), classes.tolist()

    @cached_property
    def probs_listed(self) -> list[list[float]]:
        return self.probs.tolist()

    @cached_property
    def epsilon_listed(self) -> list[float]:
        return self.epsilon.tolist()

    @cached_property
    def aux_before_listed(self) -> list[float]:
        return self.aux_before.tolist()

    @cached_property
    def aux_after_listed(self) -> list[float]:
        return self.aux_after.tolist()


@dataclass(frozen=True, slots=True)
class PredictionRows:
    """Rows [start, stop) of a batch's Predictions: one request's answer. A view on the batch, not a copy, so a
    protocol reads only what it answers, from lists the batch converted once."""

    batch: Predictions
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def ranked(self) -> tuple[list[list[float]], list[list[int]]]:
        values, classes = self.batch.ranked
        return values[self.start : self.stop], classes[self.start : self.stop]

    def probs(self) -> list[list[float]]:
        return self.batch.probs_listed[self.start : self.stop]

    def epsilon(self) -> list[float]:
        return self.batch.epsilon_listed[self.start : self.stop]

    def aux_before(self) -> list[float]:
        return self.batch.aux_before_listed[self.start : self.stop]

    def aux_after(self) -> list[float]:
        return self.batch.aux_after_listed[self.start : self.stop]

    def tensors(self) -> Predictions:
        """These rows as tensors (a copy of each slice): the purified images, the curves, tests."""
        return Predictions.of(t[self.start : self.stop] for t in self.batch.tensors())


def predict(
    model: LoadedModel, images: torch.Tensor | BatchImages, request: PurifyRequest, loss_fn: AuxLossFn | None = None
) -> Predictions:
    """Purify `images` ([n, C, H, W] in [0, 1], any device; or a batch with image files, decoded first) and classify
    the purified images. `loss_fn`: an accelerated auxiliary loss (models.aux_loss_fn), built once per worker; None
    is the model's own."""
    pixels, rejected = pixels_of(images)
    device = next(model.network.buffers()).device
    x = pixels.to(device, non_blocking=True)
    result = purify(model.network, x, model.purifier, mode=request.mode, epsilon=request.epsilon, loss_fn=loss_fn)
    with torch.no_grad():
        probs = model.network(result.images).softmax(dim=1)
    return Predictions(
        probs=probs.float().cpu(),
        epsilon=result.epsilon.float().cpu(),
        aux_before=result.aux_before.float().cpu(),
        aux_after=result.aux_after.float().cpu(),
        curve=result.curve.float().cpu(),
        purified=result.images.float().cpu(),
        rejected=rejected,
    )


class InlineWorker:
    """A pool worker (batcher.Worker) that runs the predict step in the calling thread (--no-compute-process)."""

    def __init__(self, model: LoadedModel, index: int = 0, acceleration: Acceleration | None = None) -> None:
        self.model = model
        self.index = index
        self.loss_fn = aux_loss_fn(model.network, acceleration) if acceleration and acceleration.enabled else None

    def start(self) -> None:
        """Nothing to start: the model is loaded in this process."""

    def compute(self, images: torch.Tensor | BatchImages, request: PurifyRequest) -> Predictions:
        return predict(self.model, images, request, self.loss_fn)

    def close(self) -> None:
        """Nothing to stop."""


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def predict_in_chunks(
    fn: Callable[[torch.Tensor | BatchImages], Predictions], images: torch.Tensor | BatchImages, chunk: int
) -> tuple[Predictions, int]:
    """Run `fn` on slices of at most `chunk` images. On out-of-memory, halve the chunk and retry the slice;
    give up (re-raise) only when one image alone does not fit. Returns the predictions and the chunk size
    that worked, which the caller keeps for later batches."""
    parts: list[Predictions] = []
    start = 0
    chunk = max(1, chunk)
    while start < len(images):
        try:
            parts.append(fn(images[start : start + chunk]))
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or chunk == 1:
                raise
            chunk //= 2
            log.warning("out of memory on %d images; retrying in chunks of %d", chunk * 2, chunk)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += chunk
    return Predictions.concat(parts), chunk
