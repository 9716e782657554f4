"""Provenance of a model: when, from which code, on what hardware, with which exact command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

from .distributed import Process


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


REPOSITORY = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPOSITORY) -> str:
    """HEAD of the repository at `root` (this code's), with "+dirty" when models/ or training/ have local changes:
    the one record of which code produced a model or a result ("unknown" outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "models", "training"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware(process: Process) -> str:
    if process.device.type == "cuda":
        what = torch.cuda.get_device_name(process.device)
    else:
        what = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores visible"
        )
    return f"{process.world_size} x {what}" if process.distributed else what


def command(subcommand: str, options: list[str], process: Process | None = None) -> str:
    """The command line that reproduces a run: `python -m training SUBCOMMAND OPTIONS` (or torchrun with P
    processes)."""
    args = shlex.join([subcommand, *options])
    if process is not None and process.distributed:
        return f"torchrun --nproc_per_node {process.world_size} -m training {args}"
    return f"python -m training {args}"
