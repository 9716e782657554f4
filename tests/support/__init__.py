"""What the tests share besides fixtures (those are in tests/conftest.py): real images and bad ones (`images`),
checkpoints (`checkpoints`), the app in-process (`apps`), reading /metrics (`metrics`), and, from the benchmark harness
(benchmarks/harness), the real service in a subprocess and a free port. Test modules import from here:
`from support import ServiceProcess, mnist_png`."""

from benchmarks.harness import ROOT
from benchmarks.harness.ports import free_port
from benchmarks.harness.server import ServiceProcess
from support.apps import serve_app, settings_for
from support.checkpoints import SHIPPED, train_tiny_checkpoint
from support.images import (
    MNIST,
    absurd_png,
    animated_gif,
    bad_images,
    bomb_png,
    encode,
    mnist_files,
    mnist_image,
    mnist_path,
    mnist_png,
    multipage_tiff,
    truncated_png,
)
from support.metrics import MissingSeries, metric_value, samples

__all__ = [
    "MNIST",
    "ROOT",
    "SHIPPED",
    "MissingSeries",
    "ServiceProcess",
    "absurd_png",
    "animated_gif",
    "bad_images",
    "bomb_png",
    "encode",
    "free_port",
    "metric_value",
    "mnist_files",
    "mnist_image",
    "mnist_path",
    "mnist_png",
    "multipage_tiff",
    "samples",
    "serve_app",
    "settings_for",
    "train_tiny_checkpoint",
    "truncated_png",
]
