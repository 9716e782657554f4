"""What a running service holds: its settings, metrics and, per model, the loaded network and its batcher.

`create_app` puts one ServiceRuntime on `app.state.runtime`. Other parts of the app (the demo page) reach the
models through it:

    runtime = request.app.state.runtime
    model = runtime.get(name)          # ModelRuntime; name None -> the default model; unknown -> 404 ServiceError
    model.loaded                       # models.LoadedModel (network in eval mode, meta, path)
    model.batcher                      # service.batcher.Batcher (submit work like POST /classify does)
    model.workers                      # its compute pool: ComputeProcess children, or one InlineWorker
    runtime.settings                   # service.config.ServiceSettings (e.g. enable_attack)
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models import LoadedModel, Mode, load_checkpoint, resolve_device

from .batcher import Batcher, BatchStats, Worker
from .certify import CertifyLane, CertifyResult
from .compute_process import ComputeProcess
from .config import ServiceSettings
from .errors import ServiceError
from .metrics import ServiceMetrics
from .predict import InlineWorker, Predictions, PurifyRequest
from .process_metrics import ProcessCollector, ProcessTarget
from .tracing import RequestTracing

log = logging.getLogger("service.runtime")


@dataclass
class ModelRuntime:
    """One served model: the checkpoint, its compute workers and batcher, and which workers are warmed up."""

    name: str
    loaded: LoadedModel
    device: torch.device
    workers: list[Worker]
    batcher: Batcher = field(init=False)
    certify: CertifyLane | None = None  # mode=certify; None when the checkpoint records no training noise σ
    warm: set[int] = field(default_factory=set)  # indices of the workers that have been warmed up

    @property
    def ready(self) -> bool:
        return len(self.warm) == len(self.workers)

    @functools.cached_property
    def max_budget(self) -> float:
        """The largest purification budget. Checked on every request: `loaded.purifier` builds its config anew."""
        return self.loaded.purifier.max_budget

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.loaded.meta.input_shape
        return c, h, w

    @property
    def class_names(self) -> list[str]:
        return self.loaded.meta.class_names

    @property
    def suspicious_threshold(self) -> float:
        calibration = self.loaded.meta.calibration
        return calibration.suspicious_threshold if calibration is not None else math.inf

    @property
    def purifies(self) -> bool:
        """Whether purification means anything for this model: its auxiliary head was trained (checkpoint field)."""
        return self.loaded.meta.aux_head_trained

    @property
    def modes(self) -> tuple[Mode, ...]:
        """The purification modes this model serves: all of them, or only "none" when its auxiliary head is
        untrained (descending an untrained loss moves images along noise: a baseline answered 8 for a clean 7)."""
        return tuple(Mode) if self.purifies else (Mode.NONE,)

    @property
    def default_mode(self) -> Mode:
        return Mode.MIN_AUX if self.purifies else Mode.NONE

    def purify_request(self, mode: Mode | None, epsilon: float | None) -> PurifyRequest:
        """What a request asks of this model's batches (mode None: the model's default); 422 ServiceError for a mode
        the model does not serve or a budget beyond its grid."""
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ServiceError(
                422,
                "purification_unavailable",
                f"model {self.name} does not serve mode {mode}: its auxiliary head was not trained "
                f"(training recipe without the auxiliary loss), so purification would only add noise; "
                f"use mode=none or a SOAP-trained model",
                reason="bad_options",
                model=self.name,
            )
        max_budget = self.max_budget
        if epsilon is not None and epsilon > max_budget + 1e-9:
            raise ServiceError(
                422,
                "bad_options",
                f"epsilon {epsilon} exceeds model {self.name}'s largest budget {max_budget:g}",
                reason="bad_options",
                model=self.name,
            )
        return PurifyRequest(mode, epsilon)

    def compute(self, images: torch.Tensor, request: PurifyRequest) -> Predictions:
        """The predict step for one batch on the first worker, outside the batcher (tools and tests)."""
        return self.workers[0].compute(images, request)

    def warmup(self, worker: Worker) -> None:
        """(Re)start a worker, then one batch of zeros in the model's default mode, so its first real batch pays no
        start-up, allocation or kernel-selection cost. Runs in the batcher's thread for that worker."""
        worker.start()
        worker.compute(torch.zeros((2, *self.input_shape)), PurifyRequest(self.default_mode))
        self.warm.add(worker.index)
        log.info("model %s worker %d warmed up on %s", self.name, worker.index, self.device)


