"""One exception type for every refusal, rendered as JSON {"error", "detail"} — never a traceback. Under /v2 (the
Open Inference Protocol) the same errors take that protocol's shape, {"error": "<code>: <message>"}."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route


def validation_problems(
    errors: Iterable[Mapping[str, Any]], prefix: tuple[str | int, ...] = ()
) -> list[dict[str, Any]]:
    """Pydantic's errors (`exc.errors(include_url=False)`) as the `detail` of a 422: where (`loc`, under `prefix`)
    and what (`msg`), nothing else."""
    return [{"loc": [*prefix, *e.get("loc", ())], "msg": e.get("msg", "")} for e in errors]


class ServiceError(Exception):
    """An HTTP error with a machine-readable code. `reason` (one of metrics.REJECTION_REASONS) counts it in
    soap_rejections_total; `model` is the metrics label."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any,
        *,
        reason: str | None = None,
        model: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.reason = reason
        self.model = model
        self.headers = headers or {}


def is_open_inference(path: str) -> bool:
    """Whether `path` is an Open Inference Protocol (KServe v2) route."""
    return path == "/v2" or path.startswith("/v2/")


def _message(detail: Any) -> str:
    if isinstance(detail, list) and all(isinstance(p, dict) and "msg" in p for p in detail):
        return "; ".join(f"{'.'.join(map(str, p.get('loc', ()))) or 'request'}: {p['msg']}" for p in detail)
    return str(detail)


def error_response(
    status: int, error: str, detail: Any, headers: Mapping[str, str] | None = None, *, path: str = ""
) -> JSONResponse:
    """The JSON error for a request to `path`: {"error": code, "detail": ...}, or the protocol's {"error": "..."}
    on the /v2 routes."""
    if is_open_inference(path):
        return JSONResponse({"error": f"{error}: {_message(detail)}"}, status_code=status, headers=headers)
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.reason is not None:
        runtime = request.app.state.runtime
        runtime.metrics.reject(runtime.metrics_label(exc.model), exc.reason)
    return error_response(exc.status, exc.error, exc.detail, exc.headers, path=request.url.path)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "bad_options", validation_problems(exc.errors()), path=request.url.path)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, headers, path=request.url.path
    )


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. (Starlette's 405 names only the first route whose path matches,
    so GET and POST /v1/attack, two routes, answered `Allow: GET`.)"""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    # FastAPI's decorator form, because Starlette types add_exception_handler's handler as taking any Exception
    app.exception_handler(ServiceError)(service_error_handler)
    app.exception_handler(RequestValidationError)(validation_error_handler)
    app.exception_handler(StarletteHTTPException)(http_error_handler)
