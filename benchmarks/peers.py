"""The service against its peers: the same checkpoint and predict step (`models.purify`, then the classifier; see
benchmarks/peers_job.py) behind LitServe and behind NVIDIA PyTriton, each loaded with the same request bytes as the
service in the same protocol, one server at a time, in alternating rounds. Needs the `bench` extra.

    python -m benchmarks.peers --json benchmarks/results/peers_mnist.json
    python -m benchmarks.peers --model models/zoo/cifar10-resnet18-lc --json benchmarks/results/peers_cifar.json
    python -m benchmarks.peers --quick --json /tmp/peers.json      # one short round at 8 clients (the test's)

Pairs (request bytes identical within a pair, byte for byte, path included):
- JSON: POST /classify with `{"images": ["<base64 PNG/JPEG>"]}`, the service against LitServe
  (benchmarks/peers_litserve.py);
- v2 binary: POST /v2/models/{name}/infer, input `images` BYTES [1, 1] in the binary tensor data extension, output
  `label` as binary data, the service against PyTriton (benchmarks/peers_pytriton.py).
Each round starts the service (both protocols, in an order that alternates), LitServe and PyTriton, one at a time, in
an order that alternates between rounds; each is stopped before the next starts. Every answer, warm-up included, is
checked against the image's label (real test images of the model's dataset). Per server and protocol: images/s,
p50/p99, non-200 answers, served accuracy, CPU; per round, the ratios service / peer; unless --quick, the machine's
compute ceiling (benchmarks.service_load.machine_ceiling) before and after, and each level as a fraction of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import ROOT
from benchmarks.harness.server import ServerProcess, ServiceProcess
from benchmarks.peers_load import LabelledImage, Protocol, checked_closed_loop, labelled_images


class Server(enum.Enum):
    """The servers compared: the service, and the peer of each protocol."""

    SOAP = "soap"
    LITSERVE = "litserve"
    PYTRITON = "pytriton"

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        return {
            Server.SOAP: (Protocol.JSON, Protocol.V2_BINARY),
            Server.LITSERVE: (Protocol.JSON,),
            Server.PYTRITON: (Protocol.V2_BINARY,),
        }[self]


PEER_OF = {Protocol.JSON: Server.LITSERVE, Protocol.V2_BINARY: Server.PYTRITON}


@dataclass(frozen=True)
class PeerSettings:
    """The peers' layouts (the issue's measurement): two workers of one torch thread each, batches up to 64."""

    workers: int = 2
    max_batch_size: int = 64
    litserve_batch_timeout_ms: float = 5.0
    litserve_api_servers: int | None = None  # LitServe's default: one HTTP process per worker
    pytriton_queue_delay_us: int = 1000


def start(server: Server, model_dir: Path, peers: PeerSettings, log_dir: Path | None) -> ServerProcess:
    """Start `server` on the model (returns at once; the caller waits for readiness)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # as the service sets for itself
    if server is Server.SOAP:
        return ServiceProcess(["--model", str(model_dir)], log_dir=log_dir)
    if server is Server.LITSERVE:
        args = [
            "-m", "benchmarks.peers_litserve", "--model", str(model_dir), "--workers", str(peers.workers),
            "--max-batch-size", str(peers.max_batch_size), "--batch-timeout-ms", str(peers.litserve_batch_timeout_ms),
        ]  # fmt: skip
        if peers.litserve_api_servers:
            args += ["--api-servers", str(peers.litserve_api_servers)]
        return ServerProcess(args, ready_path="/health", env=env, log_dir=log_dir)
    args = [
        "-m", "benchmarks.peers_pytriton", "--model", str(model_dir), "--instances", str(peers.workers),
        "--max-batch-size", str(peers.max_batch_size), "--queue-delay-us", str(peers.pytriton_queue_delay_us),
    ]  # fmt: skip
    return ServerProcess(args, ready_path=f"/v2/models/{model_dir.name}/ready", env=env, log_dir=log_dir)


def process_tree(pid: int) -> set[int]:
    """A process and its descendants (from /proc)."""
    found = {pid}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found |= process_tree(int(child))
    return found


def stop(server: ServerProcess) -> list[int]:
    """SIGTERM and wait (the harness's stop), then kill whatever of its process tree outlived it (a peer's worker,
    Triton's server or stub): the next server must have the machine to itself. The pids killed."""
    tree = set()
    with contextlib.suppress(OSError):
        tree = process_tree(server.pid)
    server.stop()
    deadline = time.monotonic() + 10
    alive = {pid for pid in tree if Path(f"/proc/{pid}").exists()}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return sorted(alive)


def image_accuracy(labels: list[int | None], images: list[LabelledImage]) -> dict:
    """The served accuracy over the distinct images answered (each image once, however often it was sent): two
    servers that serve the same label for each image have the same served accuracy."""
    answered = [(label, image.label) for label, image in zip(labels, images, strict=True) if label is not None]
    correct = sum(served == truth for served, truth in answered)
    return {
        "images_answered": len(answered),
        "served_accuracy": round(correct / len(answered), 4) if answered else None,
    }