class ServiceRuntime:
    """Settings, metrics and the served models; lifecycle of their batchers; readiness and draining."""

    def __init__(
        self, settings: ServiceSettings, metrics: ServiceMetrics | None = None, tracing: RequestTracing | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.tracing = tracing or RequestTracing()
        self.api_key = settings.api_key  # raises now if --api-key-env names an empty variable
        self.device = resolve_device(settings.device)
        self.models: dict[str, ModelRuntime] = {}
        # With compute processes the parent's copy of each model only answers metadata and the demo's attacks: it
        # stays on the CPU, so the parent never opens a CUDA context of its own next to the children's.
        home = torch.device("cpu") if settings.compute_process else self.device
        workers = settings.pool_size(cuda=self.device.type == "cuda")
        for path in settings.models:
            loaded = load_checkpoint(path, home)
            restarts = [self.metrics.compute_restarts.labels(path.name, str(i)) for i in range(workers)]
            pool: list[Worker] = (
                [
                    ComputeProcess(
                        path.resolve(),
                        self.device,
                        settings.compute_threads,
                        i,
                        settings.compute_nice,
                        settings.acceleration,
                        on_restart=restarts[i].inc,
                    )
                    for i in range(workers)
                ]
                if settings.compute_process
                else [InlineWorker(loaded, i, settings.acceleration) for i in range(workers)]
            )
            self.models[path.name] = ModelRuntime(path.name, loaded, self.device, pool)
        self.default = settings.model_names[0]
        self.draining = False
        self._started = False
        for model in self.models.values():
            model.batcher = self._make_batcher(model)
            model.certify = self._make_certify_lane(model)
            meta = model.loaded.meta
            self.metrics.model_info.labels(model.name, meta.network, meta.dataset, meta.aux_task, str(self.device)).set(
                1
            )
            self.metrics.declare_model(model.name, tuple(Mode))
        self.metrics.ready.set(0)
        self.metrics.registry.register(ProcessCollector(self.processes))

    def processes(self) -> list[ProcessTarget]:
        """The server and its live compute children, for the per-process metrics."""
        targets = [ProcessTarget(os.getpid(), "server")]
        for model in self.models.values():
            for worker in model.workers:
                pid = worker.pid if isinstance(worker, ComputeProcess) else None
                if pid is not None:
                    targets.append(ProcessTarget(pid, "compute", model.name, str(worker.index)))
        return targets

    def _make_batcher(self, model: ModelRuntime) -> Batcher:
        s = self.settings
        depth = self.metrics.queue_depth.labels(model.name)
        return Batcher(
            model.name,
            model.workers,
            s.max_batch_size,
            s.max_delay_ms / 1000.0,
            s.max_queue,
            on_batch=lambda stats: self._record_batch(model, stats),
            on_depth=depth.set,
        )

    def _make_certify_lane(self, model: ModelRuntime) -> CertifyLane | None:
        sigma = model.loaded.meta.training_noise_std
        if sigma is None:
            return None
        s = self.settings
        network = model.loaded.network
        if next(network.parameters()).device != self.device:
            # Compute processes keep the parent's copy on the CPU; certification is thousands of forward passes per
            # image, so on a GPU deployment the lane gets its own copy on the device (children are spawned, so the
            # parent's CUDA context is safe for them).
            network = copy.deepcopy(network).to(self.device).eval()
        return CertifyLane(
            model.name,
            network,
            sigma,
            s.max_certify_queue_samples,
            s.certify_slice_samples,
            s.certify_share,
            s.certify_batch,
            purification_waiting=lambda: model.batcher.depth > 0,
            on_done=lambda result: self._record_certify(model, result),
            on_queue=self.metrics.certify_queue.labels(model.name).set,
        )

    # ------------------------------------------------------------------ lookups

    def get(self, name: str | None) -> ModelRuntime:
        """The model called `name` (the default one for None); 404 ServiceError if there is none."""
        key = self.default if name is None else name
        try:
            return self.models[key]
        except KeyError:
            raise ServiceError(
                404, "unknown_model", f"no model named {name!r}; loaded: {sorted(self.models)}"
            ) from None

    def metrics_label(self, name: str | None) -> str:
        """A bounded label for metrics: a loaded model's name, else 'unknown'."""
        key = self.default if name is None else name
        return key if key in self.models else "unknown"

    @property
    def ready(self) -> bool:
        return self._started and not self.draining and all(m.ready and m.batcher.running for m in self.models.values())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every batcher; each warms its model's workers up, each in its own thread, before taking work."""
        for model in self.models.values():
            model.batcher.start(self._warmup_then_report(model))
            if model.certify is not None:
                model.certify.start()
        self._started = True

    def _warmup_then_report(self, model: ModelRuntime) -> Callable[[Worker], None]:
        def run(worker: Worker) -> None:
            model.warmup(worker)
            self.metrics.ready.set(1 if self.ready else 0)

        return run

    def begin_drain(self) -> bool:
        """Stop being ready and refuse new requests; accepted ones still finish. True on the first call."""
        first = not self.draining
        self.draining = True
        self.metrics.ready.set(0)
        for model in self.models.values():
            model.batcher.drain()
            if model.certify is not None:
                model.certify.drain()
        return first

    async def stop(self) -> None:
        """Finish everything queued, then stop the workers."""
        self.begin_drain()
        await asyncio.gather(*(m.batcher.close() for m in self.models.values()))
        await asyncio.gather(*(m.certify.close() for m in self.models.values() if m.certify is not None))
        for model in self.models.values():
            for worker in model.workers:
                worker.close()

    # ------------------------------------------------------------------ metrics

    def _record_batch(self, model: ModelRuntime, stats: BatchStats) -> None:
        m, name = self.metrics, model.name
        m.batch_size.labels(name).observe(stats.size)
        m.batch_compute.labels(name).observe(stats.compute_s)
        wait = m.queue_wait.labels(name)
        for seconds in stats.queue_waits:
            wait.observe(seconds)
        p = stats.predictions
        if p is None:
            m.batch_failures.labels(name).inc()
            return
        m.images.labels(name, stats.request.mode).inc(len(p))
        eps, before, after = m.epsilon.labels(name), m.aux_before.labels(name), m.aux_after.labels(name)
        threshold = model.suspicious_threshold
        suspicious = 0
        for e, b, a in zip(p.epsilon.tolist(), p.aux_before.tolist(), p.aux_after.tolist(), strict=True):
            eps.observe(e)
            before.observe(b)
            after.observe(a)
            suspicious += b > threshold
        if suspicious:
            m.suspicious.labels(name).inc(suspicious)

    def _record_certify(self, model: ModelRuntime, result: CertifyResult) -> None:
        m, name = self.metrics, model.name
        m.certify_requests.labels(name).inc()
        m.certify_compute.labels(name).observe(result.compute_s)
        radius = m.certified_radius.labels(name)
        for cert in result.certificates:
            m.certify_images.labels(name, "abstained" if cert.abstained else "certified").inc()
            if cert.radius is not None:
                radius.observe(cert.radius)
