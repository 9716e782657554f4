"""Suite-wide settings and the fixtures several test modules share (helpers that are not fixtures: tests/support,
the real service in a subprocess: benchmarks/harness). OpenMP threads that spin while waiting waste a busy 2-core CI
machine (the service sets the same policy); this must happen before torch is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import SHIPPED, train_tiny_checkpoint

from models import load_checkpoint


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of many tiny batches (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on 2 shared
    cores one torch thread runs them faster than two handing work back and forth. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The shipped default model, models/zoo/mnist-fcn-dr."""
    load_checkpoint(SHIPPED)  # fails loudly (CheckpointError) if the zoo copy is missing or damaged
    return SHIPPED


@pytest.fixture(scope="session")
def fresh_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mnist-fcn-dr trained for a few steps here (a model whose weights differ from the shipped one)."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny-fcn")


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio (the service's loop), not trio."""
    return "asyncio"
