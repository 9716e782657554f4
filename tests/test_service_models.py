"""Several models behind one service: per-model load shedding whatever part of the request names the model (D1),
and models whose auxiliary head was never trained, served without purification (D2). Real app, real zoo models."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest
from support import ROOT, metric_value, mnist_png, serve_app, settings_for

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}
PGD_AT = ROOT / "models" / "zoo" / "mnist-fcn-dr-pgd-at"
SOAP = "mnist-fcn-dr"


def _multipart(model: str) -> dict:
    return {"files": {"file": ("seven.png", mnist_png(7), "image/png")}, "data": {"model": model}}


def _json(model: str) -> dict:
    return {"json": {"images": [base64.b64encode(mnist_png(7)).decode()], "model": model}}


class Gate:
    """Holds one model's compute until opened, so its queue fills deterministically (the compute itself is real)."""

    def __init__(self, batcher) -> None:
        self.open = threading.Event()
        worker = batcher.workers[0]  # in-process apps compute on one worker
        self.batcher, self.real = batcher, worker.compute
        worker.compute = self._compute

    def _compute(self, images, request):
        self.open.wait(30)
        return self.real(images, request)


async def _fill(app, client, model: str) -> tuple[Gate, list[asyncio.Task]]:
    """One request of `model` in compute (held by the gate) and max_queue=2 more queued: its queue is full."""
    batcher = app.state.runtime.models[model].batcher
    gate = Gate(batcher)
    tasks = []
    for depth in (0, 1, 2):
        tasks.append(asyncio.create_task(client.post(f"/classify?model={model}", content=mnist_png(1), headers=PNG)))
        while batcher.depth < depth:
            await asyncio.sleep(0.005)
    while batcher.depth < 2:
        await asyncio.sleep(0.005)
    return gate, tasks


