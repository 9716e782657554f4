"""A model's predict step in a child process, so the event loop and the compute never share one GIL.

In one process the compute thread re-takes the interpreter lock between torch operations, and a busy event loop
delays every re-take by up to the switch interval (benchmarks/service_load.py: the predict step ran 84x slower
beside a spinning Python thread). A child per model has its own interpreter: the batcher's thread sends a batch
through a pipe and waits in recv (lock released) until the child answers with the predictions.

The child is started with "spawn" (safe with CUDA and with the parent's threads), loads the checkpoint itself
(the model's warm-up batch then goes through the pipe like any other) and ignores SIGINT/SIGTERM: the parent
drains its queue on a signal and then closes the child. A model's pool holds several such children
(service/batcher.py hands each batch to a free one); each has a stable `index` for logs and metrics. If a child
dies during a batch, the call raises ComputeProcessDied (a batcher.WorkerDied: the batcher restarts the child and
computes the batch again); a child found dead before a batch is restarted first.

A restart takes seconds (the child imports torch and loads the checkpoint). So a pool keeps one `SpareProcess`: a
child started ahead of need, which the worker that lost its child adopts at once; a new spare then starts in the
background. Under a kill every few seconds at 80 % load, restarts that each took seconds filled the queue (503s);
the spare makes a restart cost one warm-up batch.
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

from .batcher import WorkerDied
from .predict import Predictions, PurifyRequest, is_out_of_memory, predict

log = logging.getLogger("service.compute_process")


class ComputeProcessError(RuntimeError):
    """The child failed to start, died, or raised; the message names the cause, never a traceback."""


class ComputeProcessDied(ComputeProcessError, WorkerDied):
    """The child exited (killed, crashed) while computing a batch or while starting for one."""


Child = tuple[multiprocessing.process.BaseProcess, "Connection[Any, Any]"]  # a started child and its pipe
ChildArgs = tuple[str, str, int, int, Acceleration]  # checkpoint, device, threads, nice, acceleration


def _child_args(
    checkpoint: Path, device: torch.device, threads: int, nice: int, acceleration: Acceleration | None
) -> ChildArgs:
    return str(checkpoint), str(device), threads, nice, acceleration or Acceleration()


def _launch(args: ChildArgs, name: str) -> Child:
    """Spawn a compute child and wait until it has loaded the model."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    proc = context.Process(target=_child_main, args=(child, *args), name=name, daemon=True)
    proc.start()
    child.close()
    try:
        status, detail = parent.recv()
    except (EOFError, OSError):
        parent.close()  # a restart loop must not leak the pipe's descriptors
        proc.join(5)
        # Died, not refused: a child killed while it starts (SIGKILL, the OOM killer) is a worker that died, so a
        # batch that was waiting for this restart is computed again on another worker, as if the child had died
        # during the batch (the soak's 500s under kills every 5 s came from here).
        raise ComputeProcessDied(
            f"the compute process ({name}) exited while starting (exit code {proc.exitcode})"
        ) from None
    if status != "ready":
        parent.close()
        proc.join(5)
        raise ComputeProcessError(f"the compute process could not start: {detail}")
    return proc, parent


def _stop(child: Child) -> None:
    """Ask the child to exit, kill it if it does not, close its pipe."""
    proc, conn = child
    with contextlib.suppress(OSError):
        conn.send(None)
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    conn.close()


