"""Certify throughput (randomized smoothing, models.smoothing.certify) against a plain batched forward.

For each zoo network and each n: images/s and forward passes/s of CERTIFY (n0 = 100 selection + n estimation
samples per image, noise batches of --noise-batch rows), and forward passes/s of the same network on a plain batch
of --noise-batch images (no noise, no counting). The ratio says what the sampling, clamping and vote counting cost
on top of the network itself. Timed runs alternate between the two and medians are reported.

    .venv/bin/python -m benchmarks.certify --json benchmarks/results/certify.json

`--served`: the latency a client sees for one certificate, from the real service (`python -m service`, started by
benchmarks/harness) timing POST /classify?mode=certify&samples=N (default 100,000) on real digits, one image per
request, one request at a time, for each model of --models (default: the LeNet-DR models in models/zoo; a name is
a zoo folder, anything with a slash a checkpoint path).

    .venv/bin/python -m benchmarks.certify --served --images 2 --json benchmarks/results/certify-served.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from models import load_checkpoint  # noqa: E402
from models.smoothing import SmoothingConfig, certify, noisy_classifier  # noqa: E402


def digits(count: int) -> torch.Tensor:
    """Real test digits from tests/data (one per class, repeated)."""
    import numpy as np
    from PIL import Image

    images = []
    for i in range(count):
        path = sorted((ROOT / "tests" / "data" / "mnist" / str(i % 10)).glob("*.png"))[i // 10]
        images.append(torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)[None])
    return torch.stack(images)


@torch.no_grad()
def plain_forward_rate(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch).argmax(1)
        times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def model_path(name: str) -> Path:
    """A zoo model's folder by name, or a checkpoint path (anything with a slash)."""
    return ROOT / name if "/" in name else ROOT / "models" / "zoo" / name


def digit_png(index: int) -> bytes:
    """The PNG bytes of the same real test digit `digits` reads for `index`."""
    return sorted((ROOT / "tests" / "data" / "mnist" / str(index % 10)).glob("*.png"))[index // 10].read_bytes()


def served(models: list[str], samples: int, images: int, out: dict) -> None:
    """Time one certificate per request through the real service, for each model (see the module docstring)."""
    import httpx

    from benchmarks.harness.server import service_server

    print(f"{'model':<32} {'digit':>5} {'sigma':>5} {'radius':>7} {'seconds':>8} {'server compute s':>16}")
    for name in models:
        path = model_path(name)
        with (
            service_server(
                str(path.relative_to(ROOT)), compute_workers=1, max_certify_samples=samples, request_timeout_s=3600
            ) as server,
            httpx.Client(base_url=server.url, timeout=3600) as client,
        ):
            for i in range(images):
                start = time.perf_counter()
                r = client.post(
                    f"/classify?mode=certify&samples={samples}&seed={i}",
                    content=digit_png(i),
                    headers={"Content-Type": "image/png"},
                )
                seconds = time.perf_counter() - start
                r.raise_for_status()
                body = r.json()
                (cert,) = body["results"]
                row = {
                    "model": path.name,
                    "path": str(path.relative_to(ROOT)),
                    "digit": i % 10,
                    "samples": samples,
                    "n0": cert["samples"] - samples,
                    "sigma": cert["sigma"],
                    "label": cert["label"],
                    "certified_radius": cert["certified_radius"],
                    "latency_s": seconds,
                    "server_timing_ms": body["timing_ms"],
                }
                out["results"].append(row)
                radius = "abstain" if cert["certified_radius"] is None else f"{cert['certified_radius']:.3f}"
                print(
                    f"{path.name:<32} {i % 10:>5} {cert['sigma']:>5} {radius:>7} "
                    f"{seconds:>8.2f} {body['timing_ms']['compute'] / 1000:>16.2f}"
                )
        rows = [row for row in out["results"] if row["model"] == path.name]
        out.setdefault("summary", []).append(
            {
                "model": path.name,
                "images": len(rows),
                "median_latency_s": statistics.median(row["latency_s"] for row in rows),
            }
        )


def lenet_models() -> list[str]:
    """The LeNet-DR models of the zoo (--served's default)."""
    return sorted(p.name for p in (ROOT / "models" / "zoo").glob("mnist-lenet-dr*") if (p / "model.json").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="default: mnist-fcn-dr mnist-cnn-dr; with --served the zoo's LeNet-DR"
    )
    parser.add_argument("--served", action="store_true", help="latency of one certificate through the real service")
    parser.add_argument("--samples", nargs="+", type=int, default=None, help="default: 1000 10000; --served: 100000")
    parser.add_argument("--images", type=int, default=4, help="images certified per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise-batch", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.certify " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__}, {args.threads} thread(s)",
        "load_average": os.getloadavg(),
        "results": [],
    }
    if args.served:
        models = args.models or lenet_models()
        if not models:
            parser.error("no LeNet-DR model in models/zoo: name the models with --models")
        out["machine"] = (
            f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores visible, torch {torch.__version__}"
        )
        out["caveat"] = (
            "latency on this machine as it was: load_average says how busy (other jobs share the cores); compare "
            "only runs of the same machine and load"
        )
        served(models, (args.samples or [100_000])[0], args.images, out)
        out["load_average_after"] = os.getloadavg()
        return write(out, args.json)
    args.models = args.models or ["mnist-fcn-dr", "mnist-cnn-dr"]
    args.samples = args.samples or [1_000, 10_000]
    x = digits(args.images)
    print(f"{'model':<14} {'n':>7} {'images/s':>9} {'passes/s':>10} {'plain passes/s':>15} {'ratio':>6}")
    for name in args.models:
        loaded = load_checkpoint(model_path(name))
        base = noisy_classifier(loaded.network)
        plain_batch = x[torch.arange(args.noise_batch) % x.shape[0]]
        plain_forward_rate(loaded.network, plain_batch, 1)  # warm-up
        for n in args.samples:
            config = SmoothingConfig(sigma=loaded.meta.training_noise_std or 0.5, n=n, batch_size=args.noise_batch)
            certify_times, plain_rates = [], []
            for r in range(args.repeats):
                start = time.perf_counter()
                certify(base, x, config, len(loaded.meta.class_names), seed=r)
                certify_times.append(time.perf_counter() - start)
                plain_rates.append(plain_forward_rate(loaded.network, plain_batch, 3))
            seconds = statistics.median(certify_times)
            passes = x.shape[0] * (config.n0 + n) / seconds
            plain = statistics.median(plain_rates)
            row = {
                "model": name,
                "n": n,
                "n0": config.n0,
                "images": x.shape[0],
                "images_per_s": x.shape[0] / seconds,
                "forward_passes_per_s": passes,
                "plain_forward_passes_per_s": plain,
                "plain_over_certify": plain / passes,
            }
            out["results"].append(row)
            print(
                f"{name:<14} {n:>7} {row['images_per_s']:>9.2f} {passes:>10.0f} {plain:>15.0f} {plain / passes:>6.2f}"
            )
    return write(out, args.json)


def write(out: dict, path: Path | None) -> int:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
