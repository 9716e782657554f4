"""Operations signals of the service: JSON logs with the request id on every line of a request, the ids of a failed
batch in its log line, per-process metrics of the server and its compute children, the in-flight gauge, the
batch-failure and compute-restart counters, and build information."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from support import ROOT, ServiceProcess, metric_value, mnist_png, serve_app, settings_for

import models
from service.app import create_app
from service.batcher import BatchFailed
from service.predict import PurifyRequest
from service.process_metrics import read_process_stats

PNG = {"Content-Type": "image/png"}


@asynccontextmanager
async def serve_running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An app made here (serve_app makes its own) with its lifespan running, ready, and an in-process client."""
    async with app.router.lifespan_context(app):
        while not app.state.runtime.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://soap.test", timeout=60) as client:
            yield client


def test_process_stats_read_from_proc():
    stats = read_process_stats(os.getpid())
    assert stats is not None
    status = dict(line.split(":", 1) for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines())
    vm_rss = int(status["VmRSS"].split()[0]) * 1024
    assert abs(stats.resident_bytes - vm_rss) < 0.1 * vm_rss  # same figure, read a moment apart
    assert stats.cpu_seconds > 0
    assert stats.open_fds == len(os.listdir("/proc/self/fd"))  # both count the listing's own descriptor
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert read_process_stats(dead.pid) is None


@pytest.mark.anyio
async def test_a_failed_batch_logs_the_ids_of_its_requests_and_is_counted(model_dir, caplog):
    """Two requests share a batch that fails in the real predict step (an input the network cannot take, which
    HTTP decoding would never let through): both fail, one log line names both ids, the counter counts one."""
    async with serve_app(settings_for(model_dir, max_delay_ms=200)) as (app, client):
        model = app.state.runtime.get(None)
        items = []
        for request_id in ("req-a", "req-b"):
            items.append(
                model.batcher.submit(torch.rand(1, 3, 5, 5), PurifyRequest(), time.monotonic() + 10, request_id)
            )
        with caplog.at_level(logging.ERROR, logger="service.batcher"):
            results = await asyncio.gather(*(it.future for it in items), return_exceptions=True)
        assert all(isinstance(r, BatchFailed) for r in results), results
        (record,) = [r for r in caplog.records if "failed" in r.getMessage()]
        assert record.request_ids == ["req-a", "req-b"]
        assert "req-a, req-b" in record.getMessage()
        text = (await client.get("/metrics")).text
        assert metric_value(text, "soap_batch_failures_total", model="mnist-fcn-dr") == 1
        # the next request is served normally
        assert (await client.post("/classify", content=mnist_png(7), headers=PNG)).status_code == 200


@pytest.mark.anyio
async def test_in_flight_gauge_counts_requests_being_served_not_scrapes(model_dir):
    async with serve_app(settings_for(model_dir, max_delay_ms=400, max_batch_size=64)) as (app, client):
        assert metric_value((await client.get("/metrics")).text, "soap_in_flight_requests") == 0
        pending = asyncio.ensure_future(client.post("/classify", content=mnist_png(3), headers=PNG))
        model = app.state.runtime.get(None)
        deadline = time.monotonic() + 5
        while model.batcher.depth == 0:  # the request is queued, its batch waits for batch-mates
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        during = metric_value((await client.get("/metrics")).text, "soap_in_flight_requests")
        assert (await pending).status_code == 200
        after = metric_value((await client.get("/metrics")).text, "soap_in_flight_requests")
    assert during == 1  # the request, not the scrape
    assert after == 0


def compute_children(text: str) -> list[dict[str, str]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "soap_process_resident_memory_bytes" and s.labels["role"] == "compute"
    ]