class SpareProcess:
    """One compute child started ahead of need, shared by a model's workers (they all run the same child): a worker
    whose child died adopts it (`take`) instead of starting one, and a new spare starts in a background thread."""

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        threads: int,
        nice: int = 0,
        acceleration: Acceleration | None = None,
    ) -> None:
        self._args = _child_args(checkpoint, device, threads, nice, acceleration)
        self._lock = threading.Lock()
        self._child: Child | None = None
        self._filling: threading.Thread | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        child = self._child
        return child[0].pid if child is not None else None

    def fill(self) -> None:
        """Start a spare in the background unless one is ready or starting."""
        with self._lock:
            if self._closed or self._child is not None or self._filling is not None:
                return
            self._filling = threading.Thread(target=self._fill, name="soap-compute-spare", daemon=True)
            self._filling.start()

    def _fill(self) -> None:
        child: Child | None = None
        try:
            child = _launch(self._args, "soap-compute-spare")
        except ComputeProcessError as exc:  # the next take() finds no spare, starts a child itself, and refills
            log.warning("the spare compute process did not start: %s", exc)
        with self._lock:
            self._filling = None
            if not self._closed:
                self._child, child = child, None
        if child is not None:  # closed meanwhile
            _stop(child)

    def take(self) -> Child | None:
        """The spare if one is ready and alive (a new one starts), else None."""
        with self._lock:
            child, self._child = self._child, None
        self.fill()
        if child is not None and not child[0].is_alive():  # killed while it waited
            _stop(child)
            return None
        return child

    def close(self) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            filling = self._filling
        if child is not None:
            _stop(child)
        if filling is not None:
            filling.join(30)  # it stops the child it was starting


class ComputeProcess:
    """One worker of a model's pool (batcher.Worker): `process.compute(images, request) -> Predictions` like
    `predict`, in the child. Thread-safe. `nice` lowers the child's scheduling priority (added to the parent's).
    `spare`: the pool's SpareProcess, adopted on a restart when it has one ready."""

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        threads: int,
        index: int = 0,
        nice: int = 0,
        acceleration: Acceleration | None = None,
        on_restart: Callable[[], None] | None = None,
        spare: SpareProcess | None = None,
    ) -> None:
        self.index = index
        self._args = _child_args(checkpoint, device, threads, nice, acceleration)
        self._child: Child | None = None
        self._lock = threading.Lock()
        self._on_restart = on_restart or (lambda: None)  # metrics: soap_compute_restarts_total
        self._spare = spare
        self._starts = 0

    @property
    def pid(self) -> int | None:
        child = self._child
        return child[0].pid if child is not None and child[0].is_alive() else None

    def start(self) -> None:
        """Start the child and wait until it has loaded the model (seconds: it imports torch)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> Connection[Any, Any]:
        self._stop_locked()
        self._starts += 1
        restart = self._starts > 1
        if restart:  # every start after the first (successful or not) is a restart: crash loops count
            self._on_restart()
        spare = self._spare.take() if restart and self._spare is not None else None
        self._child = spare or _launch(self._args, f"soap-compute-{self.index}")
        proc = self._child[0]
        log.info(
            "compute process %d (worker %d%s) serving %s", proc.pid, self.index, ", the spare" if spare else "",
            self._args[0],
        )  # fmt: skip
        return self._child[1]

    def compute(self, images: torch.Tensor, request: PurifyRequest) -> Predictions:
        with self._lock:
            child = self._child
            conn = child[1] if child is not None and child[0].is_alive() else self._start_locked()
            try:
                conn.send((images.numpy(), request.mode, request.epsilon))
                status, payload = conn.recv()
            except (EOFError, OSError):
                proc = self._child[0] if self._child is not None else None
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
        child, self._child = self._child, None
        if child is not None:
            _stop(child)


def reply_to_predictions(status: str, payload: Any) -> Predictions:
    """The child's reply as the parent's result: predictions, or the error to raise. An out-of-memory error in the
    child becomes torch.OutOfMemoryError here, so predict_in_chunks halves the batch and retries as in-process."""
    if status == "ok":
        return Predictions(*(torch.from_numpy(array) for array in payload))
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
        images, mode, epsilon = message
        try:
            p = predict(loaded, torch.from_numpy(images), PurifyRequest(mode, epsilon), loss_fn)
            reply: tuple[str, object] = ("ok", tuple(np.ascontiguousarray(t.numpy()) for t in p.tensors()))
        except Exception as exc:  # noqa: BLE001 - this batch only; the child keeps serving
            kind = "out_of_memory" if is_out_of_memory(exc) else type(exc).__name__
            reply = ("error", (kind, str(exc)[:500]))
            if kind == "out_of_memory" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        conn.send(reply)
