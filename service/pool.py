"""Builds what computes for one model: its checkpoint, its pool of compute workers, the Batcher that feeds them and
its CertifyLane. The service's runtime (service/runtime.py) and the benchmarks' bare front end
(benchmarks/bare_front_end.py) both build their pools here, so a benchmark measures the pool the service runs.

Nothing here knows HTTP or metrics: where a pool reports (batch finished, queue depth, worker restarted, certify
request done) is a `PoolHooks` the caller passes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from models import LoadedModel, load_checkpoint, resolve_device

from .batcher import Batcher, BatchStats, Worker
from .certify import CertifyLane, CertifyResult
from .compute_process import ComputeProcess
from .config import ServiceSettings
from .predict import InlineWorker, PurifyRequest

log = logging.getLogger("service.pool")


@dataclass(frozen=True)
class PoolHooks:
    """Where a pool reports; each hook is called on the event loop (on_restart: in the worker's thread)."""

    on_batch: Callable[[BatchStats], None] | None = None
    on_depth: Callable[[int], None] | None = None
    on_restart: Callable[[int], None] | None = None  # the worker's index
    on_certify: Callable[[CertifyResult], None] | None = None
    on_certify_queue: Callable[[int], None] | None = None


@dataclass
class ModelPool:
    """One model's compute: the checkpoint (the parent's copy), its workers, their batcher, its certify lane (None
    when the checkpoint records no training noise σ) and which workers are warmed up."""

    name: str
    loaded: LoadedModel
    device: torch.device
    workers: list[Worker]
    batcher: Batcher
    certify: CertifyLane | None
    warm: set[int] = field(default_factory=set)  # indices of the workers that have been warmed up

    @property
    def ready(self) -> bool:
        return len(self.warm) == len(self.workers)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.loaded.meta.input_shape
        return c, h, w

    @property
    def warmup_request(self) -> PurifyRequest:
        """The purification a warm-up batch runs (the runtime's models: their default mode)."""
        return PurifyRequest()

    def warmup(self, worker: Worker) -> None:
        """(Re)start a worker, then one batch of zeros, so its first real batch pays no start-up, allocation or
        kernel-selection cost. The batcher runs it in its thread for that worker (Batcher.start)."""
        worker.start()
        worker.compute(torch.zeros((2, *self.input_shape)), self.warmup_request)
        self.warm.add(worker.index)
        log.info("model %s worker %d warmed up on %s", self.name, worker.index, self.device)


PoolT = TypeVar("PoolT", bound=ModelPool)


def build_pool(
    path: Path,
    settings: ServiceSettings,
    kind: type[PoolT],
    hooks: PoolHooks | None = None,
    *,
    certify: bool = True,
) -> PoolT:
    """The pool of the checkpoint at `path` as `settings` configure it (device, worker count and threads, batch size
    and delay, queue bound, certify lane), as a `kind` (ModelPool or a subclass). `certify=False` builds no lane."""
    hooks = hooks or PoolHooks()
    device = resolve_device(settings.device)
    # With compute processes the parent's copy of the model only answers metadata and the demo's attacks: it stays on
    # the CPU, so the parent never opens a CUDA context of its own next to the children's.
    loaded = load_checkpoint(path, torch.device("cpu") if settings.compute_process else device)
    workers = _workers(path, loaded, device, settings, hooks.on_restart)
    batcher = Batcher(
        path.name,
        workers,
        settings.max_batch_size,
        settings.max_delay_ms / 1000.0,
        settings.max_queue,
        on_batch=hooks.on_batch,
        on_depth=hooks.on_depth,
    )
    lane = _certify_lane(path.name, loaded, device, settings, batcher, hooks) if certify else None
    return kind(path.name, loaded, device, workers, batcher, lane)


def _workers(
    path: Path,
    loaded: LoadedModel,
    device: torch.device,
    settings: ServiceSettings,
    on_restart: Callable[[int], None] | None,
) -> list[Worker]:
    count = settings.pool_size(cuda=device.type == "cuda")
    if not settings.compute_process:
        return [InlineWorker(loaded, i, settings.acceleration) for i in range(count)]

    def restarted(index: int) -> Callable[[], None] | None:
        return None if on_restart is None else lambda: on_restart(index)

    return [
        ComputeProcess(
            path.resolve(),
            device,
            settings.compute_threads,
            i,
            settings.compute_nice,
            settings.acceleration,
            on_restart=restarted(i),
        )
        for i in range(count)
    ]


def _certify_lane(
    name: str,
    loaded: LoadedModel,
    device: torch.device,
    settings: ServiceSettings,
    batcher: Batcher,
    hooks: PoolHooks,
) -> CertifyLane | None:
    sigma = loaded.meta.training_noise_std
    if sigma is None:
        return None
    network = loaded.network
    if next(network.parameters()).device != device:
        # Compute processes keep the parent's copy on the CPU; certification is thousands of forward passes per
        # image, so on a GPU deployment the lane gets its own copy on the device (children are spawned, so the
        # parent's CUDA context is safe for them).
        network = copy.deepcopy(network).to(device).eval()
    return CertifyLane(
        name,
        network,
        sigma,
        loaded.meta.noise_clamp,
        settings.max_certify_queue_samples,
        settings.certify_slice_samples,
        settings.certify_share,
        settings.certify_batch,
        purification_waiting=lambda: batcher.depth > 0,
        on_done=hooks.on_certify,
        on_queue=hooks.on_certify_queue,
    )
