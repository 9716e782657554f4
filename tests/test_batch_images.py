"""A batch's images with their pixels decoded where the batch is computed (service/batch_images.py): rows keep their
order across pixel and file parts and across slices, an undecodable file is reported at its own row and fails only
its own request, the compute process decodes them to the same predictions as the event loop would, and the pipeline
defers exactly the small files of a purification."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from support import encode, metric_value, mnist_png, serve_app, settings_for, truncated_png

from models import load_checkpoint
from service.batch_images import BatchImages, ImageFiles
from service.compute_process import ComputeProcess
from service.decode import DecodeLimits, decode_image
from service.pipeline import decode_all
from service.predict import PurifyRequest, predict

SHAPE = (1, 28, 28)
anyio = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


def files(*payloads: bytes) -> ImageFiles:
    return ImageFiles(tuple(payloads), SHAPE, DecodeLimits())


def pixels(*digits: int) -> torch.Tensor:
    return torch.stack([decode_image(mnist_png(d), SHAPE) for d in digits])


def test_rows_keep_their_order_across_parts_and_slices():
    batch = BatchImages([files(mnist_png(0), mnist_png(1)), pixels(2, 3, 4), files(mnist_png(5))])
    assert len(batch) == 6
    decoded, rejected = batch.decode()
    assert rejected == {}
    assert torch.equal(decoded, pixels(0, 1, 2, 3, 4, 5))
    for start, stop in [(0, 6), (1, 4), (2, 5), (4, 6), (5, 6), (0, 1)]:
        part, _ = batch[start:stop].decode()
        assert torch.equal(part, decoded[start:stop]), (start, stop)


def test_an_undecodable_file_is_reported_at_its_row_and_its_pixels_are_blank():
    batch = BatchImages([pixels(7), files(mnist_png(1), truncated_png()), files(truncated_png())])
    decoded, rejected = batch.decode()
    assert sorted(rejected) == [2, 3]
    assert all("truncated" in detail for detail in rejected.values())
    assert torch.count_nonzero(decoded[2:]) == 0
    assert torch.equal(decoded[:2], pixels(7, 1))
    assert batch[3:4].decode()[1] == {0: rejected[3]}  # a slice numbers its own rows


def test_the_wire_form_round_trips():
    batch = BatchImages([pixels(3), files(mnist_png(4))])
    again = BatchImages.from_wire(batch.to_wire())
    assert torch.equal(again.decode()[0], batch.decode()[0])


@pytest.mark.timeout(300)
def test_the_compute_process_decodes_files_to_the_predictions_of_decoded_pixels(model_dir):
    process = ComputeProcess(model_dir, torch.device("cpu"), threads=1)
    process.start()
    try:
        batch = BatchImages([files(mnist_png(0), truncated_png()), pixels(2)])
        there = process.compute(batch, PurifyRequest())
    finally:
        process.close()
    torch.set_num_threads(1)
    here = predict(
        load_checkpoint(model_dir), torch.cat([pixels(0), torch.zeros(1, *SHAPE), pixels(2)]), PurifyRequest()
    )
    assert list(there.rejected) == [1]
    for a, b in zip(here.tensors(), there.tensors(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@anyio
async def test_the_pipeline_defers_only_the_small_files_of_a_purification(model_dir):
    large = encode(Image.new("L", (300, 300), 128), "PNG")  # above the 256 x 256 decoded on the event loop
    async with serve_app(settings_for(model_dir)) as (app, _client):
        runtime = app.state.runtime
        model = runtime.models["mnist-fcn-dr"]
        small = [mnist_png(1), mnist_png(2)]
        deferred = await decode_all(small, model, runtime, defer_small=True)
        assert isinstance(deferred, ImageFiles)
        assert deferred.files == tuple(small)
        assert torch.equal((await decode_all(small, model, runtime)), pixels(1, 2))  # a certification decodes here
        mixed = await decode_all([small[0], large], model, runtime, defer_small=True)
        assert isinstance(mixed, torch.Tensor)
        assert mixed.shape == (2, *SHAPE)


@anyio
async def test_an_undecodable_file_fails_its_request_alone_and_is_not_counted_as_served(model_dir):
    async with serve_app(settings_for(model_dir, max_delay_ms=200)) as (app, client):
        good = [client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(3)]
        two = client.post(
            "/classify",
            files=[("file", ("a.png", mnist_png(5), "image/png")), ("file", ("b.png", truncated_png(), "image/png"))],
        )
        responses = await asyncio.gather(*good, two)
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200, 200, 200, 422]
    assert [r.json()["results"][0]["label"] for r in responses[:3]] == [0, 1, 2]
    assert responses[3].json()["error"] == "bad_image"
    assert responses[3].json()["detail"].startswith("image 1: truncated or corrupt image data")
    batch_sizes = metric_value(metrics, "soap_batch_size_images_sum", model="mnist-fcn-dr")
    assert batch_sizes == 5  # the 422's two images were computed with their batch-mates; "images classified"
    # counts the four that decoded (the refused request's first image was classified, though not answered)
    assert metric_value(metrics, "soap_images_total", model="mnist-fcn-dr", mode="min-aux") == 4
