"""mode=certify on POST /classify: the real app with the shipped model and real digits, a real uvicorn server,
the server's limits (422/503), metrics, and the lane's policy beside purification."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from support import (
    ROOT,
    ServiceProcess,
    metric_value,
    mnist_image,
    mnist_png,
    serve_app,
    settings_for,
)

from models import load_checkpoint
from models.smoothing import SmoothingConfig, certify, noisy_classifier
from service.certify import CertifyJob
from training.__main__ import main as training_main

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}
FIELDS = {"label", "class_name", "certified_radius", "abstained", "p_lower", "sigma", "samples", "alpha", "seed"}


def pixels(digit: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mnist_image(digit), dtype=np.float32) / 255.0)[None, None]


async def test_certify_answers_a_reproducible_certificate(model_dir):
    async with serve_app(settings_for(model_dir, certify_slice_samples=500, certify_batch=250)) as (app, client):
        r = await client.post(
            "/classify?mode=certify&samples=1000&alpha=0.01&seed=5", content=mnist_png(7), headers=PNG
        )
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert set(result) == FIELDS
    assert result["label"] == 7
    assert result["class_name"] == "7"
    assert not result["abstained"]
    assert result["sigma"] == 0.5  # the checkpoint's training noise
    assert result["samples"] == 1100  # n0 + n
    assert 0 < result["certified_radius"] < 2.0
    assert set(r.json()["timing_ms"]) == {"queue", "compute", "paused", "total"}
    # The same answer offline, from the core module (slices of the service are whole noise batches).
    loaded = load_checkpoint(model_dir)
    config = SmoothingConfig(sigma=0.5, n0=100, n=1000, alpha=0.01, batch_size=250)
    (offline,) = certify(noisy_classifier(loaded.network), pixels(7), config, 10, seed=5)
    assert offline.label == result["label"]
    assert offline.p_lower == pytest.approx(result["p_lower"], abs=1e-12)
    assert offline.radius == pytest.approx(result["certified_radius"], abs=1e-12)
    assert metric_value(metrics, "soap_certify_requests_total", model="mnist-fcn-dr") == 1
    assert metric_value(metrics, "soap_certify_images_total", model="mnist-fcn-dr", outcome="certified") == 1
    assert metric_value(metrics, "soap_certified_radius_count", model="mnist-fcn-dr") == 1


async def test_noise_image_abstains(model_dir):
    """A flat grey image sits between classes: with few samples and a strict α the smoothed classifier abstains."""
    grey = Image.new("L", (28, 28), 128)
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post("/classify?mode=certify&samples=20&alpha=0.0001", content=buffer.getvalue(), headers=PNG)
        metrics = (await client.get("/metrics")).text
    (result,) = r.json()["results"]
    assert result["abstained"]
    assert result["label"] is None
    assert result["certified_radius"] is None
    assert result["p_lower"] <= 0.5
    assert metric_value(metrics, "soap_certify_images_total", model="mnist-fcn-dr", outcome="abstained") == 1


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("mode=certify&samples=5001", "allowed: 1 to 5000"),
        ("mode=certify&samples=0", "greater than or equal to 1"),
        ("mode=certify&alpha=0.5", "less than 0.5"),
        ("mode=min-aux&samples=100", "only used with mode=certify"),
        ("mode=certify&seed=-1", "greater than or equal to 0"),
    ],
)
async def test_certify_limits_are_422(model_dir, query, needle):
    async with serve_app(settings_for(model_dir, max_certify_samples=5000)) as (app, client):
        r = await client.post(f"/classify?{query}", content=mnist_png(3), headers=PNG)
        ok = await client.post("/classify", content=mnist_png(3), headers=PNG)  # the service is unharmed
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_options"
    assert needle in r.text
    assert ok.status_code == 200


async def test_full_certify_lane_is_503_and_purification_still_served(model_dir):
    settings = settings_for(model_dir, max_certify_queue_samples=3_000, certify_slice_samples=1_000)
    async with serve_app(settings) as (app, client):
        lane = app.state.runtime.models["mnist-fcn-dr"].certify
        jobs: list[CertifyJob] = []
        submit = lane.submit
        lane.submit = lambda *args: jobs.append(submit(*args)) or jobs[-1]  # observe the jobs, change nothing

        async def until(condition: Callable[[], bool]) -> None:  # state, not sleeps: a loaded CI machine is slow
            for _ in range(6000):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise TimeoutError("the certify lane did not reach the expected state")

        first = asyncio.create_task(
            client.post("/classify?mode=certify&samples=100000", content=mnist_png(1), headers=PNG)
        )
        await until(lambda: len(jobs) == 1 and jobs[0].state == "running")  # the next two fill and overflow the queue
        second = asyncio.create_task(
            client.post("/classify?mode=certify&samples=2000", content=mnist_png(2), headers=PNG)
        )
        await until(lambda: len(jobs) == 2)
        third = await client.post("/classify?mode=certify&samples=2000", content=mnist_png(4), headers=PNG)
        purified = await client.post("/classify", content=mnist_png(5), headers=PNG)  # not queued behind certify
        results = [await first, await second]
    assert third.status_code == 503
    assert third.json()["error"] == "queue_full"
    assert int(third.headers["retry-after"]) >= 1
    assert purified.status_code == 200
    assert purified.json()["results"][0]["label"] == 5
    assert purified.json()["timing_ms"]["total"] < results[0].json()["timing_ms"]["total"]
    assert [r.status_code for r in results] == [200, 200]


async def test_certify_yields_to_queued_purification(model_dir):
    """While min-aux requests keep arriving, the lane pauses after each slice (share 0.5: about as long as the
    slice took); without purification work it never pauses."""
    settings = settings_for(model_dir, certify_slice_samples=1_000, certify_share=0.5, max_delay_ms=50)
    async with serve_app(settings) as (app, client):
        alone = await client.post("/classify?mode=certify&samples=4000", content=mnist_png(6), headers=PNG)
        task = asyncio.create_task(
            client.post("/classify?mode=certify&samples=4000", content=mnist_png(6), headers=PNG)
        )
        served = 0
        while not task.done():
            r = await client.post("/classify", files=[("file", ("a.png", mnist_png(d), "image/png")) for d in range(8)])
            served += r.status_code == 200
        busy = await task
    assert alone.json()["timing_ms"]["paused"] == 0
    assert busy.json()["timing_ms"]["paused"] > 0
    assert served >= 1
    assert busy.json()["results"] == alone.json()["results"]  # pauses never change the answer


def test_certify_through_a_real_server(model_dir):
    srv = ServiceProcess(["--model", str(model_dir), "--max-certify-samples", "3000"])
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            files = [("file", (f"{d}.png", mnist_png(d), "image/png")) for d in (0, 8)]
            r = client.post("/classify", params={"mode": "certify", "samples": 2000}, files=files)
            over = client.post(
                "/classify", params={"mode": "certify", "samples": 3001}, content=mnist_png(0), headers=PNG
            )
            metrics = client.get("/metrics").text
    finally:
        srv.stop()
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == [0, 8]
    assert [x["seed"] for x in r.json()["results"]] == [0, 1]
    assert all(x["certified_radius"] > 0.3 for x in r.json()["results"])
    assert over.status_code == 422
    assert metric_value(metrics, "soap_certify_images_total", model="mnist-fcn-dr", outcome="certified") == 2


async def test_demo_page_offers_certify(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        page = (await client.get("/")).text
        script = (await client.get("/static/app.js")).text
    assert 'id="certify"' in page
    assert "L<sub>2</sub>" in page
    assert 'mode: "certify"' in script
    assert "certified_radius" in script


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_on_cuda_with_compute_processes_the_lane_certifies_on_the_gpu(model_dir):
    settings = settings_for(model_dir, compute_process=True, device="cuda", certify_batch=250)
    async with serve_app(settings) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        assert next(model.loaded.network.parameters()).device.type == "cpu"  # the parent's metadata copy
        assert model.certify is not None
        assert model.certify.device.type == "cuda"
        r = await client.post(
            "/classify?mode=certify&samples=1000&alpha=0.01&seed=5", content=mnist_png(7), headers=PNG
        )
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    # The same noise (CPU generators) through the same weights: the CPU certificate, up to float rounding.
    config = SmoothingConfig(sigma=0.5, n0=100, n=1000, alpha=0.01, batch_size=250)
    (offline,) = certify(noisy_classifier(load_checkpoint(model_dir).network), pixels(7), config, 10, seed=5)
    assert result["label"] == offline.label == 7
    assert result["p_lower"] == pytest.approx(offline.p_lower, abs=0.01)


async def test_a_certify_request_certifies_with_the_sigma_of_the_model_it_names(model_dir, tmp_path):
    """Issue 26: two models of different training σ behind one service; `?model=NAME&mode=certify` certifies with
    that model's σ (the client picks σ by picking the model), as /v1/models says."""
    quarter = tmp_path / "mnist-fcn-dr-s025"
    shutil.copytree(model_dir, quarter)
    meta = json.loads((quarter / "model.json").read_text())
    meta["noise_std"] = 0.25
    (quarter / "model.json").write_text(json.dumps(meta))
    settings = settings_for(model_dir, quarter, certify_slice_samples=500, certify_batch=250)
    async with serve_app(settings) as (app, client):
        answers = {
            name: await client.post(
                f"/classify?model={name}&mode=certify&samples=500", content=mnist_png(7), headers=PNG
            )
            for name in ("mnist-fcn-dr", quarter.name)
        }
        listed = {m["name"]: m["certify"]["sigma"] for m in (await client.get("/v1/models")).json()["models"]}
    sigmas = {}
    for name, r in answers.items():
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        (result,) = r.json()["results"]
        sigmas[name] = result["sigma"]
    assert sigmas == listed == {"mnist-fcn-dr": 0.5, quarter.name: 0.25}


