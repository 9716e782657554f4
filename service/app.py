"""The FastAPI app: POST /classify as small steps (read -> decode -> batch -> predict -> encode), model info,
health, readiness and Prometheus metrics.

`create_app(settings)` loads every checkpoint onto the device (errors surface here, before serving), puts the
ServiceRuntime on `app.state.runtime` (see service/runtime.py for what the demo page can use) and the settings on
`app.state.settings`; the lifespan starts the batchers, which warm the models up; /readyz says 200 after that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import parse_qs, unquote

import anyio
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import PROTECTED, SECURITY, document_api_key, require_api_key
from .batcher import BatchFailed, ClientGone, DeadlineExceeded, ItemResult, QueueFull, ShuttingDown, WorkItem
from .certify import CertifyJob, CertifyRequest, CertifyResult
from .config import ServiceSettings
from .decode import DecodeLimits, ImageRejected, decode_opened, encode_png, open_image
from .errors import ServiceError, error_response, install_error_handlers, service_error_handler, validation_problems
from .ingest import ACCEPTED_TYPES, check_media_type, media_type, parse_upload, read_body
from .logs import REQUEST_ID
from .predict import PurifyRequest
from .runtime import ModelRuntime, ServiceRuntime
from .schemas import (
    ADAPTIVE_ATTACKS,
    BLIND_ATTACKS,
    RESULTS_PAGE,
    BatchingInfo,
    CertifyResponse,
    ClassifyOptions,
    ClassifyResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
    PurifierInfo,
    RobustnessInfo,
    image_upload_body,
    query_parameters,
)
from .tracing import make_tracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("service.app")
MODEL_CARD_FILE = "MODEL_CARD.md"  # next to the weights (training/model_card.py writes it)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_V2_INFER = re.compile(r"^/v2/models/([^/]+)/infer$")
# Images up to this many pixels decode on the event loop (tens of microseconds); larger ones in a thread,
# at most _DECODE_THREADS at once, which bounds the memory a burst of huge images can take.
_INLINE_DECODE_PIXELS = 256 * 256
# Not load: Prometheus' scrapes and the kubelet's probes would count as in-flight requests on an idle replica.
_UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
_DECODE_THREADS = 4
# A queued request's disconnect watcher (a task per request, ~30 µs of event loop: ablation at 64 clients) starts only
# once it has waited this long; most requests are answered sooner, and one whose client left meanwhile costs at most
# this much queue time before it is dropped.
_WATCH_DISCONNECT_AFTER_S = 0.1
# While draining, a refused request's body is read before the 503 (see _discard_body), but not for longer than this.
_DRAIN_BODY_TIMEOUT_S = 1.0


class RequestContext:
    """Pure ASGI middleware: request id (X-Request-ID, echoed or made), load shedding, request-duration metric by
    model, route template and status, a JSON 500 (no traceback) for anything unhandled, and the drain's part of a
    graceful shutdown (service/server.py): while draining, every response carries `Connection: close`, the one
    clean way to end a keep-alive connection, and every POST (all of them are work) gets 503 with Retry-After.

    Shedding happens here, before routing, parsing or reading the body: under overload a refusal must cost far
    less than a served request, or the refusals themselves become the overload.

    POST /classify, the hot path, is handed from here straight to its endpoint (`direct_routes`, filled by
    `_add_routes`): the router and the framework's per-request layers below this one cost about a fifth of the
    event loop's time per request under load (py-spy, docs/performance.md), and the endpoint needs none of them
    (no dependencies, no body model; its errors are ServiceErrors, answered by the same handler). The route stays
    registered for the OpenAPI document and for every other method (405).
    """

    def __init__(self, app: ASGIApp, runtime: ServiceRuntime, direct_routes: dict[str, DirectEndpoint]) -> None:
        self.app = app
        self.runtime = runtime
        self.direct_routes = direct_routes  # path -> endpoint, for POST only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else f"{random.getrandbits(128):032x}"
        scope["soap.request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        counted = scope["path"] not in _UNCOUNTED_PATHS
        if counted:
            self.runtime.metrics.in_flight.inc()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                if self.runtime.draining:  # uvicorn then closes the connection after this response
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self._shed(scope)
            if refusal is not None:
                if self.runtime.draining:  # closing a socket with unread bytes would reset it under the response
                    await _discard_body(receive, self.runtime.settings.max_body_bytes)
                await refusal(scope, receive, send_with_id)
            elif scope["method"] == "POST" and (endpoint := self.direct_routes.get(scope["path"])) is not None:
                await _call_direct(endpoint, scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - last line of defence; the log has the traceback, the client does not
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if not started:
                response = error_response(
                    500, "internal_error", f"unexpected server error; request id {request_id}", path=scope["path"]
                )
                await response(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or (
                "/classify" if scope["path"] == "/classify" else "unmatched"
            )
            self.runtime.metrics.request_duration.labels(scope.get("soap.model", ""), route, str(status)).observe(
                time.perf_counter() - start
            )
            if counted:
                self.runtime.metrics.in_flight.dec()
            REQUEST_ID.reset(token)

    def _shed(self, scope: Scope) -> Response | None:
        """A 503 for any POST when the service drains, or for POST /classify and /v2/models/{name}/infer when the
        request's model is known before its body is read and that model's queue is full; else None (the handler
        refuses it later if need be).

        The model is known before the body when the query string names it (`?model=` routes the request; a body
        may repeat it but not name another, see `_options`), when the body is a raw image (it carries no options),
        or when only one model is loaded. A multipart or JSON request without `?model=` to a multi-model service
        may name its model in the body: it is not judged here by the default model's queue (which would refuse it
        for another model's load and count the refusal under the wrong model) but by its own model's queue once
        its options are parsed, before its images are decoded. Clients that want the cheapest refusal under
        overload name the model in the query string.
        """
        if scope["method"] != "POST":
            return None
        runtime = self.runtime
        v2_model = _V2_INFER.match(scope["path"])  # POST /v2/models/{name}/infer: the path names the model
        if runtime.draining:
            error = _shutting_down()
        elif scope["path"] != "/classify" and v2_model is None:
            return None
        else:
            model = runtime.models.get(unquote(v2_model[1])) if v2_model else _model_before_body(scope, runtime)
            if model is None or model.batcher.has_room(1):
                return None
            error = queue_full(model, model.batcher.retry_after_s())
        scope["soap.model"] = runtime.metrics_label(error.model)
        if error.reason:
            runtime.metrics.reject(scope["soap.model"], error.reason)
        return error_response(error.status, error.error, error.detail, error.headers, path=scope["path"])


DirectEndpoint = Callable[[Request], Awaitable[Response]]


async def _call_direct(endpoint: DirectEndpoint, scope: Scope, receive: Receive, send: Send) -> None:
    """Run an endpoint without the router: a ServiceError becomes its JSON answer as through the app's handler."""
    request = Request(scope, receive)
    try:
        response: Response = await endpoint(request)
    except ServiceError as exc:
        response = await service_error_handler(request, exc)
    await response(scope, receive, send)


