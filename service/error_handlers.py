"""Which exception becomes which answer: a ServiceError (service/errors.py) as it says, a domain error of the runtime
(`Refused`: unknown model, a mode or budget the model does not serve) through its factory, FastAPI's validation
errors and Starlette's 404/405. Every refusal with a rejection reason is counted here, the one place, whichever
route or protocol raised it; the routes and the direct fast path (service/middleware.py) answer through `answer`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .dependencies import runtime_of
from .errors import (
    ErrorCode,
    ServiceError,
    bad_options,
    error_response,
    option_problems,
    purification_unavailable,
    render,
    unknown_model,
)
from .runtime import BudgetTooLarge, ModeUnavailable, Refused, UnknownModel


def as_service_error(exc: Refused) -> ServiceError:
    """The HTTP answer to a domain error of the runtime."""
    if isinstance(exc, UnknownModel):
        return unknown_model(exc.name, exc.loaded)
    if isinstance(exc, ModeUnavailable):
        return purification_unavailable(exc.model, exc.mode)
    if isinstance(exc, BudgetTooLarge):
        return bad_options(str(exc), exc.model)
    raise TypeError(f"no HTTP answer for {type(exc).__name__}")  # a new Refused kind needs its line above


def answer(request: Request, exc: ServiceError | Refused) -> JSONResponse:
    """The JSON answer to a refusal, counted in soap_rejections_total when it has a reason."""
    error = exc if isinstance(exc, ServiceError) else as_service_error(exc)
    if error.reason is not None:
        runtime = runtime_of(request)
        runtime.metrics.reject(runtime.metrics_label(error.model), error.reason)
    return render(error, request.url.path)


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    return answer(request, exc)


async def refused_handler(request: Request, exc: Refused) -> JSONResponse:
    return answer(request, exc)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, ErrorCode.BAD_OPTIONS, option_problems(exc.errors()), path=request.url.path)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(
        exc.status_code, codes.get(exc.status_code, ErrorCode.HTTP_ERROR), exc.detail, headers, path=request.url.path
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
    app.exception_handler(Refused)(refused_handler)
    app.exception_handler(RequestValidationError)(validation_error_handler)
    app.exception_handler(StarletteHTTPException)(http_error_handler)
