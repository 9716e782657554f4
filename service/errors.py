"""One exception type for every refusal, rendered as JSON {"error", "detail"} — never a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


def error_response(status: int, error: str, detail: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.reason is not None:
        runtime = request.app.state.runtime
        runtime.metrics.reject(runtime.metrics_label(exc.model), exc.reason)
    return error_response(exc.status, exc.error, exc.detail, exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return error_response(422, "bad_options", problems)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    # FastAPI's decorator form, because Starlette types add_exception_handler's handler as taking any Exception
    app.exception_handler(ServiceError)(service_error_handler)
    app.exception_handler(RequestValidationError)(validation_error_handler)
    app.exception_handler(StarletteHTTPException)(http_error_handler)
