"""One prepared device run: validate and measure the CUDA path in at most ~8 minutes, writing JSON and a log.

    python -m benchmarks.gpu_check --out OUT              # on a GPU machine (make gpu-check OUT=...)
    python -m benchmarks.gpu_check --out OUT --dry-run    # every step on the CPU at tiny sizes (CI runs this)

A GPU is lent rarely and briefly, so everything the device should tell us is one command, and its dry run keeps the
script from rotting in between. Steps (each timed, each failure recorded without stopping the others; the JSON is
rewritten after every step so a run cut short keeps what it measured):

1. environment   torch, CUDA and device facts;
2. cuda_tests    the test suite's CUDA tests and the service tests (on a GPU machine the service's `--device auto`
                 picks CUDA, with the compute process); fails if a CUDA test was skipped on a CUDA device;
3. purifier      min-aux purification for every network at doubling batch sizes up to the memory limit (or the
                 step's time budget): images/s, gradient evaluations/s, counted FLOPs against a float32 matmul rate
                 measured in the same run;
4. service_load  benchmarks/service_load.py on the device at concurrency 1, 64 and 256, with the batching gain over
                 --max-batch-size 1 (the 5x target);
5. bf16          bf16 autocast purification against float32 on real test images: share of images with the same
                 chosen ε (target >= 99 %), accuracy difference (target <= 0.5 points), speed-up;
6. compiled      the purifier's loss under torch.compile: speed-up and whether the ε choices are identical;
7. certify       certify throughput (randomized smoothing, n = 1,000 and 10,000) against a plain batched forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402  (after the OpenMP policy, like every entry point)
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.harness import ROOT  # noqa: E402
from benchmarks.purifier import CASES, matmul_gflops, synchronize  # noqa: E402
from models import Acceleration, Precision, aux_loss_fn, create_model, load_checkpoint, purify  # noqa: E402

ZOO = ROOT / "models" / "zoo"
TEST_DATA = ROOT / "tests" / "data"


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one run; the dry run shrinks every one of them."""

    device: torch.device
    dry_run: bool
    networks: tuple[str, ...]
    first_batch: int
    max_batch: int
    purifier_budget_s: float  # per network
    service_concurrency: str
    service_duration_s: float
    compare_models: tuple[tuple[str, str], ...]  # (zoo model, tests/data folder) of the bf16/compile checks
    images_per_class: int  # real test images per class for the bf16/compile checks
    certify_samples: tuple[int, ...]
    pytest_timeout_s: int

    @classmethod
    def for_run(cls, dry_run: bool, device: str | None) -> Plan:
        if dry_run:
            return cls(
                device=torch.device(device or "cpu"),
                dry_run=True,
                networks=("mnist-fcn-dr", "cifar10-resnet18-lc"),
                first_batch=2,
                max_batch=4,
                purifier_budget_s=5.0,
                service_concurrency="1,8",
                service_duration_s=0.5,
                compare_models=(("mnist-fcn-dr", "mnist"),),
                images_per_class=1,
                certify_samples=(100,),
                pytest_timeout_s=120,
            )
        return cls(
            device=torch.device(device or "cuda"),
            dry_run=False,
            networks=tuple(c.network for c in CASES),
            first_batch=64,
            max_batch=16384,
            purifier_budget_s=20.0,
            service_concurrency="1,64,256",
            service_duration_s=8.0,
            compare_models=(("mnist-fcn-dr", "mnist"), ("mnist-cnn-dr", "mnist"), ("cifar10-resnet18-lc", "cifar10")),
            images_per_class=30,
            certify_samples=(1_000, 10_000),
            pytest_timeout_s=200,
        )


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def timed_median(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up, with device synchronisation."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def real_images(dataset: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real test images shipped in tests/data (<class>/*.png), as [N, C, H, W] in [0, 1] and labels."""
    root = TEST_DATA / dataset
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, folder in enumerate(classes):
        for path in sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))[:per_class]:
            array = np.asarray(Image.open(path).convert("L" if dataset == "mnist" else "RGB"), dtype=np.float32)
            tensor = torch.from_numpy(array / 255.0)
            images.append(tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------------------- steps


def step_environment(plan: Plan, out: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(plan.device),
    }
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        info |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def step_cuda_tests(plan: Plan, out: Path) -> dict[str, Any]:
    """The CUDA tests and the service tests; on a GPU no CUDA test may skip."""
    junit = out / "cuda_tests.xml"
    files = ["tests/test_purifier.py", "tests/test_compute_process.py"]
    selection = ["-k", "cuda"] if plan.dry_run else []
    if not plan.dry_run:
        files += ["tests/test_service_api.py", "tests/test_service_batching.py", "tests/test_service_server.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files, *selection]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=plan.pytest_timeout_s)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    suite = ET.parse(junit).getroot()
    cases = list(suite.iter("testcase"))
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    cuda_skips = [n for n in skipped if n and "cuda" in n.lower()]
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    result = {
        "command": " ".join(cmd[1:]),
        "tests": len(cases),
        "failed": failed,
        "skipped": skipped,
        "returncode": proc.returncode,
    }
    if plan.device.type == "cuda" and cuda_skips:
        raise RuntimeError(f"CUDA tests skipped on a CUDA device: {cuda_skips}")
    if proc.returncode not in (0, 5) or failed:  # 5: nothing selected
        raise RuntimeError(f"tests failed ({proc.returncode}): {failed[:10]}")
    return result


def step_purifier(plan: Plan, out: Path) -> dict[str, Any]:
    matmul = matmul_gflops((1024, 4096) if not plan.dry_run else (256,), 1.0 if not plan.dry_run else 0.1, plan.device)
    peak = max(matmul.values())
    networks: dict[str, Any] = {}
    for case in (c for c in CASES if c.network in plan.networks):
        torch.manual_seed(0)
        model = create_model(case.network).to(plan.device).eval().requires_grad_(False)
        rows = []
        batch, started = plan.first_batch, time.perf_counter()
        while batch <= plan.max_batch and time.perf_counter() - started < plan.purifier_budget_s:
            x = torch.rand(batch, *model.input_shape, device=plan.device)
            try:
                with FlopCounterMode(display=False) as counter:
                    result = purify(model, x, case.config)
                seconds = timed_median(partial(purify, model, x, case.config), plan.device, 3)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                rows.append({"batch": batch, "out_of_memory": True})
                break
            flops = counter.get_total_flops()
            rows.append(
                {
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "grad_evals_per_s": batch * result.grad_evals / seconds,
                    "grad_evals_per_image": result.grad_evals,
                    "gflop_per_image": flops / batch / 1e9,
                    "flop_fraction": flops / seconds / 1e9 / peak,
                }
            )
            batch *= 2
        best = max((r for r in rows if "images_per_s" in r), key=lambda r: r["images_per_s"], default=None)
        networks[case.network] = {
            "rows": rows,
            "best_images_per_s": best and best["images_per_s"],
            "best_batch": best and best["batch"],
        }
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "matmul_gflops": matmul,
        "peak_gflops": peak,
        "networks": networks,
        "target_resnet18_lc_ge_20000": (networks.get("cifar10-resnet18-lc", {}).get("best_images_per_s") or 0)
        >= 20_000,
    }


def step_service_load(plan: Plan, out: Path) -> dict[str, Any]:
    report = out / "service_load.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.service_load",
        "--parts",
        "load",  # the CPU compute-ceiling comparison belongs to the CPU pool, not to the device check
        "--json",
        str(report),
        "--concurrency",
        plan.service_concurrency,
        "--duration",
        str(plan.service_duration_s),
        "--warmup",
        str(min(2.0, plan.service_duration_s)),
    ]
    env = {**os.environ, "SOAP_DEVICE": str(plan.device)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=420)
    (out / "service_load.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"service_load.py exited {proc.returncode}: {proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    gain = data.get("batching_gain_at_64")
    return {
        "command": " ".join(cmd[1:]),
        "batching_gain_at_64": gain,
        "table_markdown": data.get("table_markdown"),
        "target_batching_gain_ge_5": bool(gain and gain >= 5),
    }


def _compare(plan: Plan, acceleration: Acceleration) -> dict[str, Any]:
    """Purify real test images with and without `acceleration`: same ε share, accuracies, timings."""
    rows = {}
    for name, dataset in plan.compare_models:
        loaded = load_checkpoint(ZOO / name, device=plan.device)
        x, y = real_images(dataset, plan.images_per_class)
        x, y = x.to(plan.device), y.to(plan.device)
        fast_loss = aux_loss_fn(loaded.network, acceleration)
        reference = purify(loaded.network, x, loaded.purifier)
        fast = purify(loaded.network, x, loaded.purifier, loss_fn=fast_loss)
        with torch.no_grad():
            acc_ref = (loaded.network(reference.images).argmax(1) == y).float().mean().item()
            acc_fast = (loaded.network(fast.images).argmax(1) == y).float().mean().item()
        t_ref = timed_median(partial(purify, loaded.network, x, loaded.purifier), plan.device, 3)
        t_fast = timed_median(partial(purify, loaded.network, x, loaded.purifier, loss_fn=fast_loss), plan.device, 3)
        rows[name] = {
            "images": len(y),
            "same_epsilon_share": (fast.epsilon == reference.epsilon).float().mean().item(),
            "accuracy_float32": acc_ref,
            "accuracy_accelerated": acc_fast,
            "accuracy_difference_points": 100 * (acc_fast - acc_ref),
            "speedup": t_ref / t_fast,
            "max_image_difference": (fast.images - reference.images).abs().max().item(),
        }
    return rows


def step_bf16(plan: Plan, out: Path) -> dict[str, Any]:
    rows = _compare(plan, Acceleration(precision=Precision.BFLOAT16))
    return {
        "models": rows,
        "target_same_epsilon_ge_99": all(r["same_epsilon_share"] >= 0.99 for r in rows.values()),
        "target_accuracy_within_half_point": all(abs(r["accuracy_difference_points"]) <= 0.5 for r in rows.values()),
    }


def step_compiled(plan: Plan, out: Path) -> dict[str, Any]:
    backend = "aot_eager" if plan.dry_run else "inductor"  # the dry run checks the path, not code generation
    rows = _compare(plan, Acceleration(compile=True, compile_backend=backend))
    return {
        "backend": backend,
        "models": rows,
        "same_epsilon_everywhere": all(r["same_epsilon_share"] == 1.0 for r in rows.values()),
    }


def step_certify(plan: Plan, out: Path) -> dict[str, Any]:
    """CERTIFY (n0 = 100 + n noise samples per image) on the device against a plain batched forward of the same
    network: images/s and forward passes/s (the issue's bound: certify's per-sample cost within 2x of plain)."""
    from models.smoothing import SmoothingConfig, certify, noisy_classifier

    x, _ = real_images("mnist", 1)
    x = x[:4].to(plan.device)
    rows: dict[str, Any] = {}
    for name in ("mnist-fcn-dr", "mnist-cnn-dr"):
        loaded = load_checkpoint(ZOO / name, device=plan.device)
        base = noisy_classifier(loaded.network)
        batch = 1_000 if plan.dry_run else 10_000
        plain = x[torch.arange(batch, device=plan.device) % x.shape[0]]
        with torch.no_grad():
            plain_s = timed_median(partial(loaded.network, plain), plan.device, 3)
        for n in plan.certify_samples:
            config = SmoothingConfig(sigma=loaded.meta.training_noise_std or 0.5, n=n, batch_size=batch)
            seconds = timed_median(
                partial(certify, base, x, config, len(loaded.meta.class_names)), plan.device, 1 if n > 1000 else 3
            )
            passes = x.shape[0] * (config.n0 + n) / seconds
            rows[f"{name} n={n}"] = {
                "images_per_s": x.shape[0] / seconds,
                "forward_passes_per_s": passes,
                "plain_forward_passes_per_s": batch / plain_s,
                "plain_over_certify": batch / plain_s / passes,
            }
    return {"rows": rows, "target_within_2x_of_plain": all(r["plain_over_certify"] <= 2 for r in rows.values())}


STEPS: dict[str, Callable[[Plan, Path], dict[str, Any]]] = {
    "environment": step_environment,
    "cuda_tests": step_cuda_tests,
    "purifier": step_purifier,
    "service_load": step_service_load,
    "bf16": step_bf16,
    "compiled": step_compiled,
    "certify": step_certify,
}


def run(plan: Plan, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]),
        "dry_run": plan.dry_run,
        "device": str(plan.device),
        "steps": {},
    }
    log = (out / "gpu_check.log").open("a")
    for name, step in STEPS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            result = StepResult(name, True, 0.0, step(plan, out))
        except Exception as exc:  # noqa: BLE001  (a failed step is recorded; the other steps still run)
            result = StepResult(name, False, 0.0, error=f"{type(exc).__name__}: {exc}")
            log.write(traceback.format_exc())
        result.seconds = round(time.perf_counter() - started, 1)
        report["steps"][name] = asdict(result)
        line = f"{name}: {'ok' if result.ok else 'FAILED'} in {result.seconds} s" + (
            f" ({result.error})" if result.error else ""
        )
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["ok"] = all(s["ok"] for s in report["steps"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, the log and step outputs")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--device", help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--only", nargs="*", choices=list(STEPS), help="run only these steps")
    args = parser.parse_args(argv)
    plan = Plan.for_run(args.dry_run, args.device)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --dry-run to check the script on the CPU")
    report = run(plan, args.out, args.only)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