async def _discard_body(receive: Receive, limit: int) -> None:
    """Read and drop the request body (up to `limit` bytes, at most _DRAIN_BODY_TIMEOUT_S)."""
    read = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_BODY_TIMEOUT_S):
            while read <= limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


def _model_before_body(scope: Scope, runtime: ServiceRuntime) -> ModelRuntime | None:
    """The model a /classify request is for, as far as its head tells (see RequestContext._shed); None when only the
    body can tell, or when the query names no loaded model (the handler answers 404)."""
    query = scope.get("query_string", b"")
    if b"model=" in query:
        name = parse_qs(query.decode("latin-1")).get("model", [None])[-1]
        if name:
            return runtime.models.get(name)
    content_type = dict(scope.get("headers") or ()).get(b"content-type", b"")
    if len(runtime.models) == 1 or content_type.strip().lower().startswith(b"image/"):
        return runtime.models[runtime.default]
    return None


def create_app(settings: ServiceSettings, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The app. `tracer_provider`: where --tracing sends spans (default: the process's; tests pass their own)."""
    runtime = ServiceRuntime(settings, tracing=make_tracing(settings.tracing, tracer_provider))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="SOAP serving",
        summary="Self-supervised online adversarial purification (SOAP, ICLR 2021) in front of an image classifier.",
        version="0.1.0",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}},
        docs_url=None,  # served by service/api_docs.py from local files, not a CDN
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    direct_routes: dict[str, DirectEndpoint] = {}
    app.add_middleware(RequestContext, runtime=runtime, direct_routes=direct_routes)
    install_error_handlers(app)
    direct_routes["/classify"] = _add_routes(app, runtime)

    from service.api_docs import register_docs
    from service.demo import register_demo
    from service.open_inference import router as open_inference

    app.include_router(open_inference)
    register_docs(app)
    register_demo(app)
    document_api_key(app, keyed=runtime.api_key is not None)
    return app


