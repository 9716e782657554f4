"""Shared helpers for the service tests (no tests here): checkpoints, apps, servers and real images.

The service tests import what they need from this module; pytest collects it but finds no tests.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from models import aux_loss, create_model, save_checkpoint, training_losses
from models.checkpoint import Calibration, meta_for
from service.app import create_app
from service.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "tests" / "data" / "mnist"
SHIPPED = ROOT / "models" / "zoo" / "mnist-fcn-dr"


def mnist_files(per_digit: int = 3) -> list[tuple[int, Path]]:
    """(label, path) of real MNIST test digits, `per_digit` of each class."""
    return [(d, p) for d in range(10) for p in sorted((MNIST / str(d)).glob("*.png"))[:per_digit]]


def mnist_path(digit: int = 7, index: int = 0) -> Path:
    """The `index`-th real MNIST test image of class `digit` (tests/data/mnist), as a file."""
    return sorted((MNIST / str(digit)).glob("*.png"))[index]


def mnist_png(digit: int = 7, index: int = 0) -> bytes:
    """The same image's PNG bytes."""
    return mnist_path(digit, index).read_bytes()


def mnist_image(digit: int = 7, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(mnist_png(digit, index))).convert("L")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _mnist_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    files = mnist_files(per_digit=30)
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0).unsqueeze(0)
            for _, p in files
        ]
    )
    y = torch.tensor([d for d, _ in files])
    return x, y


def train_tiny_checkpoint(directory: Path, steps: int = 30) -> Path:
    """A freshly trained mnist-fcn-dr (a few SGD steps on the 300 test-data digits), saved with a calibration."""
    torch.manual_seed(0)
    model = create_model("mnist-fcn-dr")
    x, y = _mnist_tensors()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        losses = training_losses(model, x[idx], y[idx])
        loss = losses.cls_loss + 100.0 * losses.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        aux = aux_loss(model, x)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    quantiles = {q: torch.quantile(aux, float(q)).item() for q in ("0.5", "0.9", "0.95", "0.99")}
    meta = meta_for(
        model,
        network="mnist-fcn-dr",
        dataset="mnist",
        class_names=[str(i) for i in range(10)],
        aux_head_trained=True,  # trained with the reconstruction loss above
        training={"note": "test fixture: 30 SGD steps on tests/data/mnist"},
        metrics={"clean_accuracy": accuracy},
        calibration=Calibration(n=len(x), aux_loss_quantiles=quantiles, suspicious_quantile="0.99"),
    )
    return save_checkpoint(model, meta, directory)


def settings_for(*models: Path, **overrides) -> ServiceSettings:
    """In-process apps compute in a thread unless a test asks for the child process (the service's default, which
    the real-server tests and tests/test_compute_process.py exercise): a child per app would add seconds each."""
    return ServiceSettings(models=list(models), **{"compute_process": False, **overrides})


@asynccontextmanager
async def serve_app(settings: ServiceSettings, timeout: float = 60.0):
    """The real app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + timeout
        while not app.state.runtime.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not become ready")
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://soap.test", timeout=60) as client:
            yield app, client


def metric_value(text: str, name: str, **labels: str) -> float:
    """Value of one sample in a Prometheus exposition (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


# ---------------------------------------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service ...` in a subprocess on a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # A file, not a pipe: a chatty server must never block on it. It lives as long as the server (output() reads
        # it), so no `with`.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the server, see above
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready: " + self.output())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------- bad inputs


def truncated_png() -> bytes:
    data = mnist_png(3)
    return data[: len(data) // 2]


def bomb_png(side: int = 6000) -> bytes:
    """A small file declaring side x side pixels (36 M for 6000): a decompression bomb under the default limit."""
    return encode(Image.new("L", (side, side)), "PNG", optimize=False)


def absurd_png() -> bytes:
    return encode(Image.new("L", (20000, 1)), "PNG")


def animated_gif() -> bytes:
    frames = [mnist_image(d) for d in (1, 2, 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    frames = [mnist_image(d) for d in (4, 5)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


_BAD_CACHE: dict[str, bytes] = {}


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (payload, a word the error detail must contain); every one must be refused with 422."""
    if not _BAD_CACHE:
        _BAD_CACHE.update(bomb=bomb_png(), absurd=absurd_png(), gif=animated_gif(), tiff=multipage_tiff())
    return {
        "empty": (b"", "empty"),
        "not_an_image": (b"%PDF-1.4 this is not an image at all" * 10, "not an image"),
        "truncated": (truncated_png(), "truncated"),
        "decompression_bomb": (_BAD_CACHE["bomb"], "decompression bomb"),
        "absurd_dimensions": (_BAD_CACHE["absurd"], "dimensions"),
        "animated_gif": (_BAD_CACHE["gif"], "animated"),
        "multipage_tiff": (_BAD_CACHE["tiff"], "multi-page"),
    }
