"""Certified predictions (mode=certify): randomized smoothing in its own lane beside the purification batcher.

A certify request of n samples costs n + n0 forward passes per image, thousands of times a purification, so it
does not go through the micro-batcher (one such request would hold the worker for seconds and every min-aux
request queued behind it would miss its deadline). Policy, per model:

- Certify requests wait FIFO in their own queue, bounded in forward passes (`max_certify_queue_samples`;
  beyond -> 503 with Retry-After), and run one at a time in a dedicated thread.
- A request runs in slices of at most `certify_slice_samples` noise samples per image. After a slice, if the
  purification batcher has images queued, the lane pauses so that certification takes at most `certify_share`
  of the time while purification has work (a slice of t seconds is followed by t·(1/share − 1) seconds of pause).
  Purification therefore waits at most one slice and keeps ≥ 1 − share of the lane's time; certification always
  progresses at ≥ share of it, so neither starves the other.
- The deadline (`request_timeout_s`) applies to the start of a request's first slice, as for purification.

The lane runs the model in the service's own process, on the service's device: with compute processes on a GPU
the lane keeps its own copy of the network there (the parent's other copy stays on the CPU). Every image's noise
comes from its own generator (seed + index), so an answer depends only on the image, the request's seed and the
settings: it can be reproduced offline with `models.smoothing.certify` (the test suite checks that).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from models import SoapNetwork
from models.smoothing import Certificate, SmoothingConfig, certificates, generators, noisy_classifier, sample_counts

from .batcher import BatchFailed, DeadlineExceeded, QueueFull, ShuttingDown

log = logging.getLogger("service.certify")


DEFAULT_ALPHA = 0.001  # a request's failure probability when it names none (Cohen et al.'s)
SELECTION_SAMPLES = 100  # n0: the noise samples that pick the top class before the n that estimate p_A


@dataclass(frozen=True)
class CertifyRequest:
    """What one certify request asks for: n estimation samples per image, the level α, the seed."""

    samples: int
    alpha: float = DEFAULT_ALPHA
    seed: int = 0
    n0: int = SELECTION_SAMPLES

    @property
    def forward_passes(self) -> int:
        """Forward passes per image."""
        return self.n0 + self.samples


@dataclass
class CertifyJob:
    images: torch.Tensor
    request: CertifyRequest
    deadline: float
    future: asyncio.Future[CertifyResult]
    request_id: str = ""
    enqueued_at: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running, or queued -> cancelled

    @property
    def cost(self) -> int:
        return self.images.shape[0] * self.request.forward_passes


@dataclass
class CertifyResult:
    certificates: list[Certificate]
    queue_s: float
    compute_s: float
    paused_s: float


class CertifyLane:
    """Queue + one worker thread for one model's certify requests (a compute_queue.ComputeQueue of CertifyRequests).
    Create and use it inside a running loop."""

    def __init__(
        self,
        name: str,
        network: SoapNetwork,
        sigma: float,
        clamp: bool,
        max_queue_samples: int,
        slice_samples: int,
        share: float,
        batch_size: int,
        purification_waiting: Callable[[], bool],
        on_done: Callable[[CertifyResult], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"certify share must be in (0, 1], got {share}")
        self.name = name
        self.base = noisy_classifier(network)
        self.device = next(network.parameters()).device  # the service's device, also with compute processes
        self.num_classes = network.num_classes
        self.sigma = sigma
        self.clamp = clamp  # the base classifier's noisy input is clamped to [0, 1], as the model was trained
        self.max_queue_samples = max_queue_samples
        self.batch_size = batch_size
        self.slice_samples = max(batch_size, slice_samples // batch_size * batch_size)  # whole pieces: see below
        self.share = share
        self._purification_waiting = purification_waiting
        self._on_done = on_done or (lambda result: None)
        self._on_queue = on_queue or (lambda samples: None)
        self._queue: collections.deque[CertifyJob] = collections.deque()
        self._queued = 0
        self._closing = False
        self._stop = threading.Event()  # wakes a pausing worker at shutdown
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"soap-certify-{name}")
        self._seconds_per_pass = 0.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ request side (event loop)

    @property
    def queued_samples(self) -> int:
        """Forward passes waiting (not yet running)."""
        return self._queued

    @queued_samples.setter
    def queued_samples(self, value: int) -> None:
        self._queued = value
        self._on_queue(value)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.queued_samples * self._seconds_per_pass))

    def config(self, request: CertifyRequest) -> SmoothingConfig:
        return SmoothingConfig(
            sigma=self.sigma,
            n0=request.n0,
            n=request.samples,
            alpha=request.alpha,
            batch_size=self.batch_size,
            clamp=self.clamp,
        )

    def submit(
        self, images: torch.Tensor, request: CertifyRequest, deadline: float, request_id: str = ""
    ) -> CertifyJob:
        """Queue a request's images (a ComputeQueue, as the purification Batcher), or raise QueueFull / ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        job = CertifyJob(images, request, deadline, asyncio.get_running_loop().create_future(), request_id)
        if self.queued_samples and self.queued_samples + job.cost > self.max_queue_samples:  # an empty queue takes any
            raise QueueFull(self.retry_after_s())
        self._queue.append(job)
        self.queued_samples += job.cost
        asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), self.cancel, job, DeadlineExceeded()
        )
        self._wake()
        return job

    def cancel(self, job: CertifyJob, error: BaseException | None = None) -> bool:
        """Take a still-queued job out (False once it runs: the result will come)."""
        if job.state != "queued":
            return False
        job.state = "cancelled"
        self._queue.remove(job)
        self.queued_samples -= job.cost
        if not job.future.done():
            if error is None:
                job.future.cancel()
            else:
                job.future.set_exception(error)
        return True

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._wakeup = wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(wakeup), name=f"certify-{self.name}")

    def drain(self) -> None:
        """Refuse new work; queued work still runs, without pausing for purification."""
        self._closing = True
        self._stop.set()
        self._wake()

    async def close(self) -> None:
        self.drain()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a failed worker was logged already
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------------ worker

    async def _run(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            job = self._queue.popleft()
            job.state = "running"
            self.queued_samples -= job.cost
            started = time.monotonic()
            try:
                certs, compute_s, paused_s = await loop.run_in_executor(self._executor, self._certify, job)
            except Exception as exc:  # noqa: BLE001 - this request only; the lane keeps going
                log.exception("certify request of %d images on model %s failed", job.images.shape[0], self.name)
                if not job.future.done():
                    job.future.set_exception(BatchFailed(f"certification failed ({type(exc).__name__})"))
                continue
            result = CertifyResult(certs, started - job.enqueued_at, compute_s, paused_s)
            passes = job.cost
            rate = compute_s / passes
            self._seconds_per_pass = 0.8 * self._seconds_per_pass + 0.2 * rate if self._seconds_per_pass else rate
            self._on_done(result)
            if not job.future.done():
                job.future.set_result(result)

    def _certify(self, job: CertifyJob) -> tuple[list[Certificate], float, float]:
        """CERTIFY in slices (runs in the lane's thread). Slices are whole multiples of the noise batch, so the
        generators see the same calls as one `models.smoothing.certify` and the answer is the same."""
        config = self.config(job.request)
        x = job.images.to(self.device)
        gens = generators(job.request.seed, x.shape[0])
        compute_s = paused_s = 0.0
        t0 = time.perf_counter()
        select = sample_counts(self.base, x, config.n0, self.sigma, self.num_classes, gens, self.batch_size, self.clamp)
        estimate = torch.zeros_like(select)
        compute_s += time.perf_counter() - t0
        done = 0
        while done < config.n:
            piece = min(self.slice_samples, config.n - done)
            t0 = time.perf_counter()
            estimate += sample_counts(
                self.base, x, piece, self.sigma, self.num_classes, gens, self.batch_size, self.clamp
            )
            slice_s = time.perf_counter() - t0
            compute_s += slice_s
            done += piece
            if done < config.n and not self._closing and self._purification_waiting():
                pause = slice_s * (1.0 / self.share - 1.0)
                self._stop.wait(pause)
                paused_s += pause
        return certificates(select, estimate, config), compute_s, paused_s