# ---------------------------------------------------------------------------------------------- /classify steps


def certify_request(options: ClassifyOptions, model: ModelRuntime, settings: ServiceSettings) -> CertifyRequest:
    """mode=certify's settings, within the server's limits (422 beyond them)."""
    if model.certify is None:
        raise ServiceError(
            422,
            "bad_options",
            f"model {model.name} records no training noise σ: it cannot certify",
            reason="bad_options",
            model=model.name,
        )
    samples = options.samples if options.samples is not None else settings.default_certify_samples
    if samples > settings.max_certify_samples:
        raise ServiceError(
            422,
            "bad_options",
            f"samples {samples} exceeds this server's limit of {settings.max_certify_samples}",
            reason="bad_options",
            model=model.name,
        )
    return CertifyRequest(samples, options.alpha if options.alpha is not None else 0.001, options.seed)


_DEFAULT_OPTIONS = ClassifyOptions()  # a request that names no option (most raw-image requests) shares this one


def _options(query: dict[str, Any], body: dict[str, Any], query_model: str | None) -> ClassifyOptions:
    """Query options, overridden by body options; but a body may not send the request to another model than the
    query string names (load shedding judged the request by the query's model before the body was read). An empty
    `model` field names no model (a form's unchosen input); other options are validated as sent."""
    if not query and not body:  # validating nothing cost ~20 µs of event loop per request (ablation, 64 clients)
        return _DEFAULT_OPTIONS
    if body.get("model") == "":
        body = {k: v for k, v in body.items() if k != "model"}
    body_model = body.get("model")
    if query_model and body_model is not None and body_model != query_model:
        raise ServiceError(
            422,
            "bad_options",
            f"the query string names model {query_model!r} and the body {body_model!r}; name one",
            reason="bad_options",
            model=query_model,
        )
    if query.keys() & body.keys():  # otherwise the merged validation below sees every query option as sent
        try:
            ClassifyOptions.model_validate(query)
        except ValidationError as exc:
            # A malformed query option is refused even where the body overrides it; the rules that tie options
            # together (no field location) apply to the merged options below.
            problems = validation_problems(e for e in exc.errors(include_url=False) if e["loc"])
            if problems:
                raise ServiceError(422, "bad_options", problems, reason="bad_options", model=query_model) from None
    try:
        return ClassifyOptions.model_validate({**query, **body})
    except ValidationError as exc:
        problems = validation_problems(exc.errors(include_url=False))
        raise ServiceError(422, "bad_options", problems, reason="bad_options", model=query_model) from None


async def decode_all(
    payloads: list[bytes], model: ModelRuntime, limits: DecodeLimits, limiter: anyio.CapacityLimiter
) -> list[torch.Tensor]:
    """The decode step: every payload to a [C, H, W] tensor of the model's input shape (422 for a bad image)."""
    images: list[torch.Tensor] = []
    for index, data in enumerate(payloads):
        try:
            source = open_image(data, limits)
            if source.width * source.height <= _INLINE_DECODE_PIXELS:
                images.append(decode_opened(source, model.input_shape))
            else:
                images.append(await anyio.to_thread.run_sync(decode_opened, source, model.input_shape, limiter=limiter))
        except ImageRejected as exc:
            where = f"image {index}: " if len(payloads) > 1 else ""
            raise ServiceError(exc.status, exc.error, where + exc.detail, reason=exc.error, model=model.name) from None
    return images


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so only http.disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@overload
async def _await_result(
    request: Request, model: ModelRuntime, item: WorkItem, cancel: Callable[..., object]
) -> ItemResult: ...


@overload
async def _await_result(
    request: Request, model: ModelRuntime, item: CertifyJob, cancel: Callable[..., object]
) -> CertifyResult: ...