@dataclass
class Load:
    """The closed-loop settings of every level."""

    concurrency: int
    duration: float
    warmup: float
    max_requests: int


async def measure_server(
    server: Server,
    model_dir: Path,
    images: list[LabelledImage],
    load: Load,
    peers: PeerSettings,
    round_index: int,
    log_dir: Path | None,
) -> list[dict]:
    """Start `server`, load it in each of its protocols (order alternating by round), stop it; one row per level."""
    process = start(server, model_dir, peers, log_dir)
    rows = []
    try:
        began = time.monotonic()
        await process.wait_ready_async(timeout=300)
        ready_s = round(time.monotonic() - began, 1)
        protocols = server.protocols if round_index % 2 == 0 else server.protocols[::-1]
        for protocol in protocols:
            level, checked = await checked_closed_loop(
                process.url, protocol, model_dir.name, images, load.concurrency, load.duration, load.max_requests,
                load.warmup, f"{server.value} {protocol.value}", process.pid,
            )  # fmt: skip
            labels = [checked.labels.get(i) for i in range(len(images))]
            row = {
                "round": round_index,
                "server": server.value,
                "protocol": protocol.value,
                "ready_s": ready_s,
                **asdict(level),
                "non_200": level.requests - level.ok + level.errors,
                "answers_checked": checked.answers,
                "answers_200": checked.ok,
                "correct": checked.correct,
                "unreadable": checked.unreadable,
                "answer_accuracy": checked.answer_accuracy,
                **image_accuracy(labels, images),
                "inconsistent_images": checked.inconsistent_images,
                "labels": labels,
            }
            rows.append(row)
            print(
                f"round {round_index} {server.value:>8} {protocol.value:>9}: {level.throughput_images_s:8.1f} images/s"
                f"  p50 {level.p50_ms} ms  p99 {level.p99_ms} ms  non-200 {row['non_200']}"
                f"  served accuracy {row['served_accuracy']} ({row['images_answered']} images, {checked.ok} answers)"
                f"  server CPU {level.extra['server_cpu_cores_used']} cores",
                file=sys.stderr,
                flush=True,
            )
    finally:
        leftover = stop(process)
        for row in rows:
            row["leftover_processes_killed"] = leftover
        if not rows:
            print(f"{server.value} failed; its output:\n{process.output()}", file=sys.stderr)
    return rows


