"""Benchmark: the shared-trajectory min-aux purifier against the naive per-budget loop.

For each network (random weights; the work does not depend on them), on the same inputs in one run:
images per second of `purify` and of `purify_naive`, auxiliary-gradient evaluations per image, the
speed-up, and the achieved float32 FLOP rate as a fraction of this machine's float32 matmul rate
(measured in the same run; purifier FLOPs counted with torch.utils.flop_counter.FlopCounterMode).

    python -m benchmarks.purifier --quick --json benchmarks/results/purifier-quick.json
    python -m benchmarks.purifier --json benchmarks/results/purifier.json

Timings interleave ours and naive (so both see the same machine load) and report the median run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# As the service does (service/__main__.py): idle OpenMP threads sleep instead of spinning, which matters
# on a CPU shared with other work. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import PurifierConfig, create_model, purify, purify_naive


@dataclass(frozen=True)
class Case:
    network: str
    batch: int
    quick_batch: int | None  # batch under --quick; None = skipped by --quick
    config: PurifierConfig
    max_repeats: int | None = None  # WRN-28-10's naive loop takes minutes per image on a CPU


MNIST = PurifierConfig(step_size=0.1, steps=5, budget_step=0.05, num_budgets=11)
CIFAR = PurifierConfig(step_size=4 / 255, steps=5, budget_step=4 / 255, num_budgets=11)
CASES = [
    Case("mnist-fcn-dr", 128, 64, MNIST),
    Case("mnist-cnn-dr", 32, 8, MNIST),
    Case("cifar10-resnet18-lc", 16, 4, CIFAR),
    Case("cifar10-resnet18-rp", 16, 4, CIFAR),
    Case("cifar10-wrn28-lc", 1, None, CIFAR, max_repeats=1),
    Case("cifar10-wrn28-rp", 1, None, CIFAR, max_repeats=1),
]


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(sizes: tuple[int, ...], seconds: float, device: torch.device | None = None) -> dict[int, float]:
    """Best float32 GFLOP/s of n×n matmuls (each size repeated for `seconds`), per size, on `device` (CPU default)."""
    device = device or torch.device("cpu")
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        synchronize(device)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        rates[n] = 2 * n**3 / best / 1e9
    return rates


def counting_flops(fn):
    """Run fn once under FlopCounterMode; returns (its result, float FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(case: Case, batch: int, repeats: int, peak_gflops: float) -> dict:
    torch.manual_seed(0)
    model = create_model(case.network).eval().requires_grad_(False)
    x = torch.rand(batch, *model.input_shape, generator=torch.Generator().manual_seed(1))

    def ours() -> object:
        return purify(model, x, case.config)

    def naive() -> object:
        return purify_naive(model, x, case.config)

    # The untimed warm-up runs count the FLOPs and give the results to compare.
    r_ours, f_ours = counting_flops(ours)
    r_naive, f_naive = counting_flops(naive)
    t_ours, t_naive = [], []
    for _ in range(repeats):
        t_naive.append(timed(naive))
        t_ours.append(timed(ours))
    s_ours, s_naive = statistics.median(t_ours), statistics.median(t_naive)
    return {
        "network": case.network,
        "batch": batch,
        "purifier": {
            "step_size": case.config.step_size,
            "steps": case.config.steps,
            "budget_step": case.config.budget_step,
            "num_budgets": case.config.num_budgets,
        },
        "repeats": repeats,
        "seconds_per_batch": s_ours,
        "naive_seconds_per_batch": s_naive,
        "naive_images_per_s": batch / s_naive,
        "images_per_s": batch / s_ours,
        "speedup": s_naive / s_ours,
        "grad_evals_per_image": r_ours.grad_evals,
        "naive_grad_evals_per_image": r_naive.grad_evals,
        "gflop_per_image": f_ours / batch / 1e9,
        "naive_gflop_per_image": f_naive / batch / 1e9,
        "flop_fraction": f_ours / s_ours / 1e9 / peak_gflops,
        "naive_flop_fraction": f_naive / s_naive / 1e9 / peak_gflops,
        "same_epsilon_as_naive": bool(torch.equal(r_ours.epsilon, r_naive.epsilon)),
        "max_image_difference": float((r_ours.images - r_naive.images).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip WRN-28-10, fewer repeats (under a minute)")
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per purifier (default 2 quick, 3 full)")
    parser.add_argument("--only", nargs="*", help="benchmark only these networks")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    cases = [c for c in CASES if (c.quick_batch or not args.quick) and (not args.only or c.network in args.only)]

    # The machine's matmul rate: the best over a few sizes (MKL's large-matrix rate can be well below
    # its in-cache rate, e.g. on AMD CPUs).
    matmul = matmul_gflops((512, 1024, 2048), 0.3 if args.quick else 1.0)
    peak = max(matmul.values())
    print(
        f"float32 matmul: {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads "
        f"({', '.join(f'{n}: {r:.0f}' for n, r in matmul.items())})"
    )
    results = {}
    header = (
        f"{'network':22} {'batch':>5} {'naive img/s':>11} {'ours img/s':>10} {'speed-up':>8} {'grads/img':>9} "
        f"{'naive':>5} {'FLOP frac':>9}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        batch = case.quick_batch if args.quick else case.batch
        r = bench(case, batch, min(repeats, case.max_repeats or repeats), peak)
        results[case.network] = r
        print(
            f"{case.network:22} {batch:5d} {r['naive_images_per_s']:11.3g} {r['images_per_s']:10.3g} "
            f"{r['speedup']:8.2f} {r['grad_evals_per_image']:9d} {r['naive_grad_evals_per_image']:5d} "
            f"{r['flop_fraction']:9.3f}" + ("" if r["same_epsilon_as_naive"] else "  (ε differs from naive!)")
        )
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.purifier", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": os.getloadavg(),
            "device": "cpu",
        },
        "matmul_gflops": peak,
        "matmul_gflops_by_size": matmul,
        "networks": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
