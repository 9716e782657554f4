"""What a running service holds: its settings, metrics, tracing and, per model, its pool (service/pool.py) and the
serving policy on top of it (modes, budgets, classes); readiness and draining; the domain errors it raises
(`Refused`: an unknown model, a mode or budget the model does not serve), which the HTTP layer maps.

`create_app` puts one ServiceRuntime on `app.state.runtime`; routes reach it typed through
`service.dependencies.runtime_of(request)`:

    runtime = runtime_of(request)
    model = runtime.get(name)          # ModelRuntime; name None -> the default model; unknown -> UnknownModel
    model.loaded                       # models.LoadedModel (network in eval mode, meta, path)
    model.batcher                      # service.batcher.Batcher (a ComputeQueue; service/pipeline.py submits to it)
    model.workers                      # its compute pool: ComputeProcess children, or InlineWorkers
    runtime.settings                   # service.config.ServiceSettings (e.g. enable_attack)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Callable

import anyio
import numpy
import torch

from models import Mode, resolve_device

from .batcher import BatchStats, Worker
from .certify import CertifyResult
from .compute_process import ComputeProcess
from .config import ServiceSettings
from .decode import DecodeLimits
from .metrics import ServiceMetrics
from .pool import ModelPool, PoolHooks, build_pool
from .predict import Predictions, PurifyRequest
from .process_metrics import ProcessCollector, ProcessTarget, fork_server_pid
from .tracing import RequestTracing

log = logging.getLogger("service.runtime")
DECODE_THREADS = 4  # large images decode in threads, at most this many at once (bounds a burst's memory)


class Refused(Exception):
    """A request the runtime refuses. The HTTP layer (service/error_handlers.py) maps each kind to its answer; the
    runtime knows no status codes."""


class UnknownModel(Refused, LookupError):
    def __init__(self, name: str | None, loaded: list[str]) -> None:
        super().__init__(f"no model named {name!r}")
        self.name = name
        self.loaded = loaded


class ModeUnavailable(Refused):
    """A purification mode the model does not serve (its auxiliary head is untrained)."""

    def __init__(self, model: str, mode: Mode) -> None:
        super().__init__(f"model {model} does not serve mode {mode}")
        self.model = model
        self.mode = mode


class BudgetTooLarge(Refused):
    """A fixed purification budget beyond the model's largest."""

    def __init__(self, model: str, epsilon: float, max_budget: float) -> None:
        super().__init__(
            f"option epsilon={epsilon:g} is above model {model}'s largest budget; allowed: 0 to {max_budget:g}"
        )
        self.model = model
        self.epsilon = epsilon
        self.max_budget = max_budget


@functools.lru_cache(maxsize=4096)  # twice per image (answer and metric); the grid's few values repeat
def as_written(value: float) -> float:
    """A budget as its decimal is written: the shortest decimal that a float32 of it rounds back to, as a float64
    (0.05 for the float32 0.0500000007 of a grid value, 0.15 for the grid's 3 * 0.05 = 0.15000000000000002), so that
    answers say 0.05 and the ε histogram counts 0.05 in its le="0.05" bucket."""
    return float(str(numpy.float32(value)))


class ModelRuntime(ModelPool):
    """One served model: its pool (service/pool.py) and what the model serves (modes, budgets, classes, threshold)."""

    @functools.cached_property
    def max_budget(self) -> float:
        """The largest purification budget. Checked on every request: `loaded.purifier` builds its config anew."""
        return self.loaded.purifier.max_budget

    @functools.cached_property
    def budgets(self) -> list[float]:
        """The purification budget grid as its values are written (0.15, not 0.15000000000000002)."""
        return [as_written(b) for b in self.loaded.purifier.budgets()]

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

    @property
    def warmup_request(self) -> PurifyRequest:
        return PurifyRequest(self.default_mode)

    def purify_request(self, mode: Mode | None, epsilon: float | None) -> PurifyRequest:
        """What a request asks of this model's batches (mode None: the model's default). Raises ModeUnavailable for a
        mode the model does not serve, BudgetTooLarge for a budget beyond its grid."""
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ModeUnavailable(self.name, mode)
        max_budget = self.max_budget
        if epsilon is not None and epsilon > max_budget + 1e-9:
            raise BudgetTooLarge(self.name, epsilon, max_budget)
        return PurifyRequest(mode, epsilon)

    def compute(self, images: torch.Tensor, request: PurifyRequest) -> Predictions:
        """The predict step for one batch on the first worker, outside the batcher (tools and tests)."""
        return self.workers[0].compute(images, request)


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
        self.decode_limits = DecodeLimits(settings.max_image_pixels, settings.max_image_side)
        self.decode_threads = anyio.CapacityLimiter(DECODE_THREADS)
        self.models: dict[str, ModelRuntime] = {
            path.name: build_pool(path, settings, ModelRuntime, self._hooks(path.name)) for path in settings.models
        }
        self.default = settings.model_names[0]
        self.draining = False
        self._started = False
        for model in self.models.values():
            meta = model.loaded.meta
            self.metrics.model_info.labels(model.name, meta.network, meta.dataset, meta.aux_task, str(self.device)).set(
                1
            )
            self.metrics.declare_model(model.name, tuple(Mode))
            for worker in model.workers:
                self.metrics.compute_restarts.labels(model.name, str(worker.index))
        self.metrics.ready.set(0)
        self.metrics.registry.register(ProcessCollector(self.processes))

    def _hooks(self, name: str) -> PoolHooks:
        """The pool of model `name` reports into the service's metrics."""
        m = self.metrics
        return PoolHooks(
            on_batch=lambda stats: self._record_batch(self.models[name], stats),
            on_depth=m.queue_depth.labels(name).set,
            on_restart=lambda index: m.compute_restarts.labels(name, str(index)).inc(),
            on_certify=lambda result: self._record_certify(self.models[name], result),
            on_certify_queue=m.certify_queue.labels(name).set,
        )

    def processes(self) -> list[ProcessTarget]:
        """The server, its fork server and its live compute children, for the per-process metrics."""
        targets = [ProcessTarget(os.getpid(), "server")]
        fork_server = fork_server_pid()
        if fork_server is not None:
            targets.append(ProcessTarget(fork_server, "fork_server"))
        for model in self.models.values():
            for worker in model.workers:
                pid = worker.pid if isinstance(worker, ComputeProcess) else None
                if pid is not None:
                    targets.append(ProcessTarget(pid, "compute", model.name, str(worker.index)))
        return targets

    # ------------------------------------------------------------------ lookups

    def get(self, name: str | None) -> ModelRuntime:
        """The model called `name` (the default one for None); UnknownModel if there is none."""
        key = self.default if name is None else name
        try:
            return self.models[key]
        except KeyError:
            raise UnknownModel(name, sorted(self.models)) from None

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
        m.images.labels(name, stats.request.mode).inc(len(p) - len(p.rejected))
        eps, before, after = m.epsilon.labels(name), m.aux_before.labels(name), m.aux_after.labels(name)
        threshold = model.suspicious_threshold
        suspicious = 0
        for row, (e, b, a) in enumerate(zip(p.epsilon_listed, p.aux_before_listed, p.aux_after_listed, strict=True)):
            if p.rejected and row in p.rejected:  # an undecodable file: its row is a blank image's, no answer
                continue
            eps.observe(as_written(e))
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
