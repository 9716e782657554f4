"""A model's compute pool (service/batcher.py + service/compute_process.py): batches run on several workers at once,
a batch whose worker died is computed again, a batch that kills workers twice fails alone, and SIGKILL of a worker
in a real server under load costs no request."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from support import ServiceProcess, metric_value, mnist_png, serve_app, settings_for

from benchmarks.harness.processes import compute_processes
from models import load_checkpoint
from service.batch_images import BatchImages
from service.batcher import Batcher, WorkerDied
from service.config import ServiceSettings
from service.predict import InlineWorker, Predictions, PurifyRequest

PNG = {"Content-Type": "image/png"}


@pytest.mark.anyio
async def test_two_workers_compute_two_batches_at_once(model_dir):
    """Each worker waits for the other inside its batch: this only finishes if two batches run concurrently."""
    settings = settings_for(model_dir, compute_workers=2, max_batch_size=4, max_delay_ms=100)
    async with serve_app(settings) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        both = threading.Barrier(2, timeout=20)
        seen: list[int] = []
        for worker in model.workers:
            real = worker.compute

            def rendezvous(images, request, real=real, index=worker.index):
                seen.append(index)
                both.wait()
                return real(images, request)

            worker.compute = rendezvous
        rs = await asyncio.gather(*(client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(8)))
    assert [r.status_code for r in rs] == [200] * 8
    assert [r.json()["results"][0]["label"] for r in rs] == list(range(8))
    assert sorted(seen) == [0, 1]  # two batches of 4, one per worker, computed side by side


@pytest.mark.anyio
async def test_work_queued_while_several_workers_are_free_is_split_between_them(model_dir):
    """8 images queued at once with both workers free: two batches of 4 side by side, not 8 on one worker while the
    other idles (with clients that resubmit together, that repeats forever: pool alone served 0.53 of the ceiling
    before, 0.87-0.90 after, benchmarks/service_load.py --parts ceiling)."""
    model = load_checkpoint(model_dir)
    sizes: list[tuple[int, int]] = []

    class Recording(InlineWorker):
        def compute(self, images: torch.Tensor | BatchImages, request: PurifyRequest) -> Predictions:
            sizes.append((self.index, len(images)))
            return super().compute(images, request)

    batcher = Batcher("m", [Recording(model, 0), Recording(model, 1)], 8, max_delay_s=10.0, max_queue=64)
    batcher.start()
    await asyncio.sleep(0.05)  # both workers free
    x = torch.rand(8, 1, 28, 28)
    items = [batcher.submit(x[i : i + 1], PurifyRequest(), time.monotonic() + 60) for i in range(8)]
    results = await asyncio.gather(*(item.future for item in items))
    await batcher.close()
    assert sorted(sizes) == [(0, 4), (1, 4)]
    expected = InlineWorker(model, 0).compute(x, PurifyRequest()).probs
    assert torch.allclose(torch.cat([r.predictions.tensors().probs for r in results]), expected, atol=1e-5)


@pytest.mark.anyio
async def test_a_batch_whose_worker_died_is_computed_again_and_the_worker_restarted(model_dir):
    async with serve_app(settings_for(model_dir, max_batch_size=8, max_delay_ms=100)) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        worker = model.workers[0]
        real, calls, restarts = worker.compute, [], []
        real_start = worker.start

        def dies_once(images, request):
            calls.append(len(images))
            if len(calls) == 1:
                raise WorkerDied("compute process exited during a batch (exit code -9)")
            return real(images, request)

        worker.compute = dies_once
        worker.start = lambda: (restarts.append(1), real_start())
        rs = await asyncio.gather(*(client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(3)))
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in rs] == [200] * 3
    assert [r.json()["results"][0]["label"] for r in rs] == [0, 1, 2]
    assert calls == [3, 2, 3]  # the batch, the restarted worker's warm-up batch, the same batch again
    assert restarts == [1]  # the dead worker was started again before it took more work
    assert metric_value(metrics, "soap_batch_size_images_count", model="mnist-fcn-dr") == 1  # reported once


@pytest.mark.anyio
async def test_a_batch_that_kills_workers_twice_fails_alone_with_its_request_ids_logged(model_dir, caplog):
    """mode=none batches "kill" their worker every time (a poisonous input); min-aux batches beside them pass."""
    settings = settings_for(model_dir, compute_workers=2, max_batch_size=8, max_delay_ms=100)
    async with serve_app(settings) as (app, client):
        model = app.state.runtime.models["mnist-fcn-dr"]
        for worker in model.workers:
            real = worker.compute

            def poisoned(images, request, real=real):
                if request.mode == "none":
                    raise WorkerDied("compute process exited during a batch (exit code -11)")
                return real(images, request)

            worker.compute = poisoned
        with caplog.at_level(logging.WARNING, logger="service.batcher"):
            poison = [
                client.post("/classify?mode=none", content=mnist_png(d), headers={**PNG, "X-Request-ID": f"poison-{d}"})
                for d in range(2)
            ]
            fine = [client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(6)]
            rs = await asyncio.gather(*poison, *fine)
            after = await client.post("/classify", content=mnist_png(9), headers=PNG)
    assert [r.status_code for r in rs[:2]] == [500, 500]
    assert all(r.json()["error"] == "batch_failed" and "WorkerDied" in r.json()["detail"] for r in rs[:2])
    assert [r.status_code for r in rs[2:]] == [200] * 6
    assert after.status_code == 200
    assert after.json()["results"][0]["label"] == 9
    failed = [r.getMessage() for r in caplog.records if "failing it alone" in r.getMessage()]
    assert len(failed) == 1
    assert "poison-0" in failed[0]
    assert "poison-1" in failed[0]


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"


@pytest.mark.timeout(600)
def test_sigkill_of_a_worker_under_load_costs_no_request(model_dir):
    """A real server with two compute processes, 64 clients; one child is killed while it computes a batch, and the
    load goes on for 4 s more (the retried batch, the restart and what follows)."""
    import aiohttp

    srv = ServiceProcess(["--model", str(model_dir), "--compute-workers", "2", "--max-batch-size", "32"])
    try:
        srv.wait_ready(timeout=300)  # three interpreters importing torch: slow on a busy 2-core machine
        workers = compute_processes(srv.proc.pid)
        assert len(workers) == 2
        statuses: list[int] = []
        killed: list[int] = []

        async def load() -> None:
            stop = [time.monotonic() + 30]

            async def client(k: int, session: aiohttp.ClientSession) -> None:
                while time.monotonic() < stop[0]:
                    async with session.post(srv.url + "/classify", data=mnist_png(k % 10), headers=PNG) as r:
                        await r.read()
                        statuses.append(r.status)

            async def killer() -> None:
                await asyncio.sleep(1.5)
                while not killed and time.monotonic() < stop[0] - 5:
                    victim = workers[0]
                    if _running(victim):  # in recv when idle; running means it is computing a batch
                        os.kill(victim, signal.SIGKILL)
                        killed.append(len(statuses))
                        stop[0] = time.monotonic() + 4
                    await asyncio.sleep(0.001)

            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
                await asyncio.gather(killer(), *(client(k, session) for k in range(64)))

        asyncio.run(load())
        deadline = time.monotonic() + 120
        while len(set(compute_processes(srv.proc.pid)) - set(workers)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        replaced = set(compute_processes(srv.proc.pid)) - set(workers)
    finally:
        srv.stop()
    output = srv.output()
    assert killed, "the worker was never seen computing"
    assert len(statuses) > killed[0]  # answers came after the kill
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert "died during a batch" in output, output
    assert "computing it again" in output, output
    assert len(replaced) == 1  # the killed child was replaced by a new one


def test_pool_size_defaults_to_one_worker_per_core_on_the_cpu(tmp_path, monkeypatch):
    from service import config

    monkeypatch.setattr(config, "_cores", lambda: 64)
    monkeypatch.setattr(config, "_memory_bytes", lambda: 128 << 30)
    default = ServiceSettings(models=[tmp_path])
    assert default.pool_size() == 64
    assert default.compute_threads == 1
    assert default.pool_size(cuda=True) == 1
    monkeypatch.setattr(config, "_memory_bytes", lambda: 8 << 30)  # a pod's 8 GiB: 7 workers, not 64
    assert default.pool_size() == 7
    assert ServiceSettings(models=[tmp_path], compute_process=False).pool_size() == 1
    assert ServiceSettings(models=[tmp_path], compute_process=False).compute_threads == 63
    custom = ServiceSettings(models=[tmp_path], compute_workers=3, torch_threads=2)
    assert custom.pool_size() == 3
    assert custom.pool_size(cuda=True) == 3
    assert custom.compute_threads == 2


def test_container_limits_are_read_from_cgroup_files(tmp_path):
    from service.config import cgroup_cpus, cgroup_memory_bytes

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    (v2 / "memory.max").write_text("8589934592\n")
    assert cgroup_cpus(v2) == 2.0
    assert cgroup_memory_bytes(v2) == 8 << 30
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_cpus(v2) is None
    assert cgroup_memory_bytes(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert cgroup_cpus(v1) == 1.5
    assert cgroup_memory_bytes(v1) is None
    assert cgroup_cpus(tmp_path / "absent") is None
