"""Devices and processes: pick the device, and join a torchrun process group when launched by torchrun.

`torchrun --nproc_per_node N -m training train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we then train with
DistributedDataParallel on NCCL (CUDA) or Gloo (CPU, or more processes than GPUs). A plain `python -m training train`
is world size 1.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models import resolve_device


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device_name: str = "auto") -> Process:
    """Join the torchrun process group if there is one; return this process's rank and device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(device_name, local_rank)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend(device))
    return Process(rank, world_size, local_rank, device)


def backend(device: torch.device) -> str:
    """NCCL when every process on this node has a GPU of its own, else Gloo. Certification may run more processes
    than GPUs (each draws its images' noise on a CPU core and shares the GPU), which NCCL refuses."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local_world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def stop(process: Process) -> None:
    """Leave the process group. DistributedDataParallel's reducer sits in reference cycles (its hooks), so it can
    outlive `train` until the interpreter's final collection, after the group is gone; collecting first frees it
    (and gloo's pending work) while everything it points at still exists."""
    if process.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, process: Process) -> torch.Tensor:
    """Sum a tensor of statistics over all processes (identity for a single process)."""
    if process.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(process: Process) -> None:
    if process.distributed:
        dist.barrier()
