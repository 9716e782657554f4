"""The load generator: closed-loop clients (each sends its next request when the previous one is answered) and
open-loop Poisson arrivals, against a real server, with latency percentiles, status counts, the server's mean batch
(from its /metrics) and, per level, the CPU the server, the generator and everyone else used (`benchmarks.harness.cpu`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.cpu import CLOCK_TICKS_PER_S, cpu_ticks, machine_busy_ticks, tree_ticks

GENERATORS = ("raw", "aiohttp")  # the load generator's HTTP client (RawHttpClient, or aiohttp's)


def read_payloads(images: Path, suffix: str = "png") -> list[bytes]:
    """The bytes of every `images/<class>/*.<suffix>` file, in a fixed order: the requests' bodies."""
    files = sorted(images.glob(f"*/*.{suffix}"))
    if not files:
        raise SystemExit(f"no {suffix} images under {images}/<class>/")
    return [f.read_bytes() for f in files]


class RawHttpClient:
    """One keep-alive HTTP/1.1 connection that POSTs prebuilt requests and reads the answers by Content-Length.

    The load generator shares the machine's cores with the server, so its CPU per request is taken from the server:
    aiohttp's client spends ~130 µs per request here, this one a fraction of it (`generator_cpu_cores_used` in each
    level says how much). It speaks only what the benchmark needs: POST, a Content-Length body, a Content-Length
    answer; anything else raises."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(host: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> int:
        """Send one prebuilt request, read its whole answer; the HTTP status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError(f"answer without Content-Length: {head[:200]!r}")
            length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
            await self.reader.readexactly(length)
            if b"\r\nconnection: close" in lower:
                self.close()
            return status
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class LevelResult:
    name: str
    concurrency: int | None
    duration_s: float
    requests: int
    ok: int
    status_counts: dict[str, int]
    errors: int
    throughput_images_s: float
    requests_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_batch_size: float | None = None
    extra: dict = field(default_factory=dict)


def percentile_ms(values: list[float], q: float) -> float | None:
    """The q-quantile of `values` (seconds) in milliseconds, rounded; None for no values."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


async def metric_sums(session, url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram on the server's /metrics."""
    total = count = 0.0
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def without_gc_pauses(level):
    """The generator must not be the bottleneck: a full collection of its heap stalls its event loop for tens
    of milliseconds, which would show up as server latency. No collection during a level (bounded in time and
    count, so its garbage is bounded too); collect between levels."""

    @functools.wraps(level)
    async def run_level(*args, **kwargs):
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            return await level(*args, **kwargs)
        finally:
            gc.enable()
            gc.unfreeze()
            gc.collect()

    return run_level


