"""A compute process killed while it restarts (the soak benchmark's 500s, issue 28): a batch that was waiting for
the restart is not failed; the death counts as a dead worker, so the batcher computes the batch again on another
worker. Real child processes of the shipped model, killed with SIGKILL as benchmarks/soak.py kills them."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from support import mnist_png, serve_app, settings_for

from service.batcher import WorkerDied
from service.compute_process import ComputeProcess, ComputeProcessError
from service.predict import PurifyRequest

pytestmark = pytest.mark.timeout(300)


def kill_the_next_child(name: str, old_pid: int | None, stop: threading.Event) -> list[int]:
    """SIGKILL the next child process called `name` (not `old_pid`) as soon as it exists: while it is starting."""
    killed: list[int] = []

    def watch() -> None:
        while not stop.is_set() and not killed:
            for child in multiprocessing.active_children():
                if child.name == name and child.pid not in (None, old_pid):
                    killed.append(child.pid)  # before the kill: the caller may look as soon as the child is dead
                    os.kill(child.pid, signal.SIGKILL)
                    return
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_child_killed_while_it_restarts_for_a_batch_is_a_dead_worker(model_dir):
    process = ComputeProcess(model_dir, torch.device("cpu"), threads=1, index=7)
    process.start()
    try:
        first = process.pid
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        stop = threading.Event()
        killed = kill_the_next_child("soap-compute-7", first, stop)
        with pytest.raises(ComputeProcessError) as info:
            process.compute(torch.rand(1, 1, 28, 28), PurifyRequest())  # restarts the child first; it is killed
        stop.set()
        assert killed, "the restarted child was not seen"
        assert isinstance(info.value, WorkerDied), f"{type(info.value).__name__}: {info.value}"  # was: a 500
        assert "exited while starting" in str(info.value)
        # and the next batch restarts it for good
        assert process.compute(torch.rand(1, 1, 28, 28), PurifyRequest()).probs.shape == (1, 10)
    finally:
        process.close()


@pytest.mark.anyio
async def test_a_batch_whose_worker_dies_while_restarting_is_answered_by_the_other_worker(model_dir):
    """Two compute processes; worker 0's child is killed while idle and then again while the batch's restart starts
    it: the request is answered 200 by worker 1, not 500."""
    settings = settings_for(model_dir, compute_process=True, compute_workers=2)
    async with serve_app(settings, timeout=180) as (app, client):
        batcher = app.state.runtime.models[model_dir.name].batcher
        worker = batcher.workers[0]
        first = worker.pid
        os.kill(first, signal.SIGKILL)
        await _until(lambda: worker.pid is None)  # (reaps the child)
        # The dispatcher hands a batch to the first free worker: make worker 0 the only free one for a moment
        # by sending the request while its child is dead; its restart is killed as it starts.
        stop = threading.Event()
        killed = kill_the_next_child(f"soap-compute-{worker.index}", first, stop)
        answers = [
            await client.post("/classify", content=mnist_png(d), headers={"Content-Type": "image/png"})
            for d in range(4)
        ]
        stop.set()
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert [r.json()["results"][0]["label"] for r in answers] == [0, 1, 2, 3]
    assert killed  # a restart was killed as it started, and no request failed for it


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


def test_cpu_children_are_forked_from_a_fork_server_that_has_torch_loaded(model_dir):
    """A restart forks a child from the fork server, which has imported torch and the model code already (~50 ms,
    against ~2 s for a fresh interpreter: benchmarks/soak.py), so a killed worker is back before its queue fills."""
    from service.process_metrics import fork_server_pid

    process = ComputeProcess(model_dir, torch.device("cpu"), threads=1, index=3)
    process.start()
    try:
        server = fork_server_pid()
        assert server is not None
        maps = Path(f"/proc/{server}/maps").read_text()
        assert "libtorch" in maps  # imported before any fork
        for _ in range(2):
            child = process.pid
            assert _parent(child) == server
            os.kill(child, signal.SIGKILL)
            time.sleep(0.1)
            assert process.compute(torch.rand(1, 1, 28, 28), PurifyRequest()).probs.shape == (1, 10)  # restarted
            assert process.pid not in (None, child)
    finally:
        process.close()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
