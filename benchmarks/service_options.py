"""One load level per server option set, in one run: what a serving option does to throughput and latency.

    python -m benchmarks.service_options --options max_delay_ms=0 max_delay_ms=1 max_delay_ms=5 --concurrency 64
    python -m benchmarks.service_options --options compute_workers=2 compute_workers=3 --concurrency 64
    python -m benchmarks.service_options --options max_delay_ms=1,max_queue=32 --overload-rate 6294

Each option set (comma-separated key=value pairs of `python -m service` options, underscores for dashes) gets a
server of its own and one closed-loop level (benchmarks/harness/load.py), or with --overload-rate one
open-loop level at that many requests/s. One level each: a screen for which settings deserve an A/B
(benchmarks/service_ab.py), not a comparison to quote on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import ROOT
from benchmarks.harness.load import closed_loop, open_loop, read_payloads
from benchmarks.harness.server import service_server


def parse_options(text: str) -> dict[str, str]:
    """ "max_delay_ms=1,max_queue=32" -> {"max_delay_ms": "1", "max_queue": "32"}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {text!r}")
    return dict(pairs)


async def _measure(args: argparse.Namespace) -> list[dict]:
    import aiohttp

    payloads = read_payloads(Path(args.images))
    levels = []
    connector = aiohttp.TCPConnector(limit=2048)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for options in args.options:
            server = service_server(args.model, **options)
            try:
                await server.wait_ready_async()
                if args.overload_rate:
                    level = await open_loop(session, server.url, payloads, args.overload_rate, args.duration, 10**6)
                else:
                    level = await closed_loop(
                        session, server.url, "/classify", payloads, args.concurrency, args.duration, 10**6,
                        args.warmup, ",".join(f"{k}={v}" for k, v in options.items()), server.proc.pid,
                    )  # fmt: skip
            finally:
                server.stop()
            levels.append({"options": options, **asdict(level)})
            print(json.dumps({"options": options, "images_s": level.throughput_images_s, "p50_ms": level.p50_ms,
                              "p99_ms": level.p99_ms, "mean_batch": level.mean_batch_size, **level.extra}),
                  file=sys.stderr, flush=True)  # fmt: skip
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", type=parse_options, nargs="+", required=True, help="one server per option set")
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "mnist-fcn-dr"))
    parser.add_argument("--images", default=str(ROOT / "tests" / "data" / "mnist"), help="folder of <class>/*.png")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--overload-rate", type=float, help="open-loop requests/s instead of the closed loop")
    parser.add_argument("--json", help="write the levels here")
    args = parser.parse_args(argv)
    levels = asyncio.run(_measure(args))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "levels": levels}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
