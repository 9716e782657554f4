"""Optional OpenTelemetry tracing of the inference requests, POST /classify and POST /v2/models/{name}/infer
(`--tracing`, the `tracing` extra; service/pipeline.py records them): one span per request with children for its
steps — read (body, form or tensors, and options), decode, queue wait, compute, encode.

Off by default, and then free: `span()` hands back one shared no-op context manager and nothing of OpenTelemetry is
imported. Queue wait and compute happen in the batcher for a whole batch; their spans are placed after the fact
from the durations the batcher measured for this request, ending when the handler resumes with the result (a
fraction of a millisecond after the batch finished).

Spans go to the tracer provider the process already has (set by `opentelemetry-instrument` or the application),
else to a new one exporting over OTLP/HTTP when `opentelemetry-exporter-otlp-proto-http` is installed (endpoint
from OTEL_EXPORTER_OTLP_ENDPOINT), else to the console.
"""

from __future__ import annotations

import importlib
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

log = logging.getLogger("service.tracing")
_NOTHING: AbstractContextManager[None] = nullcontext()
SPAN_PREFIX = "soap."


class RequestTracing:
    """Spans of the request path; a no-op without a tracer."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self._tracer = tracer

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A child of the current span, current while the block runs."""
        if self._tracer is None:
            return _NOTHING
        return self._tracer.start_as_current_span(SPAN_PREFIX + name, attributes=attributes or None)

    def record(self, name: str, seconds_ago_start: float, seconds_ago_end: float, **attributes: Any) -> None:
        """A finished child of the current span that started and ended that many seconds before now."""
        if self._tracer is None:
            return
        now = time.time_ns()
        span = self._tracer.start_span(
            SPAN_PREFIX + name, start_time=now - int(seconds_ago_start * 1e9), attributes=attributes or None
        )
        span.end(end_time=now - int(seconds_ago_end * 1e9))


def make_tracing(enabled: bool, provider: TracerProvider | None = None) -> RequestTracing:
    """Tracing as configured: `provider` when given (tests: an SDK provider with an in-memory exporter), else the
    process's, else a new one (module docstring). Raises RuntimeError when enabled without the `tracing` extra."""
    if not enabled:
        return RequestTracing()
    try:
        from opentelemetry import trace
    except ImportError:
        raise RuntimeError(
            "--tracing needs OpenTelemetry: pip install 'soap-serving[tracing]' (opentelemetry-api and -sdk)"
        ) from None
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):  # nobody configured one: make ours
            provider = _default_provider()
            trace.set_tracer_provider(provider)
    return RequestTracing(provider.get_tracer("soap-serving"))


def _default_provider() -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    provider = SdkTracerProvider(resource=Resource.create({"service.name": "soap-serving"}))
    exporter: SpanExporter
    try:  # an optional package the tracing extra does not pin: imported by name
        otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        exporter = otlp.OTLPSpanExporter()
    except ImportError:
        log.warning("tracing: no OTLP exporter installed (opentelemetry-exporter-otlp-proto-http); spans go to stdout")
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