@pytest.mark.parametrize("shape", [_multipart, _json], ids=["multipart", "json"])
async def test_a_model_named_in_the_body_is_shed_by_its_own_queue_only(model_dir, shape):
    settings = settings_for(model_dir, PGD_AT, max_batch_size=1, max_delay_ms=0, max_queue=2)
    async with serve_app(settings) as (app, client):
        # The default model's queue is full: a request naming the other model in its body is still served.
        gate, held = await _fill(app, client, SOAP)
        other = await client.post("/classify", **shape(PGD_AT.name))
        refused_default = await client.post("/classify", **shape(SOAP))
        gate.open.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 3
        # The other model's queue is full: a request naming it in its body is refused, counted under it.
        gate, held = await _fill(app, client, PGD_AT.name)
        refused_other = await client.post("/classify", **shape(PGD_AT.name))
        default = await client.post("/classify", **shape(SOAP))
        gate.open.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 3
        metrics = (await client.get("/metrics")).text
    assert other.status_code == 200, other.text
    assert other.json()["model"] == PGD_AT.name
    assert other.json()["results"][0]["label"] == 7
    assert default.status_code == 200, default.text
    assert default.json()["model"] == SOAP
    for refused in (refused_default, refused_other):
        assert refused.status_code == 503
        assert refused.json()["error"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
    assert PGD_AT.name in refused_other.json()["detail"]
    for model in (SOAP, PGD_AT.name):
        assert metric_value(metrics, "soap_rejections_total", model=model, reason="queue_full") == 1
        duration = metric_value(
            metrics, "soap_request_duration_seconds_count", model=model, route="/classify", status="200"
        )
        assert duration == 3 + 1  # its three held requests and the one that named it in the body


async def test_a_model_named_in_the_query_is_shed_before_its_body_is_read(model_dir):
    settings = settings_for(model_dir, PGD_AT, max_batch_size=1, max_delay_ms=0, max_queue=2)
    async with serve_app(settings) as (app, client):
        gate, held = await _fill(app, client, PGD_AT.name)
        runtime = app.state.runtime
        refused = await client.post(f"/classify?model={PGD_AT.name}", content=b"never read", headers=PNG)
        conflict = await client.post(f"/classify?model={SOAP}", **_multipart(PGD_AT.name))
        gate.open.set()
        await asyncio.gather(*held)
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 503  # not 422 for the bogus body: the body was never read
    assert refused.json()["error"] == "queue_full"
    assert metric_value(metrics, "soap_rejections_total", model=PGD_AT.name, reason="queue_full") == 1
    assert metric_value(metrics, "soap_rejections_total", model=SOAP, reason="queue_full") == 0
    # The query string routes the request: a body naming another model is refused, not silently re-routed.
    assert conflict.status_code == 422
    assert conflict.json()["error"] == "bad_options"
    assert runtime.models[SOAP].batcher.depth == 0


async def test_a_model_without_a_trained_auxiliary_head_is_served_without_purification(model_dir):
    async with serve_app(settings_for(model_dir, PGD_AT)) as (app, client):
        # MNIST test image 0, a 7: min-aux through the untrained head answered 8 (confidence 0.22).
        default = await client.post(
            f"/classify?model={PGD_AT.name}&return_curve=true", content=mnist_png(7), headers=PNG
        )
        refused = [
            await client.post(f"/classify?model={PGD_AT.name}&{query}", content=mnist_png(7), headers=PNG)
            for query in ("mode=min-aux", "mode=fixed&epsilon=0.1")
        ]
        refused_in_body = await client.post(
            "/classify",
            files={"file": ("seven.png", mnist_png(7), "image/png")},
            data={"model": PGD_AT.name, "mode": "min-aux"},
        )
        explicit_none = await client.post(f"/classify?model={PGD_AT.name}&mode=none", content=mnist_png(7), headers=PNG)
        soap = await client.post("/classify?return_curve=true", content=mnist_png(7), headers=PNG)
        listing = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        metrics = (await client.get("/metrics")).text
    assert default.status_code == 200, default.text
    row = default.json()["results"][0]
    assert row["label"] == 7
    assert row["confidence"] > 0.9
    assert row["epsilon"] == 0
    assert len(row["aux_curve"]) == 1  # mode none: the loss at budget 0 only
    assert explicit_none.json()["results"][0] == {**row, "aux_curve": None}
    for r in (*refused, refused_in_body):
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "purification_unavailable"
        assert "auxiliary head was not trained" in body["detail"]
        assert "mode=none" in body["detail"]
    assert len(soap.json()["results"][0]["aux_curve"]) == 11  # the SOAP model still purifies with min-aux
    baseline, trained = listing[PGD_AT.name], listing[SOAP]
    assert (baseline["aux_head_trained"], baseline["modes"], baseline["default_mode"]) == (False, ["none"], "none")
    assert (trained["aux_head_trained"], trained["default_mode"]) == (True, "min-aux")
    assert trained["modes"] == ["min-aux", "fixed", "none", "certify"]  # certify: it records its training σ
    assert metric_value(metrics, "soap_images_total", model=PGD_AT.name, mode="none") == 2  # warm-up is not counted
    assert metric_value(metrics, "soap_images_total", model=PGD_AT.name, mode="min-aux") == 0
    assert metric_value(metrics, "soap_rejections_total", model=PGD_AT.name, reason="bad_options") == 3


async def test_model_endpoints_say_what_the_model_serves_in_clean_values(model_dir):
    """Issue 28 point 5 and issue 26: certify is among the modes of a model that records its training σ, and its σ
    and sample limits are a typed field of /v1/models, /v1/models/{name} and the v2 metadata; the card's URL is a
    path that answers; the budgets are the grid's values as written (0.15, not 0.15000000000000002)."""
    async with serve_app(settings_for(model_dir, PGD_AT)) as (app, client):
        one = (await client.get(f"/v1/models/{SOAP}")).json()
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        card = await client.get(one["robustness"]["model_card"])
        v2 = (await client.get(f"/v2/models/{SOAP}")).json()
        v2_baseline = (await client.get(f"/v2/models/{PGD_AT.name}")).json()
    assert one["modes"] == ["min-aux", "fixed", "none", "certify"]
    certify = {
        "sigma": 0.5,
        "clamp": True,
        "n0": 100,
        "default_samples": 10_000,
        "max_samples": 100_000,
        "default_alpha": 0.001,
    }
    assert one["certify"] == listed[SOAP]["certify"] == v2["certify"] == certify
    baseline = listed[PGD_AT.name]
    assert (baseline["modes"], baseline["certify"], v2_baseline["certify"]) == (["none"], None, None)
    assert one["robustness"]["model_card"] == f"/v1/models/{SOAP}/card"
    assert card.status_code == 200
    assert card.headers["content-type"].startswith("text/markdown")
    assert one["purifier"]["budgets"] == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