async def test_a_model_trained_on_unclamped_noise_is_certified_with_unclamped_noise(model_dir, tmp_path):
    """A checkpoint trained on x + δ unclamped (`--no-noise-clamp`) is certified with the same noise: the service's
    certificate is the offline one with clamp off (not the clamped one), and /v1/models says which noise it adds."""
    unclamped = tmp_path / "mnist-fcn-dr-unclamped"
    shutil.copytree(model_dir, unclamped)
    meta = json.loads((unclamped / "model.json").read_text())
    meta |= {"noise_clamp": False, "noise_std": 1.0}  # at σ = 1 the vote is not unanimous: the clamp shows
    (unclamped / "model.json").write_text(json.dumps(meta))
    settings = settings_for(model_dir, unclamped, certify_slice_samples=500, certify_batch=250)
    async with serve_app(settings) as (app, client):
        r = await client.post(
            f"/classify?model={unclamped.name}&mode=certify&samples=1000&alpha=0.01&seed=5",
            content=mnist_png(7),
            headers=PNG,
        )
        listed = {m["name"]: m["certify"]["clamp"] for m in (await client.get("/v1/models")).json()["models"]}
    assert listed == {"mnist-fcn-dr": True, unclamped.name: False}
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    network = load_checkpoint(unclamped).network
    offline = {
        clamp: certify(
            noisy_classifier(network),
            pixels(7),
            SmoothingConfig(sigma=1.0, n0=100, n=1000, alpha=0.01, batch_size=250, clamp=clamp),
            10,
            seed=5,
        )[0]
        for clamp in (True, False)
    }
    assert offline[True].p_lower != offline[False].p_lower  # the two noises give different certificates
    assert result["p_lower"] == pytest.approx(offline[False].p_lower, abs=1e-6)