async def _await_result(
    request: Request, model: ModelRuntime, item: WorkItem | CertifyJob, cancel: Callable[..., object]
) -> ItemResult | CertifyResult:
    """Wait for the batch result. While the item is still queued, the batcher ends it with DeadlineExceeded at
    its deadline (-> 504) and, from _WATCH_DISCONNECT_AFTER_S on, a disconnect watcher with ClientGone (-> 499,
    dropped before compute). Once its batch runs, the result comes whatever happens. (A plain await on the future:
    asyncio.wait with a timeout per request cost more event-loop time than the rest of the request path.)"""
    watcher: asyncio.Future[None] | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_client_gone(request.receive))
        watcher.add_done_callback(lambda w: None if w.cancelled() else cancel(item, ClientGone()))

    timer = asyncio.get_running_loop().call_later(_WATCH_DISCONNECT_AFTER_S, watch)
    try:
        return await item.future
    except DeadlineExceeded:
        raise ServiceError(
            504,
            "deadline_exceeded",
            f"the request waited longer than {request.app.state.settings.request_timeout_s:g} s for compute to start",
            reason="deadline",
            model=model.name,
        ) from None
    except ClientGone:
        raise ServiceError(
            499, "client_gone", "the client went away before compute started", reason="client_gone", model=model.name
        ) from None
    except asyncio.CancelledError:  # the server cancelled the handler: do not compute for nobody
        cancel(item)
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def run_on_batcher(
    request: Request, model: ModelRuntime, batch: torch.Tensor, purify_request: PurifyRequest
) -> ItemResult:
    """The batch step, shared by /classify and /v2 infer: queue `batch` on the model's batcher under the request's
    deadline and wait for its rows; every way this can fail becomes a ServiceError (503, 504, 499, 500)."""
    runtime: ServiceRuntime = request.app.state.runtime
    deadline = time.monotonic() + runtime.settings.request_timeout_s
    try:
        item = model.batcher.submit(batch, purify_request, deadline, request.scope["soap.request_id"])
    except QueueFull as exc:
        raise queue_full(model, exc.retry_after_s) from None
    except ShuttingDown:
        if runtime.draining:
            raise _shutting_down() from None
        raise ServiceError(
            503,
            "model_unavailable",
            f"model {model.name} is not serving (see the server log)",
            model=model.name,
            headers={"Retry-After": "5"},
        ) from None
    try:
        return await _await_result(request, model, item, model.batcher.cancel)
    except BatchFailed as exc:  # this batch only; the message names the exception type, no internals
        raise ServiceError(500, "batch_failed", str(exc), model=model.name) from None


async def run_certify(
    request: Request, model: ModelRuntime, batch: torch.Tensor, certify: CertifyRequest
) -> CertifyResult:
    """The certify step, shared by /classify and /v2 infer (mode=certify): queue `batch` on the model's certify
    lane under the request's deadline and wait for its certificates; failures become ServiceErrors."""
    lane = model.certify
    if lane is None:  # certify_request refused the request already
        raise RuntimeError(f"model {model.name} has no certify lane")
    runtime: ServiceRuntime = request.app.state.runtime
    try:
        job = lane.submit(batch, certify, time.monotonic() + runtime.settings.request_timeout_s)
    except QueueFull as exc:
        raise ServiceError(
            503,
            "queue_full",
            f"model {model.name}'s certify lane has {lane.queued_samples} forward passes queued "
            f"(limit {lane.max_queue_samples}); retry later",
            reason="queue_full",
            model=model.name,
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except ShuttingDown:
        raise _shutting_down() from None
    try:
        return await _await_result(request, model, job, lane.cancel)
    except BatchFailed as exc:
        raise ServiceError(500, "batch_failed", str(exc), model=model.name) from None


def _results(model: ModelRuntime, result: ItemResult, options: ClassifyOptions) -> list[dict[str, Any]]:
    """The encode step: one JSON object per image."""
    p = result.predictions
    names = model.class_names
    k = min(options.top_k, len(names))
    top_p, top_i = p.probs.topk(k, dim=1)
    threshold = model.suspicious_threshold
    rows = []
    for j, (probs, labels, eps, after, before) in enumerate(
        zip(
            top_p.tolist(), top_i.tolist(), p.epsilon.tolist(), p.aux_after.tolist(), p.aux_before.tolist(), strict=True
        )
    ):
        rows.append(
            {
                "label": labels[0],
                "class_name": names[labels[0]],
                "confidence": probs[0],
                "top_k": [
                    {"label": c, "class_name": names[c], "probability": q} for c, q in zip(labels, probs, strict=True)
                ],
                "epsilon": round(eps, 7),  # float32 of a grid value: 0.05 rather than 0.05000000074505806
                "aux_loss": after,
                "aux_loss_before": before,
                "suspicious": before > threshold,
                "purified_png": base64.b64encode(encode_png(p.purified[j])).decode()
                if options.return_purified
                else None,
                "aux_curve": p.curve[j].tolist() if options.return_curve else None,
            }
        )
    return rows


def queue_full(model: ModelRuntime, retry_after_s: int) -> ServiceError:
    return ServiceError(
        503,
        "queue_full",
        f"model {model.name} has {model.batcher.depth} images queued (limit {model.batcher.max_queue}); retry later",
        reason="queue_full",
        model=model.name,
        headers={"Retry-After": str(retry_after_s)},
    )


def _shutting_down() -> ServiceError:
    return ServiceError(
        503, "shutting_down", "the service is shutting down; retry on another replica", headers={"Retry-After": "1"}
    )


_CLASSIFY_OPENAPI = {
    "security": SECURITY,  # require_api_key is called in the handler, not declared as a dependency
    "parameters": query_parameters(ClassifyOptions),
    "requestBody": image_upload_body(None, ClassifyOptions, json_images=True),
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        401: "missing or wrong API key",
        404: "unknown model",
        408: "the body did not arrive in time",
        413: "body or image count over the limit",
        415: f"Content-Type is not {ACCEPTED_TYPES}",
        422: "bad image or bad options (or a purification mode the model does not serve)",
        500: "the batch holding this request failed",
        503: "queue full (see Retry-After) or shutting down",
        504: "compute did not start before the request's deadline",
    }.items()
}