@without_gc_pauses
async def closed_loop(
    session,
    url: str,
    path: str,
    payloads: list[bytes],
    concurrency: int,
    duration: float,
    max_requests: int,
    warmup: float,
    name: str,
    server_pid: int | None = None,
    content_type: str = "image/png",
    generator: str = "raw",
    headers: dict[str, str] | None = None,
) -> LevelResult:
    """`concurrency` clients, each sending its next request as soon as the previous one is answered, each on its own
    keep-alive connection (`generator`: RawHttpClient, or an aiohttp session's pool); `headers`: sent with every
    request besides Content-Type."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    sent = 0
    measuring = False
    stop_at = time.monotonic() + warmup + duration

    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; one of {GENERATORS}")
    host = urllib.parse.urlsplit(url).netloc
    requests = [RawHttpClient.request(host, path, body, content_type, headers) for body in payloads]

    async def send(raw: RawHttpClient, i: int) -> int:
        if generator == "raw":
            return await raw.send(requests[i % len(requests)])
        body = payloads[i % len(payloads)]
        async with session.post(url + path, data=body, headers={"Content-Type": content_type, **(headers or {})}) as r:
            await r.read()
            return r.status

    async def client(k: int) -> None:
        nonlocal errors, sent
        i = k
        raw = RawHttpClient(url)
        try:
            while time.monotonic() < stop_at and sent < max_requests:
                start = time.perf_counter()
                try:
                    status = await send(raw, i)
                except Exception:  # noqa: BLE001 - counted, reported
                    if measuring:
                        errors += 1
                    continue
                finally:
                    i += concurrency
                if measuring:
                    sent += 1
                    latencies.append(time.perf_counter() - start)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        finally:
            raw.close()

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    await asyncio.sleep(warmup)
    before = await metric_sums(session, url, "soap_batch_size_images") if path == "/classify" else None
    cpu_before = (cpu_ticks(server_pid, server_pid), tree_ticks(server_pid)) if server_pid else None
    machine_before, generator_before = machine_busy_ticks(), time.process_time()
    measuring = True
    began = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - began
    extra = {}
    if server_pid and cpu_before is not None and sent:
        hz = CLOCK_TICKS_PER_S
        loop_s = (cpu_ticks(server_pid, server_pid) - cpu_before[0]) / hz  # the main thread runs the event loop
        total_s = (tree_ticks(server_pid) - cpu_before[1]) / hz  # with the compute processes
        generator_s = time.process_time() - generator_before
        machine_s = (machine_busy_ticks() - machine_before) / hz
        extra = {
            "server_cpu_cores_used": round(total_s / elapsed, 2),
            "event_loop_cpu_us_per_request": round(loop_s / sent * 1e6),
            "other_threads_cpu_us_per_request": round((total_s - loop_s) / sent * 1e6),
            "generator_cpu_cores_used": round(generator_s / elapsed, 2),
            "others_cpu_cores_used": round(max(0.0, machine_s - total_s - generator_s) / elapsed, 2),
        }
    mean_batch = None
    if before is not None:
        after = await metric_sums(session, url, "soap_batch_size_images")
        batches = after[1] - before[1]
        mean_batch = round((after[0] - before[0]) / batches, 2) if batches else None
    ok = statuses.get("200", 0)
    ok_latencies = latencies  # every request is a single image; report all answered requests
    return LevelResult(
        name,
        concurrency,
        round(elapsed, 2),
        sent,
        ok,
        statuses,
        errors,
        round(ok / elapsed, 1),
        round(sent / elapsed, 1),
        percentile_ms(ok_latencies, 0.5),
        percentile_ms(ok_latencies, 0.9),
        percentile_ms(ok_latencies, 0.99),
        mean_batch,
        extra,
    )


LATE_S = 0.1  # open_loop counts the requests it sent later than this after their arrival time


@without_gc_pauses
async def open_loop(
    session, url: str, payloads: list[bytes], rate: float, duration: float, max_requests: int, seed: int = 0
) -> LevelResult:
    """Poisson arrivals at `rate` requests/s, whatever the server does: the overload test."""
    rng = random.Random(seed)
    by_status: dict[str, list[float]] = {}
    errors = 0
    tasks = []

    async def one(body: bytes) -> None:
        nonlocal errors
        start = time.perf_counter()
        try:
            async with session.post(url + "/classify", data=body, headers={"Content-Type": "image/png"}) as r:
                await r.read()
                by_status.setdefault(str(r.status), []).append(time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - any failure of a request counts as an error
            errors += 1

    began = time.monotonic()
    next_at = began
    i = 0
    # How late each request left against its arrival time: a generator that stalls (its own GC, a starved core)
    # catches up by sending what it owed at once, a burst that Poisson arrivals would not have made.
    max_lag = 0.0
    late = 0
    while next_at < began + duration and i < max_requests:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        lag = time.monotonic() - next_at
        max_lag = max(max_lag, lag)
        late += lag > LATE_S
        tasks.append(asyncio.create_task(one(payloads[i % len(payloads)])))
        i += 1
        next_at += rng.expovariate(rate)
    offered_s = time.monotonic() - began
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - began
    ok = len(by_status.get("200", []))
    all_lat = [x for v in by_status.values() for x in v]
    shed = by_status.get("503", [])
    return LevelResult(
        "overload",
        None,
        round(elapsed, 2),
        i,
        ok,
        {k: len(v) for k, v in by_status.items()},
        errors,
        round(ok / elapsed, 1),
        round(i / offered_s, 1),
        percentile_ms(all_lat, 0.5),
        percentile_ms(all_lat, 0.9),
        percentile_ms(all_lat, 0.99),
        extra={
            "offered_rate_target": round(rate, 1),
            "offered_rate_achieved": round(i / offered_s, 1),
            "answered": sum(len(v) for v in by_status.values()),
            "unanswered": errors,
            "p99_ms_200": percentile_ms(by_status.get("200", []), 0.99),
            "p50_ms_503": percentile_ms(shed, 0.5),
            "p99_ms_503": percentile_ms(shed, 0.99),
            "generator_max_lag_ms": round(max_lag * 1000, 1),
            f"generator_late_over_{int(LATE_S * 1000)}ms": late,
        },
    )
