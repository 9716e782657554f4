"""Two stripped-down servings of a model, to split the service's distance from the machine's compute ceiling into
what the compute pool costs and what the HTTP front end costs (benchmarks/service_load.py --parts ceiling runs both
beside the service, in the same run):

    python -m benchmarks.bare_front_end --model models/zoo/mnist-fcn-dr --port 8123        # serve
    python -m benchmarks.bare_front_end --model models/zoo/mnist-fcn-dr --pool-alone 64    # measure, print JSON

- **Bare front end** (`--port`): uvicorn with httptools and uvloop, as the service, calling one raw ASGI function:
  read the body, decode it with the service's decoder, queue it on the service's Batcher, whose workers are the
  service's ComputeProcess children, answer `{"label", "confidence"}`. No framework, routing, request ids, API keys,
  option validation, metrics, tracing, deadlines, disconnect watch or full result encoding: a lower bound on the
  event-loop CPU any Python front end on this stack pays per request. `POST /classify`, `GET /readyz`, and
  `GET /metrics` with only the batch-size sum and count (for the benchmark's mean batch).
- **Pool alone** (`--pool-alone N`): the same Batcher and children fed by N closed-loop clients inside the
  batcher's own event loop, with single images decoded beforehand (real test images): no HTTP and no decode at all.

Neither is a server to deploy; both exist so that a claim like "the front end costs X of the ceiling" is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service
ROOT = Path(__file__).resolve().parents[1]

import orjson  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness.cpu import tree_cpu_seconds  # noqa: E402
from models import load_checkpoint  # noqa: E402
from service.config import ServiceSettings  # noqa: E402
from service.decode import DecodeLimits, decode_image  # noqa: E402
from service.pool import ModelPool, PoolHooks, build_pool  # noqa: E402


def _pool(model_dir: Path, on_batch: Any = None) -> ModelPool:
    """The service's default CPU pool for this model, built by the service's own pool builder (service/pool.py: its
    worker count, threads, batch size and delay), without a certify lane."""
    settings = ServiceSettings(models=[model_dir], device="cpu")
    return build_pool(model_dir, settings, ModelPool, PoolHooks(on_batch=on_batch), certify=False)


def bare_app(model_dir: Path):
    """The bare front end's ASGI app."""
    state: dict[str, Any] = {}
    limits = DecodeLimits()
    batches = {"sum": 0, "count": 0}  # served on /metrics as the service's batch-size histogram's sum and count

    def count(stats: Any) -> None:
        batches["sum"] += stats.size
        batches["count"] += 1

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    pool = _pool(model_dir, count)
                    pool.batcher.start(pool.warmup)
                    state["pool"] = pool
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["pool"].batcher.close()
                    for worker in state["pool"].workers:
                        worker.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        pool: ModelPool = state["pool"]
        if scope["path"] == "/readyz":
            await _answer(send, 200 if pool.ready else 503, b"{}")
            return
        if scope["path"] == "/metrics":
            text = f"soap_batch_size_images_sum {batches['sum']}\nsoap_batch_size_images_count {batches['count']}\n"
            await _answer(send, 200, text.encode())
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        image = decode_image(body, pool.input_shape, limits).unsqueeze(0)
        item = pool.batcher.submit(image, pool.warmup_request, time.monotonic() + 60.0)
        (probs,), (labels,) = (await item.future).predictions.ranked()
        await _answer(send, 200, orjson.dumps({"label": labels[0], "confidence": probs[0]}))

    return app


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def pool_alone(model_dir: Path, images: list[torch.Tensor], concurrency: int, seconds: float) -> dict:
    """Images/s of the pool fed by `concurrency` closed-loop in-process clients; CPU of this process and children."""
    batches = {"sum": 0, "count": 0}
    done, measuring = 0, False

    def count(stats: Any) -> None:
        if measuring:
            batches["sum"] += stats.size
            batches["count"] += 1

    pool = _pool(model_dir, count)
    batcher, request = pool.batcher, pool.warmup_request
    batcher.start(pool.warmup)
    while not pool.ready:
        await asyncio.sleep(0.05)
    stop_at = time.monotonic() + 2.0 + seconds

    async def client(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < stop_at:
            await batcher.submit(images[i % len(images)], request, time.monotonic() + 60.0).future
            i += concurrency
            done += measuring

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    await asyncio.sleep(2.0)  # warm-up: the clients settle
    started, cpu = time.monotonic(), _cpu_seconds()
    measuring = True
    await asyncio.gather(*tasks)
    elapsed, cpu = time.monotonic() - started, _cpu_seconds() - cpu
    await batcher.close()
    for worker in batcher.workers:
        worker.close()
    return {
        "concurrency": concurrency,
        "images_s": round(done / elapsed, 1),
        "cores_used": round(cpu / elapsed, 2),
        "cpu_us_per_image": round(cpu / max(done, 1) * 1e6),
        "mean_batch": round(batches["sum"] / batches["count"], 2) if batches["count"] else None,
    }


def _cpu_seconds() -> float:
    """CPU of this process and its compute processes (the harness's /proc accounting)."""
    return tree_cpu_seconds(os.getpid())


def _decoded(folder: Path, shape: tuple[int, ...]) -> list[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    return [decode_image(p.read_bytes(), shape).unsqueeze(0) for p in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "zoo" / "mnist-fcn-dr")
    parser.add_argument("--port", type=int, help="serve the bare front end on 127.0.0.1:PORT")
    parser.add_argument("--pool-alone", type=int, metavar="CONCURRENCY", help="measure the pool alone; print JSON")
    parser.add_argument("--seconds", type=float, default=10.0, help="--pool-alone: measured seconds")
    parser.add_argument("--images", type=Path, help="--pool-alone: folder of test images (default: the dataset's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.pool_alone:
        dataset = json.loads((args.model / "model.json").read_text())["dataset"]
        shape = tuple(load_checkpoint(args.model).meta.input_shape)
        images = _decoded(args.images or ROOT / "tests" / "data" / dataset, shape)
        print(json.dumps(asyncio.run(pool_alone(args.model, images, args.pool_alone, args.seconds))), flush=True)
        return 0
    if args.port is None:
        parser.error("give --port (serve) or --pool-alone N (measure)")
    import uvicorn

    gc.collect()
    gc.freeze()  # as the service: long-lived objects out of the collector's way
    uvicorn.run(
        bare_app(args.model),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
