"""The one request path of POST /classify and POST /v2/models/{name}/infer: read -> decode -> submit -> await -> encode.

Each protocol is a `Front` (service/routes/classify.py, service/routes/open_inference.py): it reads its request
into a `Job` (the model, the work asked of it, the encoded images or the pixels, and whatever its answer needs) and
encodes the result in its own format. Everything between is here, once: the API key, the tracing spans (classify
with children read, decode, queue_wait, compute, encode), the image-count and queue-room refusals before decoding,
the decode policy, the submit to the model's ComputeQueue (its purification Batcher or its CertifyLane) under the
request's deadline, the disconnect watch, and the errors every way of failing becomes. So the two protocols answer
the same fault with the same error and count it in the same metrics.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import anyio
import torch
from fastapi import Request
from fastapi.responses import Response
from PIL import Image
from starlette.types import Receive

from .auth import require_api_key
from .batch_images import ImageFiles, RequestImages
from .batcher import BatchFailed, ClientGone, DeadlineExceeded, ImageUndecodable, ItemResult, QueueFull, ShuttingDown
from .certify import DEFAULT_ALPHA, CertifyRequest, CertifyResult
from .compute_queue import ComputeQueue, TicketT
from .config import ServiceSettings
from .decode import ImageRejected, decode_opened, open_image
from .dependencies import runtime_of
from .errors import (
    ServiceError,
    bad_image,
    bad_options,
    batch_failed,
    client_gone,
    deadline_exceeded,
    model_unavailable,
    queue_full,
    shutting_down,
    too_many_images,
)
from .predict import PurifyRequest
from .runtime import ModelRuntime, ServiceRuntime
from .schemas import ClassifyOptions

# Images up to this many pixels decode in the compute process (a purification) or on the event loop (a
# certification; tens of microseconds); larger ones in a thread, at most ServiceRuntime.decode_threads at once,
# which bounds the memory a burst of huge images can take.
_INLINE_DECODE_PIXELS = 256 * 256
# A queued request's disconnect watcher (a task per request, ~30 µs of event loop: ablation at 64 clients) starts only
# once it has waited this long; most requests are answered sooner, and one whose client left meanwhile costs at most
# this much queue time before it is dropped.
_WATCH_DISCONNECT_AFTER_S = 0.1

DEFAULT_OPTIONS = ClassifyOptions()  # a request that names no option shares this one (validating nothing costs ~20 µs)
Work = PurifyRequest | CertifyRequest
Result = ItemResult | CertifyResult
AnswerT = TypeVar("AnswerT")
AnswerT_co = TypeVar("AnswerT_co")


@dataclass(slots=True)
class Job(Generic[AnswerT]):
    """One request, read: which model, what work, its inputs (encoded image files to decode, or a [N, C, H, W]
    float batch), and what its protocol needs to answer (its options, the outputs asked for)."""

    model: ModelRuntime
    work: Work
    inputs: list[bytes] | torch.Tensor
    answer: AnswerT


class Front(Protocol[AnswerT]):
    """A protocol's two ends of the pipeline."""

    async def read(self, request: Request, runtime: ServiceRuntime) -> Job[AnswerT]:
        """Body and options into a Job; sets request.scope["soap.model"] as soon as the model is known."""
        ...

    def respond(self, request: Request, job: Job[AnswerT], result: Result, started: float) -> Response:
        """The answer (`started`: time.perf_counter() when the request reached the pipeline)."""
        ...


