"""Soak and chaos benchmark of the SOAP service (not a CI test): a real server at 80 % of its measured capacity for
an hour, with a compute process killed at random every few seconds for part of it. What must hold: zero answers
other than 200, p99 latency and resident memory flat from the first windows to the last.

    python -m benchmarks.soak --json benchmarks/results/soak.json      # 1 hour (the result in docs/performance.md)
    python -m benchmarks.soak --short --json /tmp/soak.json            # ~2 minutes, the same steps

1. capacity: closed-loop clients (--concurrency) for --capacity-s seconds: images/s answered 200; then the same
   with the chaos phase's kills (what a kill every --kill-every-s seconds costs; the load stays 80 % of the first).
2. soak: open-loop Poisson arrivals at --load-share x capacity for --duration-s seconds, measured in windows of
   --window-s seconds: answers by status, errors, p50/p99, and the resident memory of the server and of each of its
   compute processes (/proc).
3. chaos: between --chaos-from and --chaos-to (shares of the soak) a compute process picked at random is killed
   (SIGKILL) every --kill-every-s seconds; the service starts it again and computes its batch again.

The JSON has every window; the summary compares the first and the last windows outside the chaos phase. Each window
also says what a drift in its latency came from: the server's CPU per request and its compute time per image (from
its own /metrics) rise if the server got slower; the CPU of every other process on the machine rises if the machine
got busier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness import ROOT
from benchmarks.harness.cpu import CLOCK_TICKS_PER_S, cpu_ticks, machine_busy_ticks, tree_ticks
from benchmarks.harness.load import closed_loop, metric_sums, open_loop, read_payloads
from benchmarks.harness.processes import compute_processes
from benchmarks.harness.server import ServiceProcess, service_options


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Window:
    started_s: float  # since the soak began
    chaos: bool
    requests: int
    statuses: dict[str, int]
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    server_rss_mb: float
    compute_rss_mb: list[float]
    kills: int = 0
    generator_max_lag_ms: float = 0.0  # the load generator's own delay: above ~100 ms its arrivals came in a burst
    generator_late: int = 0  # requests sent more than 100 ms after their arrival time
    # Where a latency drift comes from: the server (its CPU per request, its compute time per image: both rise if
    # it got slower) or the machine (the CPU cores every other process used meanwhile).
    server_cpu_us_per_request: float | None = None  # server + compute processes; None in a window with kills
    compute_us_per_image: float | None = None  # soap_batch_compute_seconds / images, wall time inside the workers
    others_cpu_cores: float | None = None  # the machine's busy CPU minus the server's and this generator's (ditto)


@dataclass
class Usage:
    """CPU counters read at a window's start and end (clock ticks) and the server's compute-time metric."""

    server_ticks: int
    generator_ticks: int
    machine_ticks: int
    compute_s: float
    computed_images: float
    at: float

    @classmethod
    async def read(cls, session, url: str, server_pid: int) -> Usage:
        compute_s, _ = await metric_sums(session, url, "soap_batch_compute_seconds")
        images, _ = await metric_sums(session, url, "soap_batch_size_images")  # the histogram's sum: images computed
        return cls(
            tree_ticks(server_pid), cpu_ticks(os.getpid()), machine_busy_ticks(), compute_s, images, time.monotonic()
        )

    def since(self, start: Usage, requests: int) -> tuple[float | None, float | None, float | None]:
        """(server CPU µs per request, compute µs per image, other processes' CPU cores) between start and self."""
        server_s = (self.server_ticks - start.server_ticks) / CLOCK_TICKS_PER_S
        generator_s = (self.generator_ticks - start.generator_ticks) / CLOCK_TICKS_PER_S
        machine_s = (self.machine_ticks - start.machine_ticks) / CLOCK_TICKS_PER_S
        images = self.computed_images - start.computed_images
        return (
            round(server_s / requests * 1e6, 1) if requests else None,
            round((self.compute_s - start.compute_s) / images * 1e6, 1) if images else None,
            round(max(0.0, machine_s - server_s - generator_s) / max(1e-9, self.at - start.at), 2),
        )


@dataclass
class Chaos:
    """Kills a random compute process every `every_s` seconds while `active`."""

    server_pid: int
    every_s: float
    rng: random.Random
    active: bool = False
    kills: int = 0
    log: list[dict] = field(default_factory=list)

    async def run(self, began: float) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if not self.active:
                continue
            victims = compute_processes(self.server_pid)
            if not victims:
                continue
            victim = self.rng.choice(victims)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1
            self.log.append({"at_s": round(time.monotonic() - began, 1), "pid": victim})


async def soak(args: argparse.Namespace) -> dict:
    import aiohttp

    payloads = read_payloads(Path(args.images))
    rng = random.Random(args.seed)
    log_dir = Path(args.server_log_dir) if args.server_log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    options = ["--model", args.model, *service_options(max_queue=args.max_queue, log_format="json")]
    with ServiceProcess(options, log_dir=log_dir) as server:
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            capacity = await closed_loop(
                session,
                server.url,
                "/classify",
                payloads,
                args.concurrency,
                args.capacity_s,
                10**7,
                warmup=2.0,
                name="capacity",
                server_pid=server.pid,
            )
            rate = max(1.0, args.load_share * capacity.throughput_images_s)
            # The same measurement while the chaos phase's killer runs: what the kills cost (a lost batch, a restart,
            # a warm-up), so a window that refuses can be read against the capacity left under kills.
            probe = Chaos(server.pid, args.kill_every_s, rng, active=True)
            prober = asyncio.create_task(probe.run(time.monotonic()))
            try:
                capacity_under_kills = await closed_loop(
                    session, server.url, "/classify", payloads, args.concurrency, args.capacity_s, 10**7,
                    warmup=2.0, name="capacity under kills", server_pid=server.pid,
                )  # fmt: skip
            finally:
                prober.cancel()
            print(
                f"capacity {capacity.throughput_images_s} images/s at {args.concurrency} clients, "
                f"{capacity_under_kills.throughput_images_s} with a kill every {args.kill_every_s:g} s "
                f"({probe.kills} kills); soak at {rate:.1f}/s",
                flush=True,
            )

            chaos = Chaos(server.pid, args.kill_every_s, rng)
            began = time.monotonic()
            killer = asyncio.create_task(chaos.run(began))
            windows: list[Window] = []
            try:
                while (elapsed := time.monotonic() - began) < args.duration_s:
                    share = elapsed / args.duration_s
                    chaos.active = args.chaos_from <= share < args.chaos_to
                    kills_before = chaos.kills
                    usage_before = await Usage.read(session, server.url, server.pid)
                    level = await open_loop(
                        session, server.url, payloads, rate, args.window_s, 10**7, seed=rng.randrange(1 << 30)
                    )
                    usage = await Usage.read(session, server.url, server.pid)
                    server_cpu, compute_per_image, others = usage.since(usage_before, level.requests)
                    if chaos.kills > kills_before:  # a killed process takes its CPU ticks with it: not measurable
                        server_cpu = others = None
                    computes = compute_processes(server.pid)
                    window = Window(
                        round(elapsed, 1),
                        chaos.active,
                        level.requests,
                        level.status_counts,
                        level.errors,
                        level.p50_ms,
                        level.p99_ms,
                        round(rss_bytes(server.pid) / 2**20, 1),
                        [round(rss_bytes(pid) / 2**20, 1) for pid in computes],
                        chaos.kills - kills_before,
                        level.extra["generator_max_lag_ms"],
                        level.extra["generator_late_over_100ms"],
                        server_cpu,
                        compute_per_image,
                        others,
                    )
                    windows.append(window)
                    print(
                        f"{window.started_s:7.1f} s {'chaos' if window.chaos else 'calm '} {window.requests:6d} req "
                        f"{window.statuses} errors {window.errors} p50 {window.p50_ms} p99 {window.p99_ms} ms "
                        f"rss server {window.server_rss_mb} MB compute {window.compute_rss_mb} kills {window.kills} "
                        f"generator lag max {window.generator_max_lag_ms} ms, late {window.generator_late}; "
                        f"server {window.server_cpu_us_per_request} µs CPU/request, compute "
                        f"{window.compute_us_per_image} µs/image, others {window.others_cpu_cores} cores",
                        flush=True,
                    )
            finally:
                killer.cancel()
    calm = [w for w in windows if not w.chaos]
    first, last = (calm[0], calm[-1]) if calm else (None, None)
    non_200 = sum(n for w in windows for s, n in w.statuses.items() if s != "200") + sum(w.errors for w in windows)
    return {
        "benchmark": "soak",
        "command": "python -m benchmarks.soak " + " ".join(args.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_after": os.getloadavg()},
        "capacity": asdict(capacity),
        "capacity_under_kills": asdict(capacity_under_kills),
        "offered_rate": round(rate, 1),
        "kills": chaos.kills,
        "summary": {
            "requests": sum(w.requests for w in windows),
            "non_200_or_errors": non_200,
            "p99_ms_first_calm_window": first.p99_ms if first else None,
            "p99_ms_last_calm_window": last.p99_ms if last else None,
            "server_rss_mb_first_last": [first.server_rss_mb, last.server_rss_mb] if first and last else None,
            "compute_rss_mb_first_last": [first.compute_rss_mb, last.compute_rss_mb] if first and last else None,
            "generator_max_lag_ms": max((w.generator_max_lag_ms for w in windows), default=None),
        },
        "windows": [asdict(w) for w in windows],
        "kill_log": chaos.log,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--short", action="store_true", help="~2 minutes: 90 s soak in 10 s windows, 10 s capacity")
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "mnist-fcn-dr"))
    parser.add_argument("--images", default=str(ROOT / "tests" / "data" / "mnist"), help="folder of <class>/*.png")
    parser.add_argument("--concurrency", type=int, default=64, help="clients of the capacity measurement")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--load-share", type=float, default=0.8, help="offered load as a share of the capacity")
    parser.add_argument("--chaos-from", type=float, default=1 / 3, help="share of the soak when the kills start")
    parser.add_argument("--chaos-to", type=float, default=2 / 3, help="share of the soak when they stop")
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-log-dir", help="keep the server's log (JSON lines) here as server-PORT.log: why a window refused"
    )
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(raw)
    args.argv = raw
    if args.short:
        args.capacity_s, args.duration_s, args.window_s = 10.0, 90.0, 10.0
    report = asyncio.run(soak(args))
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["summary"]["non_200_or_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
