"""benchmarks/service_load.py and its harness (benchmarks/harness/) on a real server: the raw HTTP client reads
every answer a real uvicorn server gives (200s and error answers, on one keep-alive connection), and the ceiling
comparison reports the compute ceiling at the batch size the service formed beside the best one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from benchmarks.harness import ROOT
from benchmarks.harness.load import RawHttpClient, closed_loop, read_payloads
from benchmarks.harness.server import ServerProcess, service_server

MODEL = str(ROOT / "models" / "zoo" / "mnist-fcn-dr")


def test_the_raw_client_reads_successes_and_errors_on_one_connection() -> None:
    payloads = read_payloads(ROOT / "tests" / "data" / "mnist")

    async def scenario() -> tuple[list[int], dict, dict]:
        server = service_server(MODEL, compute_workers=1)
        try:
            async with aiohttp.ClientSession() as session:
                await server.wait_ready_async()
                raw = RawHttpClient(server.url)
                host = server.url.removeprefix("http://")
                good = RawHttpClient.request(host, "/classify", payloads[0], "image/png")
                bad = RawHttpClient.request(host, "/classify", b"not an image", "image/png")
                missing = RawHttpClient.request(host, "/no-such-route", b"{}", "application/json")
                statuses = [await raw.send(r) for r in (good, bad, good, missing, good)]
                connection = raw.writer
                statuses.append(await raw.send(good))
                assert raw.writer is connection  # keep-alive held across the error answers
                raw.close()
                levels = {}
                for generator in ("raw", "aiohttp"):
                    levels[generator] = await closed_loop(
                        session, server.url, "/classify", payloads, 4, 1.0, 10_000, 0.3, generator,
                        server.proc.pid, generator=generator,
                    )  # fmt: skip
                return statuses, levels["raw"].__dict__, levels["aiohttp"].__dict__
        finally:
            server.stop()

    statuses, raw_level, aiohttp_level = asyncio.run(scenario())
    assert statuses[0] == statuses[2] == statuses[4] == statuses[5] == 200
    assert 400 <= statuses[1] < 500
    assert statuses[3] == 404
    for level in (raw_level, aiohttp_level):
        assert level["requests"] > 0
        assert level["status_counts"] == {"200": level["requests"]}
        assert level["errors"] == 0
        assert level["mean_batch_size"] >= 1
        assert level["extra"]["generator_cpu_cores_used"] >= 0


def _short_ceiling_comparison(tmp_path: Path, variants: str) -> dict:
    """benchmarks/service_load.py --parts ceiling on MNIST with `variants`, at the smallest settings; its report."""
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.service_load", "--parts", "ceiling", "--ceiling-models", MODEL,
         "--repeats", "1", "--ceiling-seconds", "0.3", "--ceiling-batches", "8", "--duration", "1", "--warmup", "0.3",
         "--ceiling-concurrency", "8", "--pool-variants", variants, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_ceiling_comparison_reports_the_ceiling_at_the_served_batch(tmp_path: Path) -> None:
    report = _short_ceiling_comparison(tmp_path, "pool")
    assert report["settings"]["generator"] == "raw"
    [comparison] = report["ceiling_comparison"]
    [level] = comparison["levels"]
    assert level["status_counts"] == {"200": level["requests"]}
    served = round(level["mean_batch_size"])
    assert level["served_batch_ceiling"]["batches"] == [served]
    assert level["served_batch_ceiling"]["images_s"] > 0
    assert level["fraction_of_served_batch_ceiling"] == round(
        level["throughput_images_s"] / level["served_batch_ceiling"]["images_s"], 3
    )
    assert "ceiling at the served batch" in report["ceiling_table_markdown"]


def test_service_options_runs_one_level_per_option_set(tmp_path: Path) -> None:
    """benchmarks/service_options.py: a server per option set, each measured once, closed loop or open loop."""
    for extra, name in (([], "closed"), (["--overload-rate", "200"], "open")):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.service_options", "--options", "max_delay_ms=0",
             "max_delay_ms=5,max_queue=32", "--concurrency", "4", "--duration", "1", "--warmup", "0.3",
             "--json", str(out), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        levels = json.loads(out.read_text())["levels"]
        assert [lv["options"] for lv in levels] == [{"max_delay_ms": "0"}, {"max_delay_ms": "5", "max_queue": "32"}]
        for level in levels:
            assert level["requests"] > 0
            assert level["errors"] == 0
            assert sum(level["status_counts"].values()) == level["requests"]
            if name == "closed":
                assert level["status_counts"] == {"200": level["requests"]}
            else:
                assert level["extra"]["unanswered"] == 0


def test_the_bare_front_end_does_the_services_work_and_the_comparison_reports_it_and_the_pool_alone(
    tmp_path: Path,
) -> None:
    """benchmarks/bare_front_end.py is a lower bound on the front end only if it does the service's work: its labels
    are the predict step's on the same decoded images. The ceiling comparison measures it and the pool alone."""
    import torch

    from models import load_checkpoint
    from service.decode import decode_image
    from service.predict import PurifyRequest, predict

    payloads = read_payloads(ROOT / "tests" / "data" / "mnist")[:12]
    model = load_checkpoint(MODEL)
    images = torch.stack([decode_image(p, model.meta.input_shape) for p in payloads])
    expected = predict(model, images, PurifyRequest()).probs.argmax(dim=1).tolist()

    async def labels() -> list[int]:
        server = ServerProcess(["-m", "benchmarks.bare_front_end", "--model", MODEL], "/readyz")
        try:
            async with aiohttp.ClientSession() as session:
                await server.wait_ready_async()

                async def one(body: bytes) -> int:
                    async with session.post(server.url + "/classify", data=body) as r:
                        assert r.status == 200
                        return (await r.json())["label"]

                return list(await asyncio.gather(*(one(p) for p in payloads)))
        finally:
            server.stop()

    assert asyncio.run(labels()) == expected

    report = _short_ceiling_comparison(tmp_path, "bare-front-end,pool-alone")
    levels = {lv["name"]: lv for lv in report["ceiling_comparison"][0]["levels"]}
    assert set(levels) == {"bare-front-end", "pool-alone"}
    for level in levels.values():
        assert level["throughput_images_s"] > 0
        assert level["status_counts"] == {"200": level["requests"]}
        assert level["mean_batch_size"] >= 1
        assert level["fraction_of_ceiling"] == round(level["throughput_images_s"] / level["ceiling_images_s"], 3)
    assert levels["pool-alone"]["extra"]["server_cpu_cores_used"] > 0
