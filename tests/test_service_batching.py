"""Micro-batching behaviour on the real app: batch formation, admission control, deadlines, dropped clients,
failure isolation, out-of-memory halving and draining."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import generate_latest
from support import metric_value, mnist_png, serve_app, settings_for

from service.app import create_app
from service.predict import PredictionRows, Predictions, PurifyRequest, predict, predict_in_chunks

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


async def test_concurrent_requests_share_batches_counted_in_images(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=8, max_delay_ms=300)) as (app, client):
        responses = await asyncio.gather(
            *(client.post("/classify", content=mnist_png(d % 10), headers=PNG) for d in range(16))
        )
        hist = app.state.runtime.metrics.batch_size.labels("mnist-fcn-dr")
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["results"][0]["label"] for r in responses] == [d % 10 for d in range(16)]
    batches = sum(b.get() for b in hist._buckets)
    assert hist._sum.get() == 16
    assert batches == 2  # two full batches of 8 images, not 16 batches of 1


async def test_a_lone_request_waits_at_most_max_delay(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=50)) as (app, client):
        body = (await client.post("/classify", content=mnist_png(3), headers=PNG)).json()
    assert 40 <= body["timing_ms"]["queue"] < 1000


async def test_queue_full_answers_503_with_retry_after_at_once(model_dir):
    settings = settings_for(model_dir, max_batch_size=64, max_delay_ms=600, max_queue=2)
    async with serve_app(settings) as (app, client):
        waiting = [asyncio.create_task(client.post("/classify", content=mnist_png(d), headers=PNG)) for d in (1, 2)]
        while app.state.runtime.models["mnist-fcn-dr"].batcher.depth < 2:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        start = loop.time()
        refused = await client.post("/classify", content=mnist_png(3), headers=PNG)
        refused_after = loop.time() - start
        accepted = await asyncio.gather(*waiting)
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 503
    assert refused.json()["error"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused_after < 0.3  # at once, not after the queued batch
    assert [r.status_code for r in accepted] == [200, 200]
    assert metric_value(metrics, "soap_rejections_total", model="mnist-fcn-dr", reason="queue_full") == 1


async def test_deadline_gives_504_when_compute_has_not_started(model_dir):
    settings = settings_for(model_dir, max_batch_size=64, max_delay_ms=2000, request_timeout_s=0.2)
    async with serve_app(settings) as (app, client):
        r = await client.post("/classify", content=mnist_png(5), headers=PNG)
        depth = app.state.runtime.models["mnist-fcn-dr"].batcher.depth
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 504
    assert r.json()["error"] == "deadline_exceeded"
    assert depth == 0  # it left the queue
    assert metric_value(metrics, "soap_rejections_total", reason="deadline") == 1
    assert metric_value(metrics, "soap_images_total", mode="min-aux") == 0  # never computed


async def test_a_client_that_went_away_is_dropped_before_compute(model_dir):
    """Drives the ASGI app like a server whose client disconnects while its request is queued."""
    app = create_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=400))
    runtime = app.state.runtime
    body = mnist_png(6)
    disconnect = asyncio.Event()
    sent: list[dict] = []

    async def receive():
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    async with app.router.lifespan_context(app):
        while not runtime.ready:
            await asyncio.sleep(0.01)
        task = asyncio.create_task(app(scope, receive, send))
        batcher = runtime.models["mnist-fcn-dr"].batcher
        while batcher.depth == 0:
            await asyncio.sleep(0.005)
        disconnect.set()
        await asyncio.wait_for(task, 5)
        assert batcher.depth == 0
        await asyncio.sleep(0.5)  # past max_delay: a batch would have run by now
    text = generate_latest(runtime.metrics.registry).decode()
    assert metric_value(text, "soap_rejections_total", reason="client_gone") == 1
    assert metric_value(text, "soap_images_total", mode="min-aux") == 0
    assert [m["status"] for m in sent if m.get("type") == "http.response.start"] == [499]


async def test_a_failing_batch_fails_only_its_requests_and_the_worker_survives(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=150)) as (app, client):
        worker = app.state.runtime.models["mnist-fcn-dr"].workers[0]
        real = worker.compute
        calls = []

        def explode_once(images, request):
            calls.append(len(images))
            if len(calls) == 1:
                raise RuntimeError("simulated kernel failure in /secret/path")
            return real(images, request)

        worker.compute = explode_once
        failed = await asyncio.gather(*(client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(3)))
        after = await client.post("/classify", content=mnist_png(8), headers=PNG)
        ready = await client.get("/readyz")
    assert calls[0] == 3  # the three requests were one batch
    for r in failed:
        assert r.status_code == 500
        assert r.json()["error"] == "batch_failed"
        assert "/secret/path" not in r.text
        assert "Traceback" not in r.text
    assert after.status_code == 200
    assert after.json()["results"][0]["label"] == 8
    assert ready.status_code == 200


@pytest.mark.parametrize("extra_rows", [-1, 1], ids=["a_row_short", "a_row_over"])
async def test_a_result_without_one_row_per_image_fails_its_batch_and_names_the_requests(model_dir, caplog, extra_rows):
    async with serve_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=150)) as (app, client):
        worker = app.state.runtime.models["mnist-fcn-dr"].workers[0]
        real = worker.compute
        calls = []

        def wrong_rows_once(images, request):
            calls.append(len(images))
            p = real(images, request)
            if len(calls) > 1:
                return p
            rows = torch.arange(len(images) + extra_rows) % len(images)
            return Predictions.of(t[rows] for t in p.tensors())

        worker.compute = wrong_rows_once
        ids = [f"d7-{d}" for d in range(3)]
        failed = await asyncio.gather(
            *(
                client.post("/classify", content=mnist_png(d), headers={**PNG, "X-Request-ID": i})
                for d, i in enumerate(ids)
            )
        )
        after = await client.post("/classify", content=mnist_png(8), headers=PNG)
    assert calls[0] == 3  # the three requests were one batch
    for r in failed:
        assert r.status_code == 500
        assert r.json()["error"] == "batch_failed"
        assert "WrongRowCount" in r.json()["detail"]
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "service.batcher"]
    assert any(all(i in line for i in ids) for line in logged), logged
    assert after.status_code == 200
    assert after.json()["results"][0]["label"] == 8


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(model_dir):
    from models import load_checkpoint

    loaded = load_checkpoint(model_dir)
    x = torch.stack([torch.rand(1, 28, 28) for _ in range(10)])
    sizes = []

    def fits_three(chunk):
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(loaded, chunk, PurifyRequest())

    result, chunk = predict_in_chunks(fits_three, x, 16)
    whole = predict(loaded, x, PurifyRequest())
    assert chunk == 2
    assert sizes[:3] == [10, 8, 4]  # 16 -> 8 -> 4 -> 2, then slices of 2
    assert torch.allclose(result.probs, whole.probs, atol=1e-5)
    assert torch.equal(result.epsilon, whole.epsilon)
    with pytest.raises(torch.OutOfMemoryError):
        predict_in_chunks(lambda c: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), x, 4)
    with pytest.raises(ValueError, match="bad"):  # other errors are not retried
        predict_in_chunks(lambda c: (_ for _ in ()).throw(ValueError("bad")), x, 4)


async def test_out_of_memory_inside_the_service_is_retried_in_halves(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=8, max_delay_ms=150)) as (app, client):
        batcher = app.state.runtime.models["mnist-fcn-dr"].batcher
        worker = batcher.workers[0]
        real = worker.compute

        def small_gpu(images, request):
            if len(images) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return real(images, request)

        worker.compute = small_gpu
        rs = await asyncio.gather(*(client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(6)))
    assert [r.status_code for r in rs] == [200] * 6
    assert [r.json()["results"][0]["label"] for r in rs] == list(range(6))
    assert batcher.chunk_size == 2


async def test_draining_refuses_new_work_but_answers_accepted_work(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=300)) as (app, client):
        runtime = app.state.runtime
        accepted = [asyncio.create_task(client.post("/classify", content=mnist_png(d), headers=PNG)) for d in range(5)]
        while runtime.models["mnist-fcn-dr"].batcher.depth < 5:
            await asyncio.sleep(0.005)
        runtime.begin_drain()
        ready = await client.get("/readyz")
        refused = await client.post("/classify", content=mnist_png(1), headers=PNG)
        done = await asyncio.gather(*accepted)
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 503
    assert ready.json()["error"] == "not_ready"
    assert refused.status_code == 503
    assert refused.json()["error"] == "shutting_down"
    assert "retry-after" in refused.headers
    assert [r.status_code for r in done] == [200] * 5
    assert metric_value(metrics, "soap_ready") == 0


async def test_stopping_the_runtime_finishes_the_queue_first(model_dir):
    app = create_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=5000))
    runtime = app.state.runtime
    async with app.router.lifespan_context(app):
        while not runtime.ready:
            await asyncio.sleep(0.01)
        batcher = runtime.models["mnist-fcn-dr"].batcher
        items = [batcher.submit(torch.zeros(1, 1, 28, 28), PurifyRequest(), 1e12) for _ in range(3)]
    # leaving the lifespan stopped the runtime: queued work was computed (not after 5 s of delay) and answered
    assert all(isinstance(it.future.result().predictions, PredictionRows) for it in items)
    assert [it.future.result().batch_images for it in items] == [3, 3, 3]
    assert not batcher.running


async def test_requests_with_different_settings_never_share_a_batch(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=64, max_delay_ms=200)) as (app, client):
        worker = app.state.runtime.models["mnist-fcn-dr"].workers[0]
        real, seen = worker.compute, []

        def spy(images, request):
            seen.append((request.mode, request.epsilon, len(images)))
            return real(images, request)

        worker.compute = spy
        queries = ["", "?mode=none", "", "?mode=fixed&epsilon=0.2", "?mode=none", ""]
        rs = await asyncio.gather(
            *(client.post("/classify" + q, content=mnist_png(i), headers=PNG) for i, q in enumerate(queries))
        )
    assert [r.status_code for r in rs] == [200] * 6
    assert sorted(seen) == sorted([("min-aux", None, 3), ("none", None, 2), ("fixed", 0.2, 1)])
    assert [r.json()["results"][0]["epsilon"] for r in rs][1::3] == [0, 0]
    assert rs[3].json()["results"][0]["epsilon"] == pytest.approx(0.2)


async def test_readyz_is_503_until_the_models_are_warmed_up(model_dir):
    import httpx

    app = create_app(settings_for(model_dir))
    model = app.state.runtime.models["mnist-fcn-dr"]
    release = threading.Event()
    real_warmup = model.warmup

    def slow_warmup(worker):
        release.wait(10)
        real_warmup(worker)

    model.warmup = slow_warmup
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        before = await client.get("/readyz")
        alive = await client.get("/healthz")
        release.set()
        for _ in range(500):
            if app.state.runtime.ready:
                break
            await asyncio.sleep(0.01)
        after = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text
    assert before.status_code == 503
    assert before.json()["error"] == "not_ready"
    assert alive.status_code == 200
    assert after.status_code == 200
    assert metric_value(metrics, "soap_ready") == 1


async def test_a_failed_warm_up_fails_queued_requests_and_readiness(model_dir):
    import httpx

    app = create_app(settings_for(model_dir, max_delay_ms=1))
    model = app.state.runtime.models["mnist-fcn-dr"]
    release = threading.Event()

    def broken_warmup(worker):
        release.wait(10)
        raise RuntimeError("device lost")

    model.warmup = broken_warmup
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        pending = asyncio.create_task(client.post("/classify", content=mnist_png(1), headers=PNG))
        while model.batcher.depth == 0:
            await asyncio.sleep(0.01)
        release.set()
        failed = await asyncio.wait_for(pending, 10)
        ready = await client.get("/readyz")
        refused = await client.post("/classify", content=mnist_png(1), headers=PNG)
    assert failed.status_code == 500
    assert failed.json()["error"] == "batch_failed"
    assert ready.status_code == 503
    assert refused.status_code == 503
    assert refused.json()["error"] == "model_unavailable"
