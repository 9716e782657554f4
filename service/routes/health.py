"""Liveness, readiness and the Prometheus metrics: GET /healthz, /readyz (`router`) and GET /metrics
(`metrics_router`, which create_app includes behind the API key when --protect-metrics asks for it)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..dependencies import Runtime
from ..errors import ErrorCode, error_response
from ..schemas import ErrorResponse, Health

router = APIRouter()
metrics_router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: models loaded and warmed up, not shutting down",
)
async def readyz(runtime: Runtime) -> Response:
    if runtime.ready:
        return JSONResponse({"status": "ready", "detail": None})
    reason = "shutting down" if runtime.draining else "models are loading or warming up"
    return error_response(503, ErrorCode.NOT_READY, reason)


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(runtime: Runtime) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
