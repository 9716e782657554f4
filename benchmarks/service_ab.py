"""Two revisions of the service under the same load, alternating, in one run: what a change to the request path
gained, measured as a ratio (these machines are shared and noisy: only ratios measured side by side mean much).

    python -m benchmarks.service_ab --base HEAD~1 --json benchmarks/results/service_ab.json

The base revision is checked out into a temporary git worktree; both servers run from the same virtual environment
(`python -m service` imports the package of its own tree) with the same settings, on loopback, at the same time. Each
round loads one, then the other (the order alternates between rounds), with the harness's closed-loop generator
and its /proc accounting: images/s, p50/p99, non-200 answers, and the event loop's CPU per request. The report gives
each round and the median ratio work tree / base.

    python -m benchmarks.service_ab --against-v2 --json benchmarks/results/service_ab_v2.json

`--against-v2` compares the two protocols instead, on one server of the work tree: POST /classify (one raw PNG) and
POST /v2/models/{name}/infer with the same PNG as the `images` BYTES input in the binary tensor data extension
(binary outputs too, as tritonclient sends it); the ratio is v2 / classify.

    python -m benchmarks.service_ab --against-granian --json benchmarks/results/service_ab_granian.json

`--against-granian` compares HTTP servers instead: the work tree's app under the service's uvicorn server
(`python -m service`) and the same app under Granian (benchmarks/granian_app.py, one worker, uvloop, one runtime
thread), POST /classify on both. Granian's worker is a child of its main process: its CPU is what is counted, and
its HTTP threads are not the event loop's, so compare throughput, not the loop column.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness import ROOT
from benchmarks.harness.load import LevelResult, closed_loop, read_payloads
from benchmarks.harness.server import ServerProcess, ServiceProcess, service_server
from service.process_metrics import child_pids


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _worktree_state() -> str:
    head = _git("rev-parse", "--short=10", "HEAD")
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _non_200(row: dict) -> int:
    """Requests answered with another status, or not answered (a connection error)."""
    return int(row["requests"] - row["ok"] + row["errors"])


@dataclass
class Leg:
    """One side of the comparison: a server and the requests it gets."""

    server: ServerProcess
    path: str
    payloads: list[bytes]
    content_type: str = "image/png"
    headers: dict[str, str] = field(default_factory=dict)


def v2_bodies(pngs: list[bytes]) -> tuple[list[bytes], int]:
    """Each PNG as an Open Inference Protocol request with binary tensor data (one BYTES element: a 4-byte length,
    then the file), binary outputs; the JSON part padded to one length, so one Inference-Header-Content-Length fits
    all of them (JSON allows trailing whitespace)."""
    heads = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 4 + len(png)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        for png in pngs
    ]
    width = max(len(h) for h in heads)
    return [h.ljust(width) + struct.pack("<I", len(png)) + png for h, png in zip(heads, pngs, strict=True)], width


async def _measure(args: argparse.Namespace, legs: dict[str, Leg]) -> list[dict]:
    import aiohttp

    rounds: list[dict] = []
    names = list(legs)
    for index in range(args.rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            leg = legs[name]
            server = leg.server
            connector = aiohttp.TCPConnector(limit=2048)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as s:
                await server.wait_ready_async()
                result: LevelResult = await closed_loop(
                    s, server.url, leg.path, leg.payloads, args.concurrency, args.duration, args.max_requests,
                    args.warmup, name, _app_pid(server), content_type=leg.content_type, headers=leg.headers,
                )  # fmt: skip
            row = {"round": index, **asdict(result)}
            rounds.append(row)
            print(
                f"round {index} {name:>4}: {result.throughput_images_s:8.1f} images/s  p50 {result.p50_ms} ms  "
                f"p99 {result.p99_ms} ms  non-200 {_non_200(row)}  "
                f"loop {result.extra.get('event_loop_cpu_us_per_request', '-')} µs/request",
                file=sys.stderr,
            )
    return rounds


def _app_pid(server: ServerProcess) -> int:
    """The process that runs the app: the server itself, or Granian's one worker (its main process's child)."""
    if isinstance(server, GranianProcess):
        workers = child_pids(server.pid)
        if workers:
            return workers[0]
    return server.pid


class GranianProcess(ServerProcess):
    """The work tree's app (benchmarks/granian_app.py) under Granian: one worker, uvloop, one runtime thread."""

    def __init__(self, model: str) -> None:
        super().__init__(
            ["-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--workers", "1", "--loop", "uvloop",
             "--runtime-threads", "1", "--no-ws", "--log-level", "warning", "benchmarks.granian_app:app"],
            env={"SOAP_MODELS": model},
        )  # fmt: skip

    @staticmethod
    def _base_environment() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("SOAP_")}