def summarize(rows: list[dict], images: list[LabelledImage]) -> dict:
    """Per protocol, the ratio service / peer in each round and its median; per server and protocol, the median
    images/s, every non-200 answer, the served accuracy, and whether the labels served agree across servers."""
    by = {(r["round"], r["server"], r["protocol"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    out: dict = {"ratios": {}, "servers": {}}
    for protocol, peer in PEER_OF.items():
        ratios = [
            by[(i, Server.SOAP.value, protocol.value)]["throughput_images_s"]
            / max(by[(i, peer.value, protocol.value)]["throughput_images_s"], 1e-9)
            for i in rounds
            if (i, Server.SOAP.value, protocol.value) in by and (i, peer.value, protocol.value) in by
        ]
        key = f"soap_over_{peer.value}_{protocol.value}"
        out["ratios"][key] = {
            "per_round": [round(x, 3) for x in ratios],
            "median": round(statistics.median(ratios), 3) if ratios else None,
        }
    for server in Server:
        for protocol in server.protocols:
            mine = [r for r in rows if r["server"] == server.value and r["protocol"] == protocol.value]
            if not mine:
                continue
            labels = [
                next((r["labels"][i] for r in mine if r["labels"][i] is not None), None) for i in range(len(images))
            ]
            out["servers"][f"{server.value} {protocol.value}"] = {
                "images_s_median": statistics.median(r["throughput_images_s"] for r in mine),
                "images_s_per_round": [r["throughput_images_s"] for r in mine],
                "p99_ms_per_round": [r["p99_ms"] for r in mine],
                "non_200": sum(r["non_200"] for r in mine),
                "answers_checked": sum(r["answers_checked"] for r in mine),
                **image_accuracy(labels, images),
                "server_cpu_cores_used": [r["extra"]["server_cpu_cores_used"] for r in mine],
                "others_cpu_cores_used": [r["extra"]["others_cpu_cores_used"] for r in mine],  # the machine's noise
            }
    # Where some images went unanswered by some server (a short level on a slow model), the accuracies above cover
    # different images: this one covers the images every server answered.
    answered = [{i for i, label in enumerate(r["labels"]) if label is not None} for r in rows]
    common = sorted(set.intersection(*answered)) if answered else []
    for name, record in out["servers"].items():
        server, protocol = name.split(" ")
        mine = [r for r in rows if r["server"] == server and r["protocol"] == protocol]
        labels = [next(r["labels"][i] for r in mine if r["labels"][i] is not None) for i in common]
        record["served_accuracy_on_common_images"] = image_accuracy(labels, [images[i] for i in common])[
            "served_accuracy"
        ]
    out["common_images"] = len(common)
    served: dict[int, set[int]] = {}  # image index -> the set of labels any server served for it
    for r in rows:
        for i, label in enumerate(r["labels"]):
            if label is not None:
                served.setdefault(i, set()).add(label)
    out["images"] = len(images)
    out["images_with_different_labels_across_servers"] = sorted(i for i, s in served.items() if len(s) > 1)
    out["images_never_answered"] = len(images) - len(served)
    return out


def dataset_images(model_dir: Path, folder: str | None) -> list[LabelledImage]:
    """The real test images of the model's dataset (tests/data/<dataset>/<class>/*), or those under `folder`."""
    meta = json.loads((model_dir / "model.json").read_text())
    suffix = "jpg" if meta["dataset"].startswith("cifar") else "png"
    return labelled_images(
        Path(folder) if folder else ROOT / "tests" / "data" / meta["dataset"], suffix, meta["class_names"]
    )


def with_ceiling(report: dict, ceilings: list[dict]) -> None:
    """Each level as a fraction of the mean of the ceilings measured before and after the run."""
    mean = statistics.mean(c["images_s"] for c in ceilings)
    report["ceiling"] = {"images_s_mean": round(mean, 1), "measurements": ceilings}
    for row in report["rows"]:
        row["fraction_of_ceiling"] = round(row["throughput_images_s"] / mean, 3)
    for record in report["summary"]["servers"].values():
        record["fraction_of_ceiling_median"] = round(record["images_s_median"] / mean, 3)


def table(summary: dict) -> str:
    """The summary as a markdown table (the one docs/performance.md shows)."""
    lines = [
        "| server | protocol | images/s (median) | per round | non-200 | served accuracy | fraction of ceiling | "
        "server CPU cores | others' CPU cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["servers"].items():
        server, protocol = name.split(" ")
        lines.append(
            f"| {server} | {protocol} | {r['images_s_median']} | {', '.join(map(str, r['images_s_per_round']))} | "
            f"{r['non_200']} | {r['served_accuracy']} | {r.get('fraction_of_ceiling_median', '-')} | "
            f"{', '.join(map(str, r['server_cpu_cores_used']))} | {', '.join(map(str, r['others_cpu_cores_used']))} |"
        )
    lines.append("")
    for name, r in summary["ratios"].items():
        lines.append(f"- {name}: median {r['median']} (per round {r['per_round']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/zoo/mnist-fcn-dr", help="checkpoint folder")
    parser.add_argument("--images", help="folder of <class name>/*.png|jpg (default: tests/data/<dataset>)")
    parser.add_argument("--sample", type=int, help="use this many of the images, evenly spaced (default: all)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each level is measured")
    parser.add_argument("--max-requests", type=int, default=50_000)
    parser.add_argument("--ceiling-seconds", type=float, default=8.0, help="measured seconds per ceiling layout")
    parser.add_argument(
        "--quick", action="store_true", help="one round of 3 s at 8 clients on 60 images, no ceiling (the test's)"
    )
    parser.add_argument("--log-dir", type=Path, help="keep each server's output here")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.rounds, args.duration, args.warmup = 8, 1, 3.0, 1.0
        args.sample = args.sample or 60  # every server answers each of them within the level
    model_dir = (ROOT / args.model).resolve() if not Path(args.model).is_absolute() else Path(args.model)
    images = dataset_images(model_dir, args.images)
    if args.sample and args.sample < len(images):
        images = [images[i * len(images) // args.sample] for i in range(args.sample)]
    peers = PeerSettings()
    load = Load(args.concurrency, args.duration, args.warmup, args.max_requests)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    loadavg_before = os.getloadavg()
    ceilings: list[dict] = []
    if not args.quick:
        from benchmarks.service_load import machine_ceiling

        ceilings.append(machine_ceiling(model_dir, [16, 32, peers.max_batch_size], args.ceiling_seconds))
        print(f"ceiling: {ceilings[-1]['images_s']} images/s", file=sys.stderr, flush=True)
        # As service_load's ceiling comparison: 5 turns of the whole closed loop to settle, 20 measured (CIFAR's
        # clients start together and form cohorts that a short level misreads).
        rate = max(ceilings[0]["images_s"], 1e-9)
        load.warmup = max(load.warmup, 5 * load.concurrency / rate)
        load.duration = min(60.0, max(load.duration, 20 * load.concurrency / rate))
    rows: list[dict] = []
    for index in range(args.rounds):
        order = list(Server) if index % 2 == 0 else list(Server)[::-1]
        for server in order:
            rows += asyncio.run(measure_server(server, model_dir, images, load, peers, index, args.log_dir))
    if not args.quick:
        ceilings.append(machine_ceiling(model_dir, [16, 32, peers.max_batch_size], args.ceiling_seconds))
    report: dict = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.peers", *(argv or sys.argv[1:])]),
        "started_utc": started,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_before": loadavg_before,
            "loadavg_after": os.getloadavg(),
        },
        "model": model_dir.name,
        "settings": {"load": asdict(load), "peers": asdict(peers), "quick": args.quick},
        "summary": summarize(rows, images),
        "rows": rows,
    }
    if ceilings:
        with_ceiling(report, ceilings)
    print(table(report["summary"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
