"""Load benchmark of the SOAP service: a real uvicorn server on loopback driven by a closed-loop load generator.

    python -m benchmarks.service_load --json benchmarks/results/service_load.json

In one run it measures:
1. the generator's own ceiling against a trivial FastAPI endpoint (same uvicorn stack), so a slow client cannot
   pass for a slow server;
2. closed-loop load at concurrency 1, 8, 64 and 256 on the service with the default batching settings
   (single-image PNG requests, real MNIST test digits): throughput, p50/p90/p99 latency, errors, mean batch size;
3. the same at concurrency 64 on a server with --max-batch-size 1, and the batching gain (ratio of throughputs);
   and at concurrency 64 on a server with --no-compute-process (compute in a thread that shares the GIL with the
   event loop), and the gain of the default compute process over it;
4. overload: open-loop arrivals at 4x the throughput measured at concurrency 64, against a server with a small
   queue: every request must be answered (200, or a fast 503), and the server must still serve afterwards;
5. compute alone (no HTTP, in this process, the service's default torch threads): the predict step's time per
   image at batch 1, 32 and 64 — the ratio batch 1 / batch 32 bounds the batching gain a compute-bound server can
   show — and at batch 32 again while a pure-Python thread runs, which is what the event loop is to the compute
   thread (both need the GIL).

Each level is bounded in time (--duration) and in count (--max-requests). Numbers depend on the machine and on
whatever else runs on it; the JSON records the load average before and after, and, per level, the CPU the server
process used (from /proc): cores used on average, and CPU microseconds per request in the event-loop thread and in
all other threads and child processes (compute) — figures that let one project throughput onto a machine with idle
cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from benchmarks.harness import ROOT
from benchmarks.harness.cpu import CLOCK_TICKS_PER_S, machine_busy_ticks
from benchmarks.harness.load import GENERATORS, LevelResult, closed_loop, open_loop, read_payloads
from benchmarks.harness.server import ServerProcess, service_server

# ---------------------------------------------------------------------------------------------- servers


def serve_trivial(port: int) -> None:
    """A FastAPI app that reads the body and answers a small JSON: the generator-ceiling target."""
    import uvicorn

    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------------------------------- the run


def compute_alone(model_dir: Path, threads: int | None, seconds: float = 3.0) -> dict:
    """Microseconds per image of the service's predict step (min-aux + classification) on uniform random images."""
    import threading

    import torch

    from models import load_checkpoint
    from service.config import ServiceSettings
    from service.predict import PurifyRequest, predict

    torch.set_num_threads(threads or ServiceSettings(models=[model_dir]).compute_threads)
    model = load_checkpoint(model_dir)

    def per_image_us(batch: int) -> float:
        x = torch.rand(batch, *model.meta.input_shape)
        predict(model, x, PurifyRequest())  # warm-up
        times = []
        until = time.perf_counter() + seconds
        while time.perf_counter() < until or len(times) < 3:
            t = time.perf_counter()
            predict(model, x, PurifyRequest())
            times.append((time.perf_counter() - t) / batch * 1e6)
        return round(sorted(times)[len(times) // 2], 1)

    out = {
        "torch_threads": torch.get_num_threads(),
        **{f"us_per_image_batch_{b}": per_image_us(b) for b in (1, 32, 64)},
    }
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
    spinner.start()
    try:
        out["us_per_image_batch_32_beside_a_python_thread"] = per_image_us(32)
    finally:
        stop.set()
        spinner.join()
    out["compute_bound_gain_32_vs_1"] = round(out["us_per_image_batch_1"] / out["us_per_image_batch_32"], 2)
    return out


def _row(r: LevelResult, batch: int | str) -> str:
    return (
        f"| {r.name} | {r.concurrency if r.concurrency is not None else '-'} | {batch} | {r.requests} | "
        f"{r.throughput_images_s} | {r.p50_ms} | {r.p90_ms} | {r.p99_ms} | "
        f"{sum(v for k, v in r.status_counts.items() if k != '200') + r.errors} | {r.mean_batch_size or '-'} | "
        f"{r.extra.get('server_cpu_cores_used', '-')} | {r.extra.get('event_loop_cpu_us_per_request', '-')} | "
        f"{r.extra.get('other_threads_cpu_us_per_request', '-')} |"
    )


# ---------------------------------------------------------------------------------------------- machine ceiling


def _ceiling_worker(model_dir: str, batch: int, threads: int, seconds: float, barrier, results) -> None:
    """One process of the ceiling: the predict step on one batch of uniform random images, again and again."""
    import torch

    from models import load_checkpoint
    from service.predict import PurifyRequest, predict

    torch.set_num_threads(threads)
    model = load_checkpoint(model_dir)
    x = torch.rand(batch, *model.meta.input_shape)
    predict(model, x, PurifyRequest())  # warm-up
    barrier.wait()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds or done < 2 * batch:
        predict(model, x, PurifyRequest())
        done += batch
    results.put(done / (time.perf_counter() - began))


def machine_ceiling(model_dir: Path, batches: list[int], seconds: float) -> dict:
    """Images/s of purification + classification alone (no HTTP, no queue) on every core of the machine: the best
    over the batch sizes the service may form (a big batch is not always the fastest per image: ResNet-18 ran
    faster per image at the ~18 the service formed than at 64) and two layouts, one process per core with one torch
    thread each, and one process with a torch thread per core. Also the CPU other processes took meanwhile."""
    import multiprocessing
    import resource

    cores = len(os.sched_getaffinity(0))
    layouts = {f"{cores} processes x 1 thread": (cores, 1), f"1 process x {cores} threads": (1, cores)}
    context = multiprocessing.get_context("spawn")
    out: dict = {"batches": batches, "cores": cores, "layouts": {}, "others_cpu_cores_used": {}}
    hz = CLOCK_TICKS_PER_S
    for batch, (layout, (processes, threads)) in ((b, item) for b in batches for item in layouts.items()):
        name = f"batch {batch}, {layout}"
        barrier, results = context.Barrier(processes + 1), context.Queue()
        procs = [
            context.Process(target=_ceiling_worker, args=(str(model_dir), batch, threads, seconds, barrier, results))
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        barrier.wait()  # every process loaded and warmed up: measure from here
        machine, ours, began = machine_busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        rate = sum(results.get() for _ in procs)
        for proc in procs:
            proc.join()
        elapsed = time.monotonic() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours_s = after.ru_utime + after.ru_stime - ours.ru_utime - ours.ru_stime  # includes their warm-up: a bound
        others = max(0.0, (machine_busy_ticks() - machine) / hz - ours_s) / elapsed
        out["layouts"][name] = round(rate, 1)
        out["others_cpu_cores_used"][name] = round(others, 2)
    out["images_s"] = max(out["layouts"].values())
    return out


def _dataset_images(model_dir: Path) -> tuple[Path, str, str]:
    """The real test images of the model's dataset: folder, file suffix, Content-Type."""
    dataset = json.loads((model_dir / "model.json").read_text())["dataset"]
    folder = ROOT / "tests" / "data" / dataset
    return (folder, "jpg", "image/jpeg") if dataset.startswith("cifar") else (folder, "png", "image/png")


# Server variants of the ceiling comparison: the default pool (one one-thread worker per core), the layout before
# the pool (one worker with all cores but one as torch threads), and the pool with its workers at nice 10.
POOL_VARIANTS: dict[str, dict] = {
    "pool": {},
    "one-worker": {"compute_workers": 1, "torch_threads": "cores-1"},
    "pool-nice10": {"compute_nice": 10},
}
# Stripped-down servings (benchmarks/bare_front_end.py), which split the service's distance from the ceiling into
# what the pool costs and what the HTTP front end costs: the bare front end is a server like the variants above;
# the pool alone is measured in a process of its own, without HTTP.
BARE_FRONT_END, POOL_ALONE = "bare-front-end", "pool-alone"
VARIANTS = (*POOL_VARIANTS, BARE_FRONT_END, POOL_ALONE)


def _variant_server(variant: str, model_dir: Path, args) -> ServerProcess:
    if variant == BARE_FRONT_END:
        return ServerProcess(["-m", "benchmarks.bare_front_end", "--model", str(model_dir)], "/readyz")
    cores = len(os.sched_getaffinity(0))
    options = {k: (max(1, cores - 1) if v == "cores-1" else v) for k, v in POOL_VARIANTS[variant].items()}
    return service_server(
        str(model_dir),
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        request_timeout_s=120,  # CIFAR at concurrency 256 queues for ~10 s: measure throughput, not 504s
        **options,
    )


def _pool_alone(model_dir: Path, concurrency: int, seconds: float) -> LevelResult:
    """The service's batcher and compute processes fed in-process (benchmarks/bare_front_end.py --pool-alone)."""
    command = [sys.executable, "-m", "benchmarks.bare_front_end", "--model", str(model_dir)]
    out = subprocess.run(
        [*command, "--pool-alone", str(concurrency), "--seconds", str(seconds)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout  # fmt: skip
    measured = json.loads(out.strip().splitlines()[-1])
    done = round(measured["images_s"] * seconds)
    extra = {"server_cpu_cores_used": measured["cores_used"], "cpu_us_per_image": measured["cpu_us_per_image"]}
    return LevelResult(
        POOL_ALONE, concurrency, seconds, done, done, {"200": done}, 0, measured["images_s"], measured["images_s"],
        None, None, None, measured.get("mean_batch"), extra,
    )  # fmt: skip


async def ceiling_comparison(session, args, model_dir: Path) -> dict:
    """The service against the machine's compute ceiling, measured in the same run and interleaved: ceiling, then
    each server variant at each concurrency, repeated; the ceiling is measured again at the end, and each level is
    compared with the mean of the two ceilings around it (the machine is shared: its load drifts)."""
    folder, suffix, content_type = _dataset_images(model_dir)
    payloads = read_payloads(folder, suffix)
    batches = sorted({b for b in args.ceiling_batches if b <= args.max_batch_size} | {args.max_batch_size})
    ceilings = [machine_ceiling(model_dir, batches, args.ceiling_seconds)]
    print(f"ceiling {model_dir.name}: {json.dumps(ceilings[-1])}", flush=True)
    # Per level, time in rounds of the whole closed loop (every client answered once, at the ceiling's rate): 5 to
    # settle (the clients start together and form cohorts; CIFAR measured over 2 s of warm-up and 11 s read 35
    # images/s where 6 s and 20 s read 60) and 20 measured, within the command's --warmup/--duration and 60 s.
    rate = max(ceilings[0]["images_s"], 1e-9)
    warmups = {c: max(args.warmup, 5 * c / rate) for c in args.ceiling_concurrency}
    durations = {c: min(60.0, max(args.duration, 20 * c / rate)) for c in args.ceiling_concurrency}
    levels = []
    for repeat in range(args.repeats):
        for variant in args.pool_variants:
            if variant == POOL_ALONE:
                for c in args.ceiling_concurrency:
                    level = _pool_alone(model_dir, c, durations[c])
                    levels.append({"repeat": repeat, "ceiling_index": repeat, **asdict(level)})
                    print(f"{model_dir.name} r{repeat}: {_row(level, args.max_batch_size)}", flush=True)
                continue
            server = _variant_server(variant, model_dir, args)
            try:
                await server.wait_ready_async()
                for c in args.ceiling_concurrency:
                    level = await closed_loop(
                        session, server.url, "/classify", payloads, c, durations[c], args.max_requests, warmups[c],
                        variant, server.proc.pid, content_type, generator=args.generator)  # fmt: skip
                    record = {"repeat": repeat, "ceiling_index": repeat, **asdict(level)}
                    if level.mean_batch_size:  # the ceiling: the same compute at the batch the service formed
                        served = max(1, round(level.mean_batch_size))
                        at_served = machine_ceiling(model_dir, [served], args.ceiling_seconds)
                        record["served_batch_ceiling"] = at_served
                        record["fraction_of_served_batch_ceiling"] = round(
                            level.throughput_images_s / at_served["images_s"], 3
                        )
                    levels.append(record)
                    print(f"{model_dir.name} r{repeat}: {_row(level, args.max_batch_size)}", flush=True)
            finally:
                server.stop()
        ceilings.append(machine_ceiling(model_dir, batches, args.ceiling_seconds))
        print(f"ceiling {model_dir.name}: {json.dumps(ceilings[-1])}", flush=True)
    for level in levels:
        i = level["ceiling_index"]
        around = (ceilings[i]["images_s"] + ceilings[i + 1]["images_s"]) / 2
        level["ceiling_images_s"] = round(around, 1)
        level["fraction_of_ceiling"] = round(level["throughput_images_s"] / around, 3)
    return {
        "model": model_dir.name,
        "duration_s": durations,
        "warmup_s": warmups,
        "ceilings": ceilings,
        "levels": levels,
    }


def ceiling_table(comparisons: list[dict]) -> str:
    """Markdown: per model, variant and concurrency, the mean over repeats (and the spread) of the fraction."""
    rows = [
        "| model | server | concurrency | ceiling images/s | service images/s | fraction of ceiling "
        "| ceiling at the served batch | fraction of it | p50 ms | p99 ms "
        "| non-200 | mean batch | loop CPU µs/req | generator cores | others' cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for comparison in comparisons:
        groups: dict[tuple[str, int], list[dict]] = {}
        for level in comparison["levels"]:
            groups.setdefault((level["name"], level["concurrency"]), []).append(level)
        for (variant, concurrency), group in groups.items():

            def values(key: str, group: list[dict] = group) -> str:
                return " / ".join(str(g[key] if key in g else g["extra"].get(key, "-")) for g in group)

            served = " / ".join(
                str(g["served_batch_ceiling"]["images_s"]) if "served_batch_ceiling" in g else "-" for g in group
            )

            non200 = " / ".join(str(g["requests"] - g["ok"] + g["errors"]) for g in group)
            rows.append(
                f"| {comparison['model']} | {variant} | {concurrency} | {values('ceiling_images_s')} | "
                f"{values('throughput_images_s')} | **{values('fraction_of_ceiling')}** | {served} | "
                f"**{values('fraction_of_served_batch_ceiling')}** | {values('p50_ms')} | "
                f"{values('p99_ms')} | {non200} | {values('mean_batch_size')} | "
                f"{values('event_loop_cpu_us_per_request')} | {values('generator_cpu_cores_used')} | "
                f"{values('others_cpu_cores_used')} |"
            )
    return "\n".join(rows)


async def run(args) -> dict:
    import aiohttp

    payloads = read_payloads(Path(args.images))

    def new_session() -> aiohttp.ClientSession:
        # A session closes its connector when it ends, so each session gets its own.
        connector = aiohttp.TCPConnector(limit=2048, force_close=False)
        timeout = aiohttp.ClientTimeout(total=600)  # CIFAR at 256 clients on a busy machine waits minutes
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": os.getloadavg(),
        },
        "model": args.model,
        "request": "POST /classify, one PNG per request (raw body, image/png), real MNIST test digits, mode min-aux",
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_requests": args.max_requests,
            "max_batch_size": args.max_batch_size,
            "max_delay_ms": args.max_delay_ms,
            "max_queue": args.max_queue,
            "overload_queue": args.overload_queue,
            "torch_threads": args.torch_threads,
            "generator": args.generator,
        },
    }
    rows = []
    if args.parts == "ceiling":
        async with new_session() as session:
            await _ceiling_part(session, args, report)
        report["host"]["loadavg_after"] = os.getloadavg()
        return report
    async with new_session() as session:
        # 1. generator ceiling
        trivial = ServerProcess(["-m", "benchmarks.service_load", "--serve-trivial"], "/healthz")
        try:
            await trivial.wait_ready_async()
            ceiling = await closed_loop(
                session,
                trivial.url,
                "/echo",
                payloads,
                64,
                args.duration,
                args.max_requests,
                args.warmup,
                "generator ceiling (trivial endpoint)",
                trivial.proc.pid,
                generator=args.generator,
            )
        finally:
            trivial.stop()
        report["generator_ceiling"] = asdict(ceiling)
        rows.append(_row(ceiling, "-"))
        print(rows[-1], flush=True)

        # 2. the service at each concurrency
        server = service_server(
            args.model,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
            torch_threads=args.torch_threads,
        )
        levels = []
        try:
            await server.wait_ready_async()
            for c in args.concurrency:
                level = await closed_loop(
                    session,
                    server.url,
                    "/classify",
                    payloads,
                    c,
                    args.duration,
                    args.max_requests,
                    args.warmup,
                    "service",
                    server.proc.pid,
                    generator=args.generator,
                )
                levels.append(level)
                rows.append(_row(level, args.max_batch_size))
                print(rows[-1], flush=True)
        finally:
            server.stop()
        report["levels"] = [asdict(x) for x in levels]

        async def variant_at_64(name: str, max_batch_size: int, **options) -> LevelResult:
            """The service with other settings, concurrency 64, on a server of its own."""
            server = service_server(
                args.model,
                max_batch_size=max_batch_size,
                max_delay_ms=args.max_delay_ms,
                max_queue=args.max_queue,
                torch_threads=args.torch_threads,
                **options,
            )
            try:
                await server.wait_ready_async()
                level = await closed_loop(
                    session,
                    server.url,
                    "/classify",
                    payloads,
                    64,
                    args.duration,
                    args.max_requests,
                    args.warmup,
                    name,
                    server.proc.pid,
                    generator=args.generator,
                )
            finally:
                server.stop()
            rows.append(_row(level, max_batch_size))
            print(rows[-1], flush=True)
            return level

        def gain_over(other: LevelResult) -> float | None:
            return (
                round(at64.throughput_images_s / other.throughput_images_s, 2)
                if at64 and other.throughput_images_s
                else None
            )

        at64 = next((x for x in levels if x.concurrency == 64), None)
        # 3. no batching, concurrency 64
        single = await variant_at_64("service, no batching", 1)
        report["no_batching_at_64"] = asdict(single)
        report["batching_gain_at_64"] = gain = gain_over(single)
        # 3b. compute in a thread of the server process instead of a child process, concurrency 64
        threaded = await variant_at_64("service, compute in a thread", args.max_batch_size, no_compute_process=True)
        report["compute_thread_at_64"] = asdict(threaded)
        report["compute_process_gain_at_64"] = gain_over(threaded)

        # 4. overload
        capacity = at64.throughput_images_s if at64 else 100.0
        server = service_server(
            args.model,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.overload_queue,
            torch_threads=args.torch_threads,
        )
        try:
            await server.wait_ready_async()
            over = await open_loop(session, server.url, payloads, 4 * capacity, args.duration, args.max_requests * 4)
            after = await closed_loop(
                session,
                server.url,
                "/classify",
                payloads,
                8,
                2.0,
                10_000,
                0.2,
                "after overload",
                generator=args.generator,
            )
            async with session.get(server.url + "/readyz") as r:
                ready_after = r.status
        finally:
            server.stop()
        over.extra.update(
            {
                "queue": args.overload_queue,
                "after_ok": after.ok,
                "after_errors": after.requests - after.ok + after.errors,
                "readyz_after": ready_after,
            }
        )
        rows.append(_row(over, args.max_batch_size))
        print(rows[-1], flush=True)
        report["overload"] = asdict(over)

    if args.parts == "all":
        async with new_session() as session:
            await _ceiling_part(session, args, report)

    report["compute_alone"] = compute_alone(Path(args.model), args.torch_threads)
    print("compute alone:", json.dumps(report["compute_alone"]), flush=True)

    report["host"]["loadavg_after"] = os.getloadavg()
    report["targets"] = {
        "throughput_at_64_ge_400": bool(at64 and at64.throughput_images_s >= 400),
        "p99_at_64_le_300ms": bool(at64 and at64.p99_ms is not None and at64.p99_ms <= 300),
        "no_errors_at_64": bool(at64 and at64.ok == at64.requests and at64.errors == 0),
        "batching_gain_ge_5": bool(gain and gain >= 5),
        "overload_all_answered": over.errors == 0 and set(over.status_counts) <= {"200", "503"},
        "overload_p99_503_le_50ms": over.extra["p99_ms_503"] is None or over.extra["p99_ms_503"] <= 50,
        "serves_after_overload": over.extra["after_errors"] == 0 and ready_after == 200,
    }
    header = (
        "| run | concurrency | max batch | requests | images/s | p50 ms | p90 ms | p99 ms | non-200 | mean batch "
        "| server CPU cores | loop CPU µs/req | compute CPU µs/req |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    report["table_markdown"] = "\n".join([header, *rows])
    return report


async def _ceiling_part(session, args, report: dict) -> None:
    """6. each model of --ceiling-models against the machine's compute ceiling (see ceiling_comparison)."""
    comparisons = [await ceiling_comparison(session, args, Path(m)) for m in args.ceiling_models]
    report["ceiling_comparison"] = comparisons
    report["ceiling_table_markdown"] = ceiling_table(comparisons)
    report["ceiling_targets"] = {}
    for c in comparisons:
        pool_64 = [lv for lv in c["levels"] if lv["name"] == "pool" and lv["concurrency"] == 64]
        report["ceiling_targets"][c["model"]] = {
            "fraction_at_64_per_repeat": [lv["fraction_of_ceiling"] for lv in pool_64],
            "fraction_of_served_batch_ceiling_at_64_per_repeat": [
                lv.get("fraction_of_served_batch_ceiling") for lv in pool_64
            ],
            "p99_ms_at_64_per_repeat": [lv["p99_ms"] for lv in pool_64],
            "non_200_at_64": sum(lv["requests"] - lv["ok"] + lv["errors"] for lv in pool_64),
        }
    print(report["ceiling_table_markdown"], flush=True)


def _service_default(setting: str) -> object:
    """A setting's default in the service (service/config.py), so that the benchmark measures what ships."""
    from service.config import ServiceSettings

    return ServiceSettings.model_fields[setting].default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "mnist-fcn-dr"))
    parser.add_argument("--images", default=str(ROOT / "tests" / "data" / "mnist"), help="folder of <class>/*.png")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-requests", type=int, default=50_000, help="count bound per level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--max-delay-ms", type=float, default=_service_default("max_delay_ms"), help="(default: the service's)"
    )
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--overload-queue", type=int, default=32, help="the small queue of the overload test")
    parser.add_argument("--torch-threads", type=int, help="passed to the service (default: the service's default)")
    parser.add_argument(
        "--parts",
        choices=["all", "ceiling", "load"],
        default="all",
        help="ceiling: only the comparison with the compute ceiling; load: everything but that comparison",
    )
    parser.add_argument(
        "--ceiling-models",
        type=lambda s: [x.strip() for x in s.split(",")],
        default=[str(ROOT / "models" / "zoo" / m) for m in ("mnist-fcn-dr", "cifar10-resnet18-lc")],
        help="checkpoints compared with the machine's compute ceiling (comma-separated)",
    )
    parser.add_argument("--ceiling-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    parser.add_argument(
        "--ceiling-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[16, 32],
        help="batch sizes the ceiling also tries, besides --max-batch-size (the best counts)",
    )
    parser.add_argument("--ceiling-seconds", type=float, default=8.0, help="measured seconds per ceiling layout")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the ceiling comparison")
    parser.add_argument(
        "--pool-variants",
        type=lambda s: [x.strip() for x in s.split(",")],
        default=["pool", BARE_FRONT_END, POOL_ALONE],
        help=f"server variants in the ceiling comparison, of {sorted(VARIANTS)}",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="raw",
        help="the load generator's HTTP client: raw (prebuilt requests on keep-alive sockets; least CPU) or aiohttp",
    )
    parser.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_trivial:
        serve_trivial(args.port)
        return 0
    report = asyncio.run(run(args))
    print()
    if args.parts == "ceiling":
        print(report["ceiling_table_markdown"])
        print("ceiling targets:", json.dumps(report["ceiling_targets"]))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    print(report["table_markdown"])
    if "ceiling_table_markdown" in report:
        print(report["ceiling_table_markdown"])
    print(f"batching gain at concurrency 64: {report['batching_gain_at_64']}x")
    print(f"compute process vs thread at concurrency 64: {report['compute_process_gain_at_64']}x")
    print("overload:", json.dumps(report["overload"]["extra"]))
    print("targets:", json.dumps(report["targets"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
