"""Builds the FastAPI app, and only that: the runtime, the lifespan, the middleware, the error handlers and the
routers. What each part owns:

    service/runtime.py         the served models (pools, batchers, certify lanes), settings, metrics, readiness
    service/middleware.py      request id, in-flight count, shedding before the body is read, drain, the fast path
    service/pipeline.py        the one inference path of both protocols: read -> decode -> submit -> await -> encode
    service/routes/            one APIRouter per resource (classify, open inference, models, health, demo, docs)
    service/errors.py          every error code, factory and description; service/error_handlers.py maps exceptions

`create_app(settings)` loads every checkpoint when it is called (errors surface here, before serving) and puts the
ServiceRuntime on `app.state.runtime` (read through service.dependencies.runtime_of) and the settings on
`app.state.settings`; the lifespan starts the batchers, which warm the models up; /readyz says 200 after that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from .auth import PROTECTED, document_api_key
from .config import ServiceSettings
from .error_handlers import install_error_handlers
from .middleware import RequestContext
from .routes import classify, demo, docs, health, models, open_inference
from .runtime import ServiceRuntime
from .schemas import ErrorResponse
from .tracing import make_tracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


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
        docs_url=None,  # served by service/routes/docs.py from local files, not a CDN
        redoc_url=None,
        # FastAPI's own OpenTelemetry spans would start as soon as a tracer provider exists (service/tracing.py
        # sets one under --tracing) and double ours; off, it also costs no per-request provider lookup (~6 µs).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.add_middleware(RequestContext, runtime=runtime, classify=classify.endpoint, infer=open_inference.infer_endpoint)
    install_error_handlers(app)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(health.metrics_router, dependencies=PROTECTED if settings.protect_metrics else None)
    app.include_router(open_inference.router)
    app.include_router(docs.router)
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")
    app.include_router(demo.router)
    app.mount("/static", demo.static_files(), name="static")
    document_api_key(app, keyed=runtime.api_key is not None)
    return app