# The LeNet-DR model of issue 26 (σ 0.5): in the zoo once it ships, under candidates/ while it is being evaluated.
LENET = next(
    (p for p in (ROOT / d / "mnist-lenet-dr-gaussian-s05" for d in ("models/zoo", "candidates")) if p.is_dir()),
    ROOT / "models" / "zoo" / "mnist-lenet-dr-gaussian-s05",
)


async def test_the_lenet_dr_model_is_served_and_certifies_a_digit(one_torch_thread):
    """Issue 26: the service loads the LeNet-DR network (the smoothing papers' LeNet with SOAP's DR head), says its σ,
    classifies and certifies a real digit with it (small n)."""
    settings = settings_for(LENET, certify_slice_samples=500, certify_batch=250)
    async with serve_app(settings) as (app, client):
        info = (await client.get(f"/v1/models/{LENET.name}")).json()
        purified = await client.post("/classify", content=mnist_png(3), headers=PNG)
        certified = await client.post("/classify?mode=certify&samples=500", content=mnist_png(3), headers=PNG)
    assert info["network"] == "mnist-lenet-dr"
    assert info["certify"]["sigma"] == 0.5
    assert "certify" in info["modes"]
    assert purified.status_code == 200, purified.text
    assert purified.json()["results"][0]["label"] == 3
    assert certified.status_code == 200, certified.text
    (result,) = certified.json()["results"]
    assert (result["label"], result["sigma"], result["samples"]) == (3, 0.5, 600)
    assert result["certified_radius"] > 0


async def test_an_ensemble_checkpoint_is_served_and_certifies_a_digit(tmp_path, one_torch_thread):
    """Issue 26: an ensemble of LeNet-DR checkpoints (`python -m training ensemble`) is a model like any other: the
    service loads it by its registered network, says its σ, purifies through the mean DR head and certifies."""
    members = [
        ROOT / "candidates" / n for n in ("mnist-lenet-dr-consistency-a10-s05", "mnist-lenet-dr-gaussian-a10-s05")
    ]
    joined = tmp_path / "mnist-lenet-dr-x2-test"
    assert training_main(["ensemble", *map(str, members), "--out", str(joined), "--device", "cpu"]) == 0
    settings = settings_for(joined, certify_slice_samples=500, certify_batch=250)
    async with serve_app(settings) as (app, client):
        info = (await client.get(f"/v1/models/{joined.name}")).json()
        purified = await client.post("/classify", content=mnist_png(4), headers=PNG)
        certified = await client.post("/classify?mode=certify&samples=500", content=mnist_png(4), headers=PNG)
    assert info["network"] == "mnist-lenet-dr-x2"
    assert info["certify"]["sigma"] == 0.5
    assert purified.status_code == 200, purified.text
    assert purified.json()["results"][0]["label"] == 4
    assert certified.status_code == 200, certified.text
    (result,) = certified.json()["results"]
    assert (result["label"], result["sigma"]) == (4, 0.5)
    assert result["certified_radius"] > 0
