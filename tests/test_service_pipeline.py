"""POST /classify and POST /v2/models/{name}/infer go through one pipeline (service/pipeline.py): the real app with a
real runtime and tracing into the SDK's in-memory exporter, the same real digit sent through both protocols (the /v2
request as tritonclient builds it, binary tensor extension), and the same faults. Each must give the same spans, move
the same counters under the same labels, and answer the same fault with the same status, code and message (in each
protocol's error shape)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from support import mnist_png, settings_for

from service.app import create_app

MODEL = "mnist-fcn-dr"
PNG = {"Content-Type": "image/png"}
ROUTE_LABEL = {"/classify": "the route", "/v2/models/{name}/infer": "the route"}


@asynccontextmanager
async def traced_app(model_dir) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings_for(model_dir, tracing=True, max_delay_ms=1), tracer_provider=provider)
    async with app.router.lifespan_context(app):
        while not app.state.runtime.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://soap.test", timeout=60) as client:
            yield client, exporter


def infer_body(png: bytes, parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """One encoded image as the `images` BYTES input, binary tensor data, as tritonclient sends it."""
    tensor = triton.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], parameters=parameters)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter and histogram count of a /metrics page, by name and labels (the two routes' label made one)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_total", "_count")) and not s.name.startswith("soap_process_"):
                labels = {k: ROUTE_LABEL.get(v, v) if k == "route" else v for k, v in s.labels.items()}
                key = (s.name, tuple(sorted(labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


async def moved(client: httpx.AsyncClient, send: Callable[[], Any]) -> tuple[httpx.Response, dict]:
    """The response to `send()` and the counters it moved (name, labels -> increment)."""
    before = counters((await client.get("/metrics")).text)
    response = await send()
    after = counters((await client.get("/metrics")).text)
    delta = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
    return response, delta


def step_names(exporter: Any, request_id: str) -> tuple[list[str], bool]:
    """The names of the request's root span's children, in time order, and whether the root ended ok."""
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "soap.classify" and s.attributes["request_id"] == request_id]
    children = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time,
    )
    return [s.name for s in children], root.status.is_ok


@pytest.mark.anyio
async def test_both_protocols_take_the_same_steps_count_the_same_and_refuse_alike(model_dir):
    png = mnist_png(7)
    async with traced_app(model_dir) as (client, exporter):

        def classify(body: bytes, query: str = "", request_id: str = "") -> Callable[[], Any]:
            headers = {**PNG, "X-Request-ID": request_id}
            return lambda: client.post(f"/classify{query}", content=body, headers=headers)

        def infer(body: bytes, parameters: dict[str, Any] | None = None, request_id: str = "") -> Callable[[], Any]:
            content, headers = infer_body(body, parameters)
            headers["X-Request-ID"] = request_id
            return lambda: client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)

        # One real digit, served.
        served_c, moved_c = await moved(client, classify(png, request_id="same-c"))
        served_v, moved_v = await moved(client, infer(png, request_id="same-v"))
        assert served_c.status_code == 200, served_c.text
        assert served_v.status_code == 200, served_v.text
        assert served_v.headers["content-type"] == "application/octet-stream"  # binary answer, as asked
        json_length = int(served_v.headers["inference-header-content-length"])
        header = json.loads(served_v.content[:json_length])
        label = np.frombuffer(served_v.content[json_length : json_length + 8], dtype=np.int64)[0]
        assert header["outputs"][0]["name"] == "label"
        assert served_c.json()["results"][0]["label"] == label == 7

        # The same fault: an undecodable image; an option value that does not exist.
        junk_c, junk_moved_c = await moved(client, classify(b"not an image", request_id="junk-c"))
        junk_v, junk_moved_v = await moved(client, infer(b"not an image", request_id="junk-v"))
        mode_c, mode_moved_c = await moved(client, classify(png, "?mode=sideways", request_id="mode-c"))
        mode_v, mode_moved_v = await moved(client, infer(png, {"mode": "sideways"}, request_id="mode-v"))

    # the same spans
    served_steps = ["soap.read", "soap.decode", "soap.queue_wait", "soap.compute", "soap.encode"]
    assert step_names(exporter, "same-c") == step_names(exporter, "same-v") == (served_steps, True)
    assert step_names(exporter, "junk-c") == step_names(exporter, "junk-v") == (["soap.read", "soap.decode"], False)
    assert step_names(exporter, "mode-c") == step_names(exporter, "mode-v") == (["soap.read"], False)

    # the same counters moved, by the same amounts, under the same labels (the route label aside)
    assert moved_c == moved_v
    assert moved_c[("soap_images_total", (("mode", "min-aux"), ("model", MODEL)))] == 1
    assert moved_c[("soap_batch_size_images_count", (("model", MODEL),))] == 1
    assert junk_moved_c == junk_moved_v
    assert junk_moved_c[("soap_rejections_total", (("model", MODEL), ("reason", "bad_image")))] == 1
    assert mode_moved_c == mode_moved_v
    assert mode_moved_c[("soap_rejections_total", (("model", MODEL), ("reason", "bad_options")))] == 1

    # the same refusal, in each protocol's shape: {"error": code, "detail": ...} and {"error": "code: message"}
    assert junk_c.status_code == junk_v.status_code == 422
    assert junk_c.json()["error"] == "bad_image"
    assert junk_v.json() == {"error": f"bad_image: {junk_c.json()['detail']}"}
    assert mode_c.status_code == mode_v.status_code == 422
    assert mode_c.json()["error"] == "bad_options"
    problem = mode_c.json()["detail"]
    assert problem.startswith("option mode='sideways' is not allowed")
    # the option's place differs (an option of the query string / a parameter of the request), the problem does not
    assert mode_v.json() == {"error": f"bad_options: {problem.replace('option', 'parameter', 1)}"}