def _summary(rounds: list[dict], base: str = "base", work: str = "work") -> dict:
    by_round: dict[int, dict[str, dict]] = {}
    for row in rounds:
        by_round.setdefault(row["round"], {})[row["name"]] = row
    ratios = [r[work]["throughput_images_s"] / r[base]["throughput_images_s"] for r in by_round.values()]
    loop = {
        name: statistics.median(r[name]["extra"].get("event_loop_cpu_us_per_request", 0) for r in by_round.values())
        for name in (base, work)
    }
    return {
        f"throughput_ratio_{work}_over_{base}": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "median_event_loop_cpu_us_per_request": loop,
        "non_200": {name: sum(_non_200(r) for r in rounds if r["name"] == name) for name in (base, work)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare the work tree with")
    parser.add_argument("--model", default="models/zoo/mnist-fcn-dr", help="checkpoint (relative to each tree)")
    parser.add_argument("--images", default=str(ROOT / "tests" / "data" / "mnist"), help="folder of <class>/*.png")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each measures both servers once")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server per round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=50_000)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument(
        "--against-v2", action="store_true", help="compare /v2/models/{name}/infer with /classify on the work tree"
    )
    parser.add_argument(
        "--against-granian", action="store_true", help="compare the work tree's app under Granian with the service"
    )
    args = parser.parse_args()
    payloads = read_payloads(Path(args.images))
    if args.against_v2:
        _protocols(args, payloads)
        return
    if args.against_granian:
        _servers(args, payloads)
        return
    base_rev = _git("rev-parse", "--short=10", args.base)
    with tempfile.TemporaryDirectory(prefix="soap-ab-") as tmp:
        tree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", "--quiet", str(tree), base_rev)
        servers: dict[str, ServiceProcess] = {}
        try:
            servers["base"] = service_server(args.model, cwd=tree)
            servers["work"] = service_server(args.model)
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            legs = {name: Leg(server, "/classify", payloads) for name, server in servers.items()}
            rounds = asyncio.run(_measure(args, legs))
        finally:
            for server in servers.values():
                server.stop()
            _git("worktree", "remove", "--force", str(tree))
    report = {
        **_run_record(args, started),
        "base": base_rev,
        "work": _worktree_state(),
        "request": "POST /classify, one PNG per request (raw body, image/png), real MNIST test digits, mode min-aux",
        "summary": _summary(rounds),
        "rounds": rounds,
    }
    _report(args, report)


def _protocols(args: argparse.Namespace, payloads: list[bytes]) -> None:
    """--against-v2: the two protocols on one server of the work tree, alternating."""
    bodies, json_length = v2_bodies(payloads)
    server = service_server(args.model)
    try:
        legs = {
            "classify": Leg(server, "/classify", payloads),
            "v2": Leg(
                server,
                f"/v2/models/{Path(args.model).name}/infer",
                bodies,
                "application/octet-stream",
                {"Inference-Header-Content-Length": str(json_length)},
            ),
        }
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rounds = asyncio.run(_measure(args, legs))
    finally:
        server.stop()
    report = {
        **_run_record(args, started),
        "work": _worktree_state(),
        "request": "one PNG per request, real MNIST test digits, mode min-aux: POST /classify (raw body, image/png) "
        "and POST /v2/models/{name}/infer (images BYTES input, binary tensor data extension, binary outputs)",
        "summary": _summary(rounds, base="classify", work="v2"),
        "rounds": rounds,
    }
    _report(args, report)


def _servers(args: argparse.Namespace, payloads: list[bytes]) -> None:
    """--against-granian: the work tree's app under uvicorn (the service) and under Granian, alternating."""
    servers: dict[str, ServerProcess] = {}
    try:
        servers["uvicorn"] = service_server(args.model)
        servers["granian"] = GranianProcess(args.model)
        legs = {name: Leg(server, "/classify", payloads) for name, server in servers.items()}
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rounds = asyncio.run(_measure(args, legs))
    finally:
        for server in servers.values():
            server.stop()
    import granian

    report = {
        **_run_record(args, started),
        "work": _worktree_state(),
        "granian": granian.__version__,
        "request": "POST /classify, one PNG per request (raw body, image/png), real MNIST test digits, mode min-aux; "
        "the same app under the service's uvicorn server and under Granian (1 worker, uvloop, 1 runtime thread)",
        "summary": _summary(rounds, base="uvicorn", work="granian"),
        "rounds": rounds,
    }
    _report(args, report)


def _run_record(args: argparse.Namespace, started: str) -> dict:
    """What every report of this script starts with: how it was run, when, on what machine, with which settings."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started,
        "host": {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg()},
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("json",)},
    }


def _report(args: argparse.Namespace, report: dict) -> None:
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