@pytest.mark.anyio
async def test_process_metrics_cover_server_and_compute_children_and_restarts_are_counted(model_dir):
    """With a pool of two compute children, /metrics reports memory, CPU and open files of the server and of each
    child, labelled by model and worker; a killed child is replaced and its restart counted, for it alone."""
    async with serve_app(settings_for(model_dir, compute_process=True, compute_workers=2)) as (app, client):
        model = app.state.runtime.get(None)
        text = (await client.get("/metrics")).text
        children = sorted(compute_children(text), key=lambda labels: labels["worker"])
        assert children == [{"role": "compute", "model": "mnist-fcn-dr", "worker": w} for w in ("0", "1")]
        for role, labels in (
            ("server", {"model": "", "worker": ""}),
            ("fork_server", {"model": "", "worker": ""}),  # the compute children's parent holds torch too
            ("compute", {"worker": "1"}),
        ):
            assert metric_value(text, "soap_process_resident_memory_bytes", role=role, **labels) > 50e6, role
            assert metric_value(text, "soap_process_open_fds", role=role, **labels) > 3, role
            assert metric_value(text, "soap_process_cpu_seconds_total", role=role, **labels) > 0, role
        first = model.workers[0]
        child_rss = metric_value(text, "soap_process_resident_memory_bytes", role="compute", worker="0")
        assert child_rss == pytest.approx(read_process_stats(first.pid).resident_bytes, rel=0.1)
        assert metric_value(text, "soap_compute_restarts_total", model="mnist-fcn-dr", worker="0") == 0

        old = first.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while first.pid in (None, old):  # replaced on its next batch, or by the batcher after a death in a batch
            assert time.monotonic() < deadline, "the killed child was not replaced"
            assert (await client.post("/classify", content=mnist_png(7), headers=PNG)).status_code == 200
        text = (await client.get("/metrics")).text
    assert metric_value(text, "soap_compute_restarts_total", model="mnist-fcn-dr", worker="0") == 1
    assert metric_value(text, "soap_compute_restarts_total", model="mnist-fcn-dr", worker="1") == 0
    assert len(compute_children(text)) == 2


