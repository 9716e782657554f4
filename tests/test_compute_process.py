"""The compute child process (service/compute_process.py, the service's default): same predictions as computing
in-process, a failing batch fails alone, a dead child is replaced, a bad checkpoint fails the start clearly, and a
real app serves through it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from support import mnist_png, serve_app, settings_for

from models import load_checkpoint
from service.compute_process import ComputeProcess, ComputeProcessError, reply_to_predictions
from service.predict import PurifyRequest, predict, predict_in_chunks

PNG = {"Content-Type": "image/png"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def process(model_dir):
    proc = ComputeProcess(model_dir, torch.device("cpu"), threads=1)
    proc.start()
    yield proc
    proc.close()


def test_child_predictions_equal_in_process_predictions(process, model_dir):
    torch.manual_seed(0)
    images = torch.rand(5, 1, 28, 28)
    torch.set_num_threads(1)
    here = predict(load_checkpoint(model_dir), images, PurifyRequest())
    there = process.compute(images, PurifyRequest())
    for a, b in zip(here.tensors(), there.tensors(), strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6)
    fixed = process.compute(images, PurifyRequest("fixed", 0.2))
    assert torch.allclose(fixed.epsilon, torch.full((5,), 0.2))


def test_a_failing_batch_fails_alone_and_the_child_keeps_serving(process):
    with pytest.raises(ComputeProcessError, match="RuntimeError in the compute process"):
        process.compute(torch.rand(2, 3, 5, 5), PurifyRequest())  # wrong shape for the FCN
    pid = process.pid
    assert process.compute(torch.rand(2, 1, 28, 28), PurifyRequest()).probs.shape == (2, 10)
    assert process.pid == pid  # same child


def test_out_of_memory_in_the_child_halves_the_batch_like_in_process():
    """The child reports CUDA out-of-memory as a kind; the parent re-raises it as torch.OutOfMemoryError, which
    predict_in_chunks answers by halving the chunk (here: a fake child that runs out of memory above 2 images)."""

    def child(images: torch.Tensor):
        if images.shape[0] > 2:
            return reply_to_predictions("error", ("out_of_memory", "CUDA out of memory (simulated)"))
        n = images.shape[0]
        arrays = (
            torch.ones(n, 10).numpy(),
            torch.zeros(n).numpy(),
            torch.zeros(n).numpy(),
            torch.zeros(n).numpy(),
            torch.zeros(n, 11).numpy(),
            images.numpy(),
        )
        return reply_to_predictions("ok", (arrays, {}))

    predictions, chunk = predict_in_chunks(child, torch.rand(7, 1, 28, 28), 8)
    assert chunk == 2
    assert len(predictions) == 7
    with pytest.raises(ComputeProcessError, match="ValueError in the compute process: bad"):
        reply_to_predictions("error", ("ValueError", "bad"))


def test_a_dead_child_fails_its_batch_and_is_replaced(process):
    pid = process.pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    # The parent notices on the next call: either the send/recv fails (that batch fails) or the child is restarted
    # first.
    failure = ""
    try:
        result = process.compute(torch.rand(1, 1, 28, 28), PurifyRequest())
    except ComputeProcessError as exc:
        failure = str(exc)
        result = process.compute(torch.rand(1, 1, 28, 28), PurifyRequest())
    assert not failure or "exited" in failure, failure
    assert result.probs.shape == (1, 10)
    assert process.pid not in (None, pid)


def test_a_bad_checkpoint_fails_the_start_with_its_reason(tmp_path):
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ComputeProcessError, match="could not start"):
        ComputeProcess(tmp_path, torch.device("cpu"), threads=1).start()


@pytest.mark.anyio
async def test_the_app_serves_through_the_child_and_closes_it(model_dir):
    async with serve_app(settings_for(model_dir, compute_process=True)) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        pid = model.workers[0].pid
        assert pid is not None
        assert pid != os.getpid()
        r = await client.post("/classify", content=mnist_png(7), headers=PNG)
        assert r.status_code == 200
        assert r.json()["results"][0]["label"] == 7
    assert model.workers[0].pid is None  # the lifespan's end closed it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.anyio
async def test_on_cuda_the_child_computes_and_the_parent_keeps_its_copy_on_the_cpu(model_dir):
    async with serve_app(settings_for(model_dir, compute_process=True, device="cuda")) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        assert next(model.loaded.network.parameters()).device.type == "cpu"
        assert model.device.type == "cuda"
        r = await client.post("/classify", content=mnist_png(7), headers=PNG)
        assert r.status_code == 200
        assert r.json()["results"][0]["label"] == 7
        info = (await client.get("/metrics")).text
        assert 'device="cuda' in info
