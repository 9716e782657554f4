"""A model's predict step in a child process, so the event loop and the compute never share one GIL.

In one process the compute thread re-takes the interpreter lock between torch operations, and a busy event loop
delays every re-take by up to the switch interval (benchmarks/service_load.py: the predict step ran 84x slower
beside a spinning Python thread). A child per model has its own interpreter: the batcher's thread sends a batch
through a pipe and waits in recv (lock released) until the child answers with the predictions.

On the CPU the child is forked from multiprocessing's fork server, which has torch, `models` and this module imported
already: a start or restart takes ~50 ms, not the ~2 s (more under load) of a fresh interpreter importing torch,
so a worker killed under load (the OOM killer, benchmarks/soak.py's chaos) is back before its queue fills. The fork
server is a fresh process that never computes, so forking it is safe where forking the threaded server would not be.
On a GPU the child is started with "spawn" (a new interpreter: no CUDA state can be inherited). Either way it loads
the checkpoint itself (the model's warm-up batch then goes through the pipe like any other) and ignores
SIGINT/SIGTERM: the parent drains its queue on a signal and then closes the child. A model's pool holds several
such children (service/batcher.py hands each batch to a free one); each has a stable `index` for logs and metrics.
If a child dies during a batch, the call raises ComputeProcessDied (a batcher.WorkerDied: the batcher restarts the
child and computes the batch again); a child found dead before a batch is restarted first.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import Acceleration

from .batch_images import BatchImages
from .batcher import WorkerDied
from .predict import Predictions, PurifyRequest, is_out_of_memory, predict

log = logging.getLogger("service.compute_process")


class ComputeProcessError(RuntimeError):
    """The child failed to start, died, or raised; the message names the cause, never a traceback."""


class ComputeProcessDied(ComputeProcessError, WorkerDied):
    """The child exited (killed, crashed) while computing a batch or while starting for one."""


class ComputeProcess:
    """One worker of a model's pool (batcher.Worker): `process.compute(images, request) -> Predictions` like
    `predict`, in the child. Thread-safe. `nice` lowers the child's scheduling priority (added to the parent's)."""

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        threads: int,
        index: int = 0,
        nice: int = 0,
        acceleration: Acceleration | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        self._args = (str(checkpoint), str(device), threads, nice, acceleration or Acceleration())
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection[Any, Any] | None = None  # set together with _proc
        self._lock = threading.Lock()
        self._on_restart = on_restart or (lambda: None)  # metrics: soap_compute_restarts_total
        self._starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def start(self) -> None:
        """Start the child and wait until it has loaded the model (seconds: it imports torch)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> Connection[Any, Any]:
        self._stop_locked()
        self._starts += 1
        if self._starts > 1:  # every start after the first (successful or not) is a restart: crash loops count
            self._on_restart()
        context = _context(self._args[1])
        parent, child = context.Pipe()
        proc = context.Process(
            target=_child_main, args=(child, *self._args), name=f"soap-compute-{self.index}", daemon=True
        )
        proc.start()
        child.close()
        try:
            status, detail = parent.recv()
        except (EOFError, OSError):
            parent.close()  # a restart loop must not leak the pipe's descriptors
            proc.join(5)
            # Died, not refused: a child killed while it starts (SIGKILL, the OOM killer) is a worker that died, so
            # a batch that was waiting for this restart is computed again on another worker, as if the child had
            # died during the batch (the soak's 500s under kills every 5 s came from here).
            raise ComputeProcessDied(
                f"the compute process (worker {self.index}) exited while starting (exit code {proc.exitcode})"
            ) from None
        if status != "ready":
            parent.close()
            proc.join(5)
            raise ComputeProcessError(f"the compute process could not start: {detail}")
        self._proc, self._conn = proc, parent
        log.info("compute process %d (worker %d) serving %s", proc.pid, self.index, self._args[0])
        return parent

    def compute(self, images: torch.Tensor | BatchImages, request: PurifyRequest) -> Predictions:
        # Pixels go as an array, a batch with image files as its parts (the child decodes the files); never as
        # tensors, which multiprocessing would send through shared memory.
        wire = images.numpy() if isinstance(images, torch.Tensor) else images.to_wire()
        with self._lock:
            conn = self._conn
            if conn is None or self._proc is None or not self._proc.is_alive():
                conn = self._start_locked()
            try:
                conn.send((wire, request.mode, request.epsilon))
                status, payload = conn.recv()
            except (EOFError, OSError):
                proc = self._proc
                self._stop_locked()  # reaps the child: its exit code is known after this
                code = proc.exitcode if proc is not None else None
                raise ComputeProcessDied(
                    f"compute process (worker {self.index}) exited during a batch (exit code {code})"
                ) from None
        return reply_to_predictions(status, payload)

    def close(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError):
            conn.send(None)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()


# What the fork server imports before it forks any child: what a child would import first thing.
FORK_SERVER_PRELOAD = ["torch", "models", "service.compute_process"]


def _context(device: str) -> multiprocessing.context.SpawnContext | multiprocessing.context.ForkServerContext:
    """Fork-server children on the CPU (fast starts, module docstring); spawned ones on an accelerator."""
    if device != "cpu" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return context


def reply_to_predictions(status: str, payload: Any) -> Predictions:
    """The child's reply as the parent's result: predictions, or the error to raise. An out-of-memory error in the
    child becomes torch.OutOfMemoryError here, so predict_in_chunks halves the batch and retries as in-process."""
    if status == "ok":
        arrays, rejected = payload
        return Predictions.of((torch.from_numpy(array) for array in arrays), rejected)
    kind, message = payload
    if kind == "out_of_memory":
        raise torch.OutOfMemoryError(message)
    raise ComputeProcessError(f"{kind} in the compute process: {message}")


def _child_main(
    conn: Connection[Any, Any], checkpoint: str, device: str, threads: int, nice: int, acceleration: Acceleration
) -> None:
    """The child: load, then answer batches until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)
    from models import aux_loss_fn, load_checkpoint

    try:
        loaded = load_checkpoint(checkpoint, torch.device(device))  # the parent's warm-up batch comes next
        loss_fn = aux_loss_fn(loaded.network, acceleration) if acceleration.enabled else None
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        wire, mode, epsilon = message
        images = torch.from_numpy(wire) if isinstance(wire, np.ndarray) else BatchImages.from_wire(wire)
        try:
            p = predict(loaded, images, PurifyRequest(mode, epsilon), loss_fn)
            arrays = tuple(np.ascontiguousarray(t.numpy()) for t in p.tensors())
            reply: tuple[str, object] = ("ok", (arrays, p.rejected))
        except Exception as exc:  # noqa: BLE001 - this batch only; the child keeps serving
            kind = "out_of_memory" if is_out_of_memory(exc) else type(exc).__name__
            reply = ("error", (kind, str(exc)[:500]))
            if kind == "out_of_memory" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        conn.send(reply)