async def serve(request: Request, front: Front[Any]) -> Response:
    """Serve one inference request of either protocol (see the module docstring)."""
    started = time.perf_counter()
    runtime = runtime_of(request)
    tracing = runtime.tracing
    with tracing.span("classify", request_id=request.scope["soap.request_id"]):
        await require_api_key(request)  # called directly: FastAPI's dependency machinery costs more per request
        with tracing.span("read"):
            job = await front.read(request, runtime)
        model = job.model
        request.scope["soap.model"] = model.name
        count = len(job.inputs)
        if count > runtime.settings.max_images_per_request:
            raise too_many_images(runtime.settings.max_images_per_request, count, model.name)
        purify = isinstance(job.work, PurifyRequest)
        if purify and not model.batcher.has_room(count):  # refuse before decoding (the middleware could not)
            raise full_queue(model)
        with tracing.span("decode", images=count):
            batch = await decode_all(job.inputs, model, runtime, defer_small=purify)
        if isinstance(job.work, PurifyRequest):
            result: Result = await purify_batch(request, runtime, model, batch, job.work)
        else:
            assert isinstance(batch, torch.Tensor)  # (nothing is deferred for a certification)
            result = await certify_batch(request, runtime, model, batch, job.work)
        if tracing.enabled:  # measured for the whole batch; the batch ended just now
            tracing.record("queue_wait", result.compute_s + result.queue_s, result.compute_s, model=model.name)
            batch_images = result.batch_images if isinstance(result, ItemResult) else count
            tracing.record("compute", result.compute_s, 0.0, model=model.name, batch_images=batch_images)
        with tracing.span("encode"):
            return front.respond(request, job, result, started)


def work_for(options: ClassifyOptions, model: ModelRuntime, settings: ServiceSettings) -> Work:
    """What validated options ask of the model: a purification (its mode and budget, refused by the runtime if the
    model does not serve them) or, for mode=certify, a certification within the server's limits."""
    if options.mode != "certify":
        return model.purify_request(options.mode, options.epsilon)
    if model.certify is None:
        raise bad_options(
            f"option mode=certify is not served by model {model.name}: its checkpoint records no training noise σ",
            model.name,
        )
    samples = options.samples if options.samples is not None else settings.default_certify_samples
    if samples > settings.max_certify_samples:
        raise bad_options(
            f"option samples={samples} is above this server's limit; allowed: 1 to {settings.max_certify_samples} "
            "(the server's --max-certify-samples)",
            model.name,
        )
    return CertifyRequest(samples, options.alpha if options.alpha is not None else DEFAULT_ALPHA, options.seed)


# ------------------------------------------------------------------------------------------------ decode


async def decode_all(
    inputs: list[bytes] | torch.Tensor, model: ModelRuntime, runtime: ServiceRuntime, *, defer_small: bool = False
) -> RequestImages:
    """The decode step: encoded image files to a [N, C, H, W] batch of the model's input shape, or pixels checked;
    422 for a bad image. Every file's header is checked here (format, size, frames). With `defer_small` (a
    purification), a request whose images are all small is queued as its files, header-checked: their pixels are
    decoded in the compute process (service/batch_images.py says why)."""
    if isinstance(inputs, torch.Tensor):
        if not bool(torch.isfinite(inputs).all()) or inputs.min() < 0.0 or inputs.max() > 1.0:
            raise bad_image("pixel values must be finite and in [0, 1]", model.name)
        return inputs
    sources = [_opened(data, index, len(inputs), model, runtime) for index, data in enumerate(inputs)]
    if defer_small and all(source.width * source.height <= _INLINE_DECODE_PIXELS for source in sources):
        for source in sources:
            source.close()
        return ImageFiles(tuple(inputs), model.input_shape, runtime.decode_limits)
    images: list[torch.Tensor] = []
    for index, source in enumerate(sources):
        try:
            if source.width * source.height <= _INLINE_DECODE_PIXELS:
                images.append(decode_opened(source, model.input_shape))
            else:
                images.append(
                    await anyio.to_thread.run_sync(
                        decode_opened, source, model.input_shape, limiter=runtime.decode_threads
                    )
                )
        except ImageRejected as exc:
            for rest in sources[index + 1 :]:
                rest.close()
            raise bad_image(_where(index, len(inputs)) + exc.detail, model.name) from None
    return images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)


def _where(index: int, count: int) -> str:
    return f"image {index}: " if count > 1 else ""


