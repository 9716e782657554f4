"""Certify throughput (randomized smoothing, models.smoothing.certify) against a plain batched forward.

For each zoo network and each n: images/s and forward passes/s of CERTIFY (n0 = 100 selection + n estimation
samples per image, noise batches of --noise-batch rows), and forward passes/s of the same network on a plain batch
of --noise-batch images (no noise, no counting). The ratio says what the sampling, clamping and vote counting cost
on top of the network itself. Timed runs alternate between the two and medians are reported.

    .venv/bin/python -m benchmarks.certify --json benchmarks/results/certify.json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist-fcn-dr", "mnist-cnn-dr"])
    parser.add_argument("--samples", nargs="+", type=int, default=[1_000, 10_000])
    parser.add_argument("--images", type=int, default=4, help="images certified per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise-batch", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = digits(args.images)
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.certify " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__}, {args.threads} thread(s)",
        "load_average": os.getloadavg(),
        "results": [],
    }
    print(f"{'model':<14} {'n':>7} {'images/s':>9} {'passes/s':>10} {'plain passes/s':>15} {'ratio':>6}")
    for name in args.models:
        loaded = load_checkpoint(ROOT / "models" / "zoo" / name)
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
