"""Every refusal the service answers, in one place: the error codes (`ErrorCode`), the factories that build each error
(`ServiceError`: status, code, message, rejection reason for the metrics, the model it concerns), the one table of
what each status means (`ERROR_DESCRIPTIONS`, for the OpenAPI document of every route) and how an error is rendered:
JSON {"error": "<code>", "detail": ...}, or on the Open Inference Protocol's /v2 routes that protocol's shape,
{"error": "<code>: <message>"} — never a traceback.

Which exception becomes which answer (handlers, domain errors of the runtime) is service/error_handlers.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .metrics import Rejection


class ErrorCode(StrEnum):
    """The machine-readable `error` of every refusal (a contract with clients: add codes, do not rename them)."""

    BAD_OPTIONS = "bad_options"
    BAD_IMAGE = "bad_image"
    BAD_REQUEST = "bad_request"  # Open Inference Protocol: a message, tensor or output the model cannot take
    PURIFICATION_UNAVAILABLE = "purification_unavailable"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BODY_TIMEOUT = "body_timeout"
    HEAD_TIMEOUT = "head_timeout"  # written by service/connection_guard.py before any route
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_MODEL = "unknown_model"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    QUEUE_FULL = "queue_full"
    TOO_MANY_CONNECTIONS = "too_many_connections"  # written by service/connection_guard.py before any route
    SHUTTING_DOWN = "shutting_down"
    MODEL_UNAVAILABLE = "model_unavailable"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CLIENT_GONE = "client_gone"
    BATCH_FAILED = "batch_failed"
    ATTACK_DISABLED = "attack_disabled"
    ATTACK_BUSY = "attack_busy"
    INTERNAL_ERROR = "internal_error"


# What each status means, on every route that can answer it (the OpenAPI `responses` of each operation).
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "missing or wrong API key",
    403: "the demo attack endpoint is off (start with --enable-attack)",
    404: "unknown model",
    408: "the request head or body did not arrive in time",
    413: "body or image count over the limit",
    415: "a Content-Type (or Content-Encoding) this route does not accept",
    422: "bad image, bad options, or a request the model cannot take (e.g. a purification mode it does not serve)",
    500: "the batch holding this request failed",
    503: "queue full or busy (see Retry-After), shutting down, or every connection carrying a request",
    504: "compute did not start before the request's deadline",
}


def documented(body: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` for these error statuses, each with its body model and its ERROR_DESCRIPTIONS text."""
    return {status: {"model": body, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


class ServiceError(Exception):
    """A refusal: HTTP status, machine-readable code and message (`detail`: one plain-language string, on every
    route and protocol).
    `reason` counts it in soap_rejections_total under `model` (a name; the metrics label is bounded later)."""

    def __init__(
        self,
        status: int,
        error: ErrorCode,
        detail: str,
        *,
        reason: Rejection | None = None,
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


# Where FastAPI's RequestValidationError puts a problem before the option's own name.
_REQUEST_PARTS = frozenset({"query", "body", "path", "header", "cookie"})


def option_problems(errors: Iterable[Mapping[str, Any]], noun: str = "option") -> str:
    """Pydantic's errors (`exc.errors(include_url=False)`) as one plain sentence per option: the option's name, the
    value sent and what is allowed, never pydantic's internal locations (`str-enum[Mode]`, `literal['certify']`).
    A union field's several errors (mode: the Mode enum or 'certify') become one sentence with all allowed values;
    a rule tying options together (a model validator, no location) speaks for itself, naming its options."""
    by_option: dict[str | None, list[Mapping[str, Any]]] = {}
    for e in errors:
        loc = [part for part in e.get("loc", ()) if isinstance(part, str | int)]
        if loc and loc[0] in _REQUEST_PARTS:
            loc = loc[1:]
        name = str(loc[0]) if loc else None
        by_option.setdefault(name, []).append(e)
    sentences = []
    for name, problems in by_option.items():
        if name is None:
            sentences += [str(e.get("msg", "")).removeprefix("Value error, ") for e in problems]
            continue
        first = problems[0]
        kinds = {str(e.get("type", "")) for e in problems}
        value = first.get("input")
        if "extra_forbidden" in kinds:
            sentences.append(f"unknown {noun} {name!r}")
        elif "missing" in kinds:
            sentences.append(f"{noun} {name} is required")
        elif kinds & {"enum", "literal_error"}:
            allowed = [v for e in problems for v in re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))]
            sentences.append(f"{noun} {name}={value!r} is not allowed; allowed values: {', '.join(allowed)}")
        elif "bool_parsing" in kinds or "bool_type" in kinds:
            sentences.append(f"{noun} {name}={value!r} is not allowed; allowed values: true, false")
        else:
            what = str(first.get("msg", "")).replace("Input should be", "must be")
            sentences.append(f"{noun} {name}={value!r}: {what}")
    return "; ".join(sentences)


# ------------------------------------------------------------------------------------------------ the factories


def bad_options(detail: str, model: str | None = None) -> ServiceError:
    return ServiceError(422, ErrorCode.BAD_OPTIONS, detail, reason=Rejection.BAD_OPTIONS, model=model)


def bad_image(detail: str, model: str | None = None) -> ServiceError:
    return ServiceError(422, ErrorCode.BAD_IMAGE, detail, reason=Rejection.BAD_IMAGE, model=model)


def bad_request(detail: str, model: str | None = None) -> ServiceError:
    """An Open Inference Protocol message the model cannot take (counted as bad options)."""
    return ServiceError(422, ErrorCode.BAD_REQUEST, detail, reason=Rejection.BAD_OPTIONS, model=model)


def purification_unavailable(model: str, mode: str) -> ServiceError:
    return ServiceError(
        422,
        ErrorCode.PURIFICATION_UNAVAILABLE,
        f"model {model} does not serve mode {mode}: its auxiliary head was not trained "
        f"(training recipe without the auxiliary loss), so purification would only add noise; "
        f"use mode=none or a SOAP-trained model",
        reason=Rejection.BAD_OPTIONS,
        model=model,
    )


def unsupported_media_type(detail: str, model: str | None = None) -> ServiceError:
    return ServiceError(
        415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, detail, reason=Rejection.UNSUPPORTED_MEDIA_TYPE, model=model
    )


def payload_too_large(limit: int, model: str | None = None) -> ServiceError:
    return ServiceError(
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"the request body is larger than the limit of {limit} bytes",
        reason=Rejection.PAYLOAD_TOO_LARGE,
        model=model,
    )


def too_many_images(limit: int, count: int, model: str | None = None) -> ServiceError:
    return ServiceError(
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"at least {count} images in one request; the limit is {limit}",
        reason=Rejection.PAYLOAD_TOO_LARGE,
        model=model,
    )


def body_timeout(timeout_s: float | None, model: str | None = None) -> ServiceError:
    return ServiceError(
        408,
        ErrorCode.BODY_TIMEOUT,
        f"the request body did not arrive within {timeout_s:g} s",
        reason=Rejection.BODY_TIMEOUT,
        model=model,
    )


def unauthorized(model: str | None = None) -> ServiceError:
    return ServiceError(
        401,
        ErrorCode.UNAUTHORIZED,
        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        reason=Rejection.UNAUTHORIZED,
        model=model,
        headers={"WWW-Authenticate": "Bearer"},
    )


def unknown_model(name: str | None, loaded: list[str]) -> ServiceError:
    return ServiceError(404, ErrorCode.UNKNOWN_MODEL, f"no model named {name!r}; loaded: {loaded}")


def not_found(detail: str) -> ServiceError:
    return ServiceError(404, ErrorCode.NOT_FOUND, detail)


def queue_full(model: str, queued: str, retry_after_s: int) -> ServiceError:
    """`queued`: what waits, against its limit (e.g. "12 images queued (limit 512)")."""
    return ServiceError(
        503,
        ErrorCode.QUEUE_FULL,
        f"model {model} has {queued}; retry later",
        reason=Rejection.QUEUE_FULL,
        model=model,
        headers={"Retry-After": str(retry_after_s)},
    )


def shutting_down() -> ServiceError:
    return ServiceError(
        503,
        ErrorCode.SHUTTING_DOWN,
        "the service is shutting down; retry on another replica",
        headers={"Retry-After": "1"},
    )


def model_unavailable(model: str) -> ServiceError:
    return ServiceError(
        503,
        ErrorCode.MODEL_UNAVAILABLE,
        f"model {model} is not serving (see the server log)",
        model=model,
        headers={"Retry-After": "5"},
    )


def deadline_exceeded(model: str, timeout_s: float) -> ServiceError:
    return ServiceError(
        504,
        ErrorCode.DEADLINE_EXCEEDED,
        f"the request waited longer than {timeout_s:g} s for compute to start",
        reason=Rejection.DEADLINE,
        model=model,
    )


def client_gone(model: str) -> ServiceError:
    return ServiceError(
        499,
        ErrorCode.CLIENT_GONE,
        "the client went away before compute started",
        reason=Rejection.CLIENT_GONE,
        model=model,
    )


def batch_failed(model: str, message: str) -> ServiceError:
    """`message` names the exception type, no internals (service.batcher.BatchFailed)."""
    return ServiceError(500, ErrorCode.BATCH_FAILED, message, model=model)


def attack_disabled() -> ServiceError:
    return ServiceError(
        403,
        ErrorCode.ATTACK_DISABLED,
        "the demo attack endpoint is off; start the service with --enable-attack (or SOAP_ENABLE_ATTACK=1) to use it",
    )


def attack_busy() -> ServiceError:
    return ServiceError(
        503, ErrorCode.ATTACK_BUSY, "another attack is running; try again in a moment", headers={"Retry-After": "1"}
    )


# ------------------------------------------------------------------------------------------------ rendering


def is_open_inference(path: str) -> bool:
    """Whether `path` is an Open Inference Protocol (KServe v2) route."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None, *, path: str = ""
) -> JSONResponse:
    """The JSON error for a request to `path`: {"error": code, "detail": ...}, or the protocol's {"error": "..."}
    on the /v2 routes."""
    if is_open_inference(path):
        return JSONResponse({"error": f"{error}: {detail}"}, status_code=status, headers=headers)
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def render(exc: ServiceError, path: str) -> JSONResponse:
    return error_response(exc.status, exc.error, exc.detail, exc.headers, path=path)
