"""models.resolve_device: the one reading of a `--device` option, for training, evaluation and the service."""

from __future__ import annotations

import pytest
import torch

import service.runtime
import training.certify
import training.distributed
import training.evaluate
import training.import_reference
import training.soundness
from models import resolve_device


def test_every_command_resolves_devices_the_same_way() -> None:
    users = (service.runtime, training.distributed, training.certify, training.soundness, training.import_reference)
    assert all(module.resolve_device is resolve_device for module in users)
    # Evaluation resolves its device through the distributed launcher (one process per rank).
    assert training.evaluate.distributed is training.distributed
    assert training.distributed.start("cpu").device == resolve_device("cpu")


def test_auto_is_cuda_when_there_is_one_else_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_an_error_not_a_cpu_run() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_without_an_index_is_this_process_gpu() -> None:
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_processes_share_gpus_over_gloo_and_own_one_over_nccl(monkeypatch) -> None:
    """More processes on a node than GPUs (certification's noise drawn on many CPU cores for one GPU) need Gloo."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device("cuda", 0)
    for local_world_size, expected in (("1", "nccl"), ("2", "nccl"), ("3", "gloo")):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        assert training.distributed.backend(cuda) == expected
        assert training.distributed.backend(torch.device("cpu")) == "gloo"
