"""bf16 autocast and the compiled auxiliary loss (models/acceleration.py) on real MNIST digits, on the CPU.

The GPU measurement (same ε for >= 99 % of images, accuracy within 0.5 points, speed-up) is benchmarks/gpu_check.py's;
here the CPU-testable parts: the default loss is exactly the model's own, compilation changes nothing, and bf16 keeps
the predictions while changing some ε choices (which is why it is off by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import mnist_files, serve_app, settings_for

from models import Acceleration, Precision, aux_loss, aux_loss_fn, load_checkpoint, purify
from service.predict import InlineWorker, PurifyRequest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """100 real MNIST test digits (10 per class) in [0, 1] and their labels."""
    images, labels = [], []
    for digit in range(10):
        for path in sorted((ROOT / "tests" / "data" / "mnist" / str(digit)).glob("*.png"))[:10]:
            images.append(torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0).unsqueeze(0))
            labels.append(digit)
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def fcn():
    return load_checkpoint(ROOT / "models" / "zoo" / "mnist-fcn-dr")


def test_default_acceleration_is_the_models_own_loss(fcn, digits) -> None:
    x, _ = digits
    assert not Acceleration().enabled
    with torch.no_grad():
        assert torch.equal(aux_loss_fn(fcn.network)(x), aux_loss(fcn.network, x))
    plain = purify(fcn.network, x, fcn.purifier)
    explicit = purify(fcn.network, x, fcn.purifier, loss_fn=aux_loss_fn(fcn.network))
    assert torch.equal(plain.epsilon, explicit.epsilon)
    assert torch.equal(plain.images, explicit.images)


def test_compiled_loss_chooses_the_same_epsilon(fcn, digits) -> None:
    """aot_eager traces forward and backward through AOTAutograd (what inductor compiles) without code generation,
    so it must reproduce eager exactly; two batch sizes exercise the recompile to a shape-generic graph."""
    compiled = aux_loss_fn(fcn.network, Acceleration(compile=True, compile_backend="aot_eager"))
    for x in (digits[0], digits[0][:37]):
        eager = purify(fcn.network, x, fcn.purifier)
        fast = purify(fcn.network, x, fcn.purifier, loss_fn=compiled)
        assert torch.equal(fast.epsilon, eager.epsilon)
        assert torch.allclose(fast.images, eager.images, atol=1e-6)
        assert torch.allclose(fast.aux_after, eager.aux_after, rtol=1e-5, atol=1e-7)


def test_bf16_keeps_predictions_and_float32_outputs(fcn, digits) -> None:
    x, y = digits
    bf16 = aux_loss_fn(fcn.network, Acceleration(precision=Precision.BFLOAT16))
    loss = bf16(x)
    assert loss.dtype == torch.float32
    with torch.no_grad():
        assert not torch.equal(loss, aux_loss(fcn.network, x))  # it really ran in bfloat16
        assert torch.allclose(loss, aux_loss(fcn.network, x), rtol=0.05, atol=1e-3)
    eager = purify(fcn.network, x, fcn.purifier)
    fast = purify(fcn.network, x, fcn.purifier, loss_fn=bf16)
    assert fast.images.dtype == torch.float32
    same_epsilon = (fast.epsilon == eager.epsilon).float().mean().item()
    with torch.no_grad():
        acc_eager = (fcn.network(eager.images).argmax(1) == y).float().mean().item()
        acc_fast = (fcn.network(fast.images).argmax(1) == y).float().mean().item()
    # Measured on these 100 digits (CPU): 86 % same ε and identical accuracy (100 %). Below the 99 % GPU target,
    # hence off by default; the assertions catch a broken path (wrong dtype, garbage gradients), not the target.
    assert same_epsilon >= 0.8
    assert abs(acc_fast - acc_eager) <= 0.02


def test_inline_worker_with_compiled_loss_predicts_like_plain(fcn, digits) -> None:
    x, _ = digits
    request = PurifyRequest()
    plain = InlineWorker(fcn, 0).compute(x[:20], request)
    compiled = InlineWorker(fcn, 0, Acceleration(compile=True, compile_backend="aot_eager")).compute(x[:20], request)
    assert torch.equal(compiled.epsilon, plain.epsilon)
    assert torch.allclose(compiled.probs, plain.probs, atol=1e-6)


@pytest.mark.anyio
async def test_service_option_runs_bf16_purification_in_the_compute_process(model_dir) -> None:
    """--purifier-precision bfloat16 reaches the compute child: real digits keep their labels, and the ε it reports
    differ from float32's for some digit (so the option did change the computation)."""
    files = mnist_files(per_digit=2)
    settings = {"compute_process": True, "compute_workers": 1, "torch_threads": 1}
    answers = {}
    for precision in (Precision.FLOAT32, Precision.BFLOAT16):
        async with serve_app(settings_for(model_dir, purifier_precision=precision, **settings)) as (_, client):
            results = []
            for _, path in files:
                r = await client.post("/classify", files={"file": (path.name, path.read_bytes(), "image/png")})
                assert r.status_code == 200, r.text
                results.append(r.json()["results"][0])
            answers[precision] = results
    labels = [digit for digit, _ in files]
    assert [r["label"] for r in answers[Precision.BFLOAT16]] == labels
    assert [r["label"] for r in answers[Precision.FLOAT32]] == labels
    eps32 = [r["epsilon"] for r in answers[Precision.FLOAT32]]
    eps16 = [r["epsilon"] for r in answers[Precision.BFLOAT16]]
    assert eps16 != eps32