def _add_routes(app: FastAPI, runtime: ServiceRuntime) -> DirectEndpoint:
    """Register the routes; returns POST /classify's endpoint, which RequestContext calls directly."""
    settings = runtime.settings
    tracing = runtime.tracing
    limits = DecodeLimits(settings.max_image_pixels, settings.max_image_side)
    decode_limiter = anyio.CapacityLimiter(_DECODE_THREADS)
    app.state.decode_limits, app.state.decode_limiter = limits, decode_limiter  # shared with /v2 infer
    protected = PROTECTED

    @app.post(
        "/classify",
        response_model=ClassifyResponse | CertifyResponse,
        responses=_ERRORS,
        openapi_extra=_CLASSIFY_OPENAPI,
        summary="Purify each image with SOAP, then classify it (mode=certify: a certified smoothed prediction instead)",
    )
    async def classify(request: Request) -> Response:
        with tracing.span("classify", request_id=request.scope["soap.request_id"]):
            return await _classify(request)

    async def _classify(request: Request) -> Response:
        started = time.perf_counter()
        await require_api_key(request)  # called directly: FastAPI's dependency machinery costs more per request
        query = dict(request.query_params)
        query_model = query.get("model")
        request.scope["soap.model"] = runtime.metrics_label(query_model)
        kind = media_type(request)  # (draining was refused by RequestContext, full queues where it knew the model)
        check_media_type(kind)
        with tracing.span("read"):
            body = await read_body(request, settings.max_body_bytes, query_model, settings.body_timeout_s)
            upload = await parse_upload(request, kind, body, settings.max_images_per_request, query_model)
        options = _options(query, upload.options, query_model)
        model = runtime.get(options.model)
        request.scope["soap.model"] = model.name
        if options.mode == "certify":
            certify = certify_request(options, model, settings)
            images = await decode_all(upload.payloads, model, limits, decode_limiter)
            batch = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
            return await _certify(request, model, batch, certify, started)
        purify_request = model.purify_request(options.mode, options.epsilon)
        if not model.batcher.has_room(len(upload.payloads)):  # refuse before decoding (RequestContext could not)
            raise queue_full(model, model.batcher.retry_after_s())
        with tracing.span("decode", images=len(upload.payloads)):
            images = await decode_all(upload.payloads, model, limits, decode_limiter)
            batch = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
        result = await run_on_batcher(request, model, batch, purify_request)
        if tracing.enabled:  # the batcher measured these for the whole batch; the batch ended just now
            waited = result.compute_s + result.queue_s
            tracing.record("queue_wait", waited, result.compute_s, model=model.name)
            tracing.record("compute", result.compute_s, 0.0, model=model.name, batch_images=result.batch_images)
        with tracing.span("encode"):
            body_out = {
                "request_id": request.scope["soap.request_id"],
                "model": model.name,
                "results": _results(model, result, options),
                "timing_ms": {
                    "queue": result.queue_s * 1000,
                    "compute": result.compute_s * 1000,
                    "total": (time.perf_counter() - started) * 1000,
                },
            }
            encoded = orjson.dumps(body_out)
        return Response(encoded, media_type="application/json")

    async def _certify(
        request: Request, model: ModelRuntime, batch: torch.Tensor, certify: CertifyRequest, started: float
    ) -> Response:
        result = await run_certify(request, model, batch, certify)
        names = model.class_names
        body_out = {
            "request_id": request.scope["soap.request_id"],
            "model": model.name,
            "results": [
                {
                    "label": c.label,
                    "class_name": names[c.label] if c.label is not None else None,
                    "certified_radius": c.radius,
                    "abstained": c.abstained,
                    "p_lower": c.p_lower,
                    "sigma": c.sigma,
                    "samples": c.samples,
                    "alpha": certify.alpha,
                    "seed": certify.seed + i,
                }
                for i, c in enumerate(result.certificates)
            ],
            "timing_ms": {
                "queue": result.queue_s * 1000,
                "compute": result.compute_s * 1000,
                "paused": result.paused_s * 1000,
                "total": (time.perf_counter() - started) * 1000,
            },
        }
        return Response(orjson.dumps(body_out), media_type="application/json")

    @app.get("/v1/models", response_model=ModelList, dependencies=protected, summary="Loaded models")
    async def list_models() -> ModelList:
        return ModelList(default=runtime.default, models=[_model_info(runtime, m) for m in runtime.models.values()])

    @app.get(
        "/v1/models/{name}",
        response_model=ModelInfo,
        responses={404: {"model": ErrorResponse}},
        dependencies=protected,
        summary="One model: classes, input shape, task, purifier, calibration, metrics",
    )
    async def model_info(name: str) -> ModelInfo:
        return _model_info(runtime, runtime.get(name))

    @app.get(
        "/v1/models/{name}/card",
        response_class=Response,
        responses={
            200: {"content": {"text/markdown": {"schema": {"type": "string"}}}},
            404: {"model": ErrorResponse},
        },
        dependencies=protected,
        summary="The model card (MODEL_CARD.md): evaluation, limitations, licence",
    )
    async def model_card(name: str) -> Response:
        model = runtime.get(name)
        card = model.loaded.path / MODEL_CARD_FILE
        if not card.is_file():
            raise ServiceError(404, "not_found", f"model {model.name} has no {MODEL_CARD_FILE}")
        return Response(card.read_bytes(), media_type="text/markdown; charset=utf-8")

    @app.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": ErrorResponse}},
        summary="Readiness: models loaded and warmed up, not shutting down",
    )
    async def readyz() -> Response:
        if runtime.ready:
            return JSONResponse({"status": "ready", "detail": None})
        reason = "shutting down" if runtime.draining else "models are loading or warming up"
        return error_response(503, "not_ready", reason)

    metrics_deps = protected if settings.protect_metrics else []

    @app.get(
        "/metrics",
        dependencies=metrics_deps,
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return classify


def _model_info(runtime: ServiceRuntime, model: ModelRuntime) -> ModelInfo:
    meta = model.loaded.meta
    purifier = model.loaded.purifier
    calibration = None
    if meta.calibration is not None:
        calibration = {**meta.calibration.model_dump(), "suspicious_threshold": meta.calibration.suspicious_threshold}
    s = runtime.settings
    return ModelInfo(
        name=model.name,
        default=model.name == runtime.default,
        network=meta.network,
        dataset=meta.dataset,
        aux_task=meta.aux_task,
        num_classes=len(meta.class_names),
        class_names=meta.class_names,
        input_shape=list(meta.input_shape),
        device=str(model.device),
        ready=model.ready,
        aux_head_trained=model.purifies,
        modes=list(model.modes),
        default_mode=model.default_mode,
        purifier=PurifierInfo(
            step_size=purifier.step_size,
            steps=purifier.steps,
            budget_step=purifier.budget_step,
            num_budgets=purifier.num_budgets,
            budgets=purifier.budgets(),
            max_budget=purifier.max_budget,
        ),
        robustness=RobustnessInfo(
            purifies=model.purifies,
            resists=BLIND_ATTACKS if model.purifies else None,
            does_not_resist=ADAPTIVE_ATTACKS if model.purifies else "adversarial examples of any kind (no defence)",
            results=RESULTS_PAGE,
            model_card=f"v1/models/{model.name}/card",
        ),
        calibration=calibration,
        metrics=meta.metrics,
        training=meta.training.model_dump(mode="json"),
        batching=BatchingInfo(
            max_batch_size=s.max_batch_size,
            max_delay_ms=s.max_delay_ms,
            max_queue=s.max_queue,
            queue_depth=model.batcher.depth,
        ),
    )