def _opened(data: bytes, index: int, count: int, model: ModelRuntime, runtime: ServiceRuntime) -> Image.Image:
    try:
        return open_image(data, runtime.decode_limits, model.input_shape)
    except ImageRejected as exc:
        raise bad_image(_where(index, count) + exc.detail, model.name) from None


# ------------------------------------------------------------------------------------------------ submit and await


def full_queue(model: ModelRuntime) -> ServiceError:
    batcher = model.batcher
    return queue_full(model.name, f"{batcher.depth} images queued (limit {batcher.max_queue})", batcher.retry_after_s())


async def purify_batch(
    request: Request, runtime: ServiceRuntime, model: ModelRuntime, batch: RequestImages, work: PurifyRequest
) -> ItemResult:
    """Queue `batch` on the model's batcher under the request's deadline and wait for its rows; every way this can
    fail becomes a ServiceError (503, 504, 499, 500, and 422 for a file whose pixels the worker could not decode)."""
    deadline = time.monotonic() + runtime.settings.request_timeout_s
    try:
        item = model.batcher.submit(batch, work, deadline, request.scope["soap.request_id"])
    except QueueFull:
        raise full_queue(model) from None
    except ShuttingDown:
        raise (shutting_down() if runtime.draining else model_unavailable(model.name)) from None
    result: ItemResult = await _await_result(request, runtime, model, model.batcher, item)
    return result


async def certify_batch(
    request: Request, runtime: ServiceRuntime, model: ModelRuntime, batch: torch.Tensor, work: CertifyRequest
) -> CertifyResult:
    """Queue `batch` on the model's certify lane under the request's deadline and wait for its certificates."""
    lane = model.certify
    if lane is None:  # work_for refused the request already
        raise RuntimeError(f"model {model.name} has no certify lane")
    deadline = time.monotonic() + runtime.settings.request_timeout_s
    try:
        job = lane.submit(batch, work, deadline, request.scope["soap.request_id"])
    except QueueFull as exc:
        queued = f"{lane.queued_samples} forward passes queued in its certify lane (limit {lane.max_queue_samples})"
        raise queue_full(model.name, queued, exc.retry_after_s) from None
    except ShuttingDown:
        raise shutting_down() from None
    result: CertifyResult = await _await_result(request, runtime, model, lane, job)
    return result


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so only http.disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _await_result(
    request: Request,
    runtime: ServiceRuntime,
    model: ModelRuntime,
    queue: ComputeQueue[Any, TicketT],
    ticket: TicketT,
) -> Any:
    """Wait for the ticket's result. While it is still queued, its queue ends it with DeadlineExceeded at its
    deadline (-> 504) and, from _WATCH_DISCONNECT_AFTER_S on, a disconnect watcher with ClientGone (-> 499, dropped
    before compute). Once its compute runs, the result comes whatever happens. (A plain await on the future:
    asyncio.wait with a timeout per request cost more event-loop time than the rest of the request path.)"""
    watcher: asyncio.Future[None] | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_client_gone(request.receive))
        watcher.add_done_callback(lambda w: None if w.cancelled() else queue.cancel(ticket, ClientGone()))

    timer = asyncio.get_running_loop().call_later(_WATCH_DISCONNECT_AFTER_S, watch)
    try:
        return await ticket.future
    except DeadlineExceeded:
        raise deadline_exceeded(model.name, runtime.settings.request_timeout_s) from None
    except ClientGone:
        raise client_gone(model.name) from None
    except BatchFailed as exc:  # this batch only; the message names the exception type, no internals
        raise batch_failed(model.name, str(exc)) from None
    except ImageUndecodable as exc:  # its header passed here, its pixels failed in the worker
        raise bad_image(_where(exc.row, exc.count) + exc.detail, model.name) from None
    except asyncio.CancelledError:  # the server cancelled the handler: do not compute for nobody
        queue.cancel(ticket)
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
