"""The one ASGI middleware, `RequestContext`, and what happens in it before any route runs: the request id, the
in-flight gauge and request-duration metric, load shedding before the body is read, the drain's refusals, the JSON
500 for anything unhandled, and the fast path that hands the two inference routes straight to their endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .error_handlers import answer
from .errors import ErrorCode, ServiceError, error_response, render, shutting_down
from .logs import REQUEST_ID
from .pipeline import full_queue
from .runtime import ModelRuntime, Refused, ServiceRuntime

log = logging.getLogger("service.middleware")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLASSIFY = "/classify"
INFER = "/v2/models/{name}/infer"
_INFER = re.compile(r"^/v2/models/([^/]+)/infer$")  # the route's {name}: one path segment, as Starlette matches it
# Not load: Prometheus' scrapes and the kubelet's probes would count as in-flight requests on an idle replica.
_UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
# While draining, a refused request's body is read before the 503 (see _discard_body), but not for longer than this.
_DRAIN_BODY_TIMEOUT_S = 1.0

Endpoint = Callable[[Request], Awaitable[Response]]


class RequestContext:
    """Pure ASGI middleware: request id (X-Request-ID, echoed or made), load shedding, request-duration metric by
    model, route template and status, a JSON 500 (no traceback) for anything unhandled, and the drain's part of a
    graceful shutdown (service/server.py): while draining, every response carries `Connection: close`, the one
    clean way to end a keep-alive connection, and every POST (all of them are work) gets 503 with Retry-After.

    Shedding happens here, before routing, parsing or reading the body: under overload a refusal must cost far
    less than a served request, or the refusals themselves become the overload.

    POST /classify and POST /v2/models/{name}/infer, the hot paths, are handed from here straight to their endpoints
    (`classify`, `infer`): the router and the framework's per-request layers below this one cost about a fifth of
    the event loop's time per request under load (py-spy, docs/performance.md), and the endpoints need none of them
    (no declared dependencies, no body model; their errors are answered by the same handlers). The routes stay
    registered for the OpenAPI document and for every other method (405).
    """

    def __init__(self, app: ASGIApp, runtime: ServiceRuntime, classify: Endpoint, infer: Endpoint) -> None:
        self.app = app
        self.runtime = runtime
        self.classify = classify
        self.infer = infer

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
        runtime = self.runtime
        if counted:
            runtime.metrics.in_flight.inc()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                if runtime.draining:  # uvicorn then closes the connection after this response
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        route: str | None = None
        try:
            endpoint, route, model = self._direct(scope)
            refusal = self._shed(scope, endpoint is not None, model)
            if refusal is not None:
                if runtime.draining:  # closing a socket with unread bytes would reset it under the response
                    await _discard_body(receive, runtime.settings.max_body_bytes)
                await refusal(scope, receive, send_with_id)
            elif endpoint is not None:
                await _call_direct(endpoint, scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - last line of defence; the log has the traceback, the client does not
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if not started:
                response = error_response(
                    500,
                    ErrorCode.INTERNAL_ERROR,
                    f"unexpected server error; request id {request_id}",
                    path=scope["path"],
                )
                await response(scope, receive, send_with_id)
        finally:
            route = route or route_label(scope)
            runtime.metrics.request_duration.labels(model_label(scope, runtime), route, str(status)).observe(
                time.perf_counter() - start
            )
            if counted:
                runtime.metrics.in_flight.dec()
            REQUEST_ID.reset(token)

    def _direct(self, scope: Scope) -> tuple[Endpoint | None, str | None, str | None]:
        """For POST /classify and POST /v2/models/{name}/infer: the endpoint, the route template and the model the
        path names (infer; its name goes into path_params as the router would put it); else Nones."""
        path = scope["path"]
        if scope["method"] != "POST":
            return None, None, None
        if path == CLASSIFY:
            return self.classify, CLASSIFY, None
        if path.startswith("/v2/models/") and (match := _INFER.match(path)) is not None:
            scope["path_params"] = {"name": match[1]}
            return self.infer, INFER, match[1]
        return None, None, None

    def _shed(self, scope: Scope, inference: bool, path_model: str | None) -> Response | None:
        """A 503 for any POST when the service drains, or for an inference POST when the request's model is known
        before its body is read and that model's queue is full; else None (the pipeline refuses it later if need be).

        The model is known before the body when the path names it (/v2/models/{name}/infer), when the query string
        names it (`?model=` routes a /classify request; a body may repeat it but not name another, see
        routes/classify.py), when the body is a raw image (it carries no options), or when only one model is loaded.
        A multipart or JSON request without `?model=` to a multi-model service may name its model in the body: it is
        not judged here by the default model's queue (which would refuse it for another model's load and count the
        refusal under the wrong model) but by its own model's queue once its options are parsed, before its images
        are decoded. Clients that want the cheapest refusal under overload name the model in the query string.
        """
        if scope["method"] != "POST":
            return None
        runtime = self.runtime
        error: ServiceError
        if runtime.draining:
            error = shutting_down()
        elif not inference:
            return None
        else:
            model = runtime.models.get(path_model) if path_model is not None else _model_before_body(scope, runtime)
            if model is None or model.batcher.has_room(1):
                return None
            error = full_queue(model)
        scope["soap.model"] = runtime.metrics_label(error.model)
        if error.reason:
            runtime.metrics.reject(scope["soap.model"], error.reason)
        return render(error, scope["path"])


async def _call_direct(endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    """Run an endpoint without the router: a refusal becomes its JSON answer as through the app's handlers."""
    request = Request(scope, receive)
    try:
        response: Response = await endpoint(request)
    except (ServiceError, Refused) as exc:
        response = answer(request, exc)
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
    body can tell, or when the query names no loaded model (the pipeline answers 404)."""
    name = _query_model(scope)
    if name:
        return runtime.models.get(name)
    content_type = dict(scope.get("headers") or ()).get(b"content-type", b"")
    if len(runtime.models) == 1 or content_type.strip().lower().startswith(b"image/"):
        return runtime.models[runtime.default]
    return None


def _query_model(scope: Scope) -> str | None:
    """The `model` the query string names, if any."""
    query = scope.get("query_string", b"")
    if b"model=" not in query:
        return None
    return parse_qs(query.decode("latin-1")).get("model", [None])[-1]


def route_label(scope: Scope) -> str:
    """The request's route for metrics: the matched route's template, a mount's path for the files under it
    (`/static`, the docs assets), else "unmatched" (a bounded label: never the raw path)."""
    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        return str(route)
    if "app_root_path" in scope:  # set by a Mount that matched (starlette.routing.Mount.matches)
        return str(scope["root_path"])[len(scope["app_root_path"]) :] or "unmatched"
    return "unmatched"


def model_label(scope: Scope, runtime: ServiceRuntime) -> str:
    """The one model-label rule of every route and protocol: the model the request was served by or refused for
    (`soap.model`, set by the pipeline whether the name came from the query, a form field or the v2 path, the
    default model's name when the request named none), else the model a route's path names (`{name}`, bounded by
    `metrics_label`), for a /classify refused before it was read (e.g. 401) the query's model or the default,
    else "" (a request about no model: /metrics, /healthz, the page)."""
    model = scope.get("soap.model")
    if model is not None:
        return str(model)
    name = scope.get("path_params", {}).get("name")
    if isinstance(name, str):
        return runtime.metrics_label(name)
    if scope["path"] == CLASSIFY:
        return runtime.metrics_label(_query_model(scope) or None)
    return ""