@pytest.mark.anyio
async def test_build_info_names_version_and_commit(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        text = (await client.get("/metrics")).text
    version = models.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT / "service", capture_output=True, text=True)
    commit = os.environ.get("BUILD_COMMIT") or (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert metric_value(text, "soap_build_info", version=version, commit=commit) == 1


def test_json_logs_carry_the_request_id_on_every_line_of_a_request(model_dir):
    """The real server with --log-format json --access-log: every line is one JSON object; the lines of a request
    (uvicorn's access line included) carry its id; lines outside requests carry an empty id."""
    server = ServiceProcess(["--model", str(model_dir), "--log-format", "json", "--access-log", "--no-compute-process"])
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/classify", content=mnist_png(7), headers={**PNG, "X-Request-ID": "trace-me-1"})
        assert r.status_code == 200
        bad = httpx.post(server.url + "/classify", content=b"junk", headers={**PNG, "X-Request-ID": "trace-me-2"})
        assert bad.status_code == 422
        time.sleep(0.3)
    finally:
        server.stop()
    lines = [line for line in server.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message", "request_id"} <= r.keys() for r in records)
    mine = {r["request_id"]: r for r in records if r["request_id"].startswith("trace-me")}
    assert set(mine) == {"trace-me-1", "trace-me-2"}
    assert '"POST /classify HTTP/1.1" 200' in mine["trace-me-1"]["message"]
    assert '"POST /classify HTTP/1.1" 422' in mine["trace-me-2"]["message"]
    started = [r for r in records if "warmed up" in r["message"]]
    assert started
    assert started[0]["request_id"] == ""


def children_of(parent: Any, spans: Sequence[Any]) -> list[Any]:
    """The spans whose parent is `parent`, by start time."""
    mine = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(mine, key=lambda s: s.start_time)


@pytest.mark.anyio
async def test_tracing_spans_cover_the_steps_of_a_request(model_dir):
    """--tracing with the SDK's in-memory exporter: one request gives a classify span with children read, decode,
    queue wait, compute and encode, in that order in time, each inside its parent; tracing off records nothing."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings_for(model_dir, tracing=True, max_delay_ms=20), tracer_provider=provider)
    async with serve_running(app) as client:
        r = await client.post("/classify", content=mnist_png(7), headers={**PNG, "X-Request-ID": "span-me"})
        assert r.status_code == 200
        bad = await client.post("/classify", content=b"junk", headers=PNG)
        assert bad.status_code == 422
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "soap.classify"]
    assert len(roots) == 2
    (root,) = [s for s in roots if s.attributes["request_id"] == "span-me"]
    children = children_of(root, spans)
    assert [s.name for s in children] == ["soap.read", "soap.decode", "soap.queue_wait", "soap.compute", "soap.encode"]
    for child in children:
        assert child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    for before, after in zip(children, children[1:], strict=False):
        assert before.end_time <= after.start_time + 1_000_000, (before.name, after.name)  # 1 ms slack
    compute = children[3]
    assert compute.attributes["model"] == "mnist-fcn-dr"
    assert compute.attributes["batch_images"] == 1
    timing = r.json()["timing_ms"]
    assert (compute.end_time - compute.start_time) / 1e6 == pytest.approx(timing["compute"], abs=0.01)
    (failed,) = [s for s in roots if s is not root]
    assert not failed.status.is_ok  # the 422 marks its span as an error
    assert [s.name for s in children_of(failed, spans)] == ["soap.read", "soap.decode"]

    exporter.clear()
    async with serve_app(settings_for(model_dir)) as (app, client):  # tracing off (the default)
        assert (await client.post("/classify", content=mnist_png(7), headers=PNG)).status_code == 200
    assert exporter.get_finished_spans() == ()


@pytest.mark.anyio
async def test_metrics_label_epsilon_models_and_static_files_by_one_rule(model_dir):
    """Issue 28 point 6: ε is observed as the grid's value (mode=fixed&epsilon=0.05 counts in le="0.05", not one
    bucket up as the float32 0.0500000007 did); the model label is the model's real name wherever the request named
    it (query, form field, JSON body, v2 path) or the default model's when it named none; files under /static have
    their own route label."""
    name = model_dir.name
    png = mnist_png(7)
    fixed = {"mode": "fixed", "epsilon": "0.05"}
    image_input = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}
    async with serve_app(settings_for(model_dir)) as (app, client):
        answers = [
            await client.post("/classify", params={"model": name, **fixed}, content=png, headers=PNG),
            await client.post("/classify", data={"model": name, **fixed}, files={"file": ("d.png", png, "image/png")}),
            await client.post("/classify", json={"images": [base64.b64encode(png).decode()], "model": name, **fixed}),
            await client.post("/classify", params=fixed, content=png, headers=PNG),
            await client.post(f"/v2/models/{name}/infer", json={"inputs": [image_input], "parameters": fixed}),
            await client.get(f"/v1/models/{name}"),
            await client.get("/static/app.js"),
        ]
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in answers] == [200] * 7, [r.text for r in answers]
    assert metric_value(metrics, "soap_purification_epsilon_bucket", model=name, le="0.03") == 0
    assert metric_value(metrics, "soap_purification_epsilon_bucket", model=name, le="0.05") == 5
    duration = "soap_request_duration_seconds_count"
    assert metric_value(metrics, duration, model=name, route="/classify", status="200") == 4
    assert metric_value(metrics, duration, model=name, route="/v2/models/{name}/infer", status="200") == 1
    assert metric_value(metrics, duration, model=name, route="/v1/models/{name}", status="200") == 1
    assert metric_value(metrics, duration, model="", route="/static", status="200") == 1
    labels = {line.split("{", 1)[1].split("}")[0] for line in metrics.splitlines() if line.startswith(duration)}
    assert not any('route="unmatched"' in ls for ls in labels), labels
    assert not any('model="unknown"' in ls for ls in labels), labels
