"""`python -m training evaluate --attacks certify`: certified L2 accuracy of the smoothed classifier.

For each base classifier (the network on noisy inputs, and denoised smoothing through the DR head) every
test image is certified with Cohen et al.'s CERTIFY; certified accuracy at radius r is the fraction of images
whose smoothed prediction is correct with a certified radius ≥ r. Per-image results go to a JSONL file as
they are computed, so an interrupted run resumes where it stopped (same settings required).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from models import load_checkpoint, resolve_device
from models.smoothing import SmoothingConfig, base_classifier, certify

from . import distributed, provenance
from .data import evaluation_order, load_test_data
from .distributed import Process
from .eval_config import EvalConfig
from .records import CERTIFY_FILE, CertifiedBase, CertifyResult
from .stats import Accuracy

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def table_radii(sigma: float) -> tuple[float, ...]:
    """The radii of a certified table at noise σ: those up to 4σ, just above the largest radius n = 100,000 samples
    can certify (σ·Φ⁻¹(α^(1/n)) = 3.81σ at α = 0.001). σ = 0.5 gets the columns its tables always had (0 to 2.0)."""
    return tuple(r for r in RADII if r <= 4 * sigma)


@dataclass
class ImageResult:
    index: int
    label: int
    predicted: int | None
    radius: float | None
    p_lower: float
    seconds: float

    @property
    def correct(self) -> bool:
        return self.predicted == self.label

    @property
    def certified_radius(self) -> float:
        """The radius ACR counts: the certified radius when the prediction is correct, else 0."""
        return self.radius if self.correct and self.radius is not None else 0.0


def certified_accuracy(results: list[ImageResult], radius: float) -> Accuracy:
    """Correct and certified at ≥ radius (radius 0: correct and not abstained)."""
    hits = torch.tensor([r.correct and r.radius is not None and r.radius >= radius for r in results])
    return Accuracy.of(hits)


def average_certified_radius(results: Sequence[ImageResult]) -> float:
    """ACR (Zhai et al. 2020, the smoothing papers' summary): the mean over images of the certified radius when the
    smoothed prediction is correct, 0 when it is wrong or abstains. 0 for no images."""
    return sum(r.certified_radius for r in results) / max(len(results), 1)


@dataclass(frozen=True)
class CertifyLogHeader:
    """The first line of a `certify-<base>.jsonl` log: what every image below it was certified with."""

    model: str
    base: str
    seed: int
    smoothing: SmoothingConfig

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "base": self.base, "seed": self.seed} | asdict(self.smoothing))

    def continued_by(self, other: CertifyLogHeader) -> bool:
        """Whether a run with header `other` may append to this log: the same model, base, seed and smoothing, the
        batch aside. `batch_size` only bounds memory: image i's noise comes from its own generator in rows, and the
        stream is the same in pieces of any size (tests/test_smoothing.py), so a run may continue a log with another
        batch (a GPU with a far larger one)."""
        same_run = (self.model, self.base, self.seed) == (other.model, other.base, other.seed)
        return same_run and replace(self.smoothing, batch_size=other.smoothing.batch_size) == other.smoothing

    @classmethod
    def from_json(cls, line: str) -> CertifyLogHeader:
        fields = json.loads(line)
        model, base, seed = fields.pop("model"), fields.pop("base"), fields.pop("seed")
        return cls(model, base, seed, SmoothingConfig(**fields))


def read_certify_log(path: Path) -> tuple[CertifyLogHeader, list[ImageResult]]:
    """A per-image certification log (header line, then one ImageResult per line): what `certify_base` appends to
    and `python -m training soundness` attacks. A malformed log raises ValueError naming the file."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty: not a certification log")
    try:
        return CertifyLogHeader.from_json(lines[0]), [ImageResult(**json.loads(line)) for line in lines[1:]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a certification log: {exc}") from None


def _load_done(path: Path, header: CertifyLogHeader) -> list[ImageResult]:
    if not path.exists():
        return []
    written, done = read_certify_log(path)
    if not written.continued_by(header):
        raise ValueError(f"{path} was written with other settings; delete it or choose another --out")
    return done


def _part_logs(out: Path, kind: str) -> list[Path]:
    """The shard logs of an unfinished torchrun certification (`certify-<kind>.part<rank>.jsonl`)."""
    return sorted(out.glob(f"certify-{kind}.part*.jsonl"))


def _append(path: Path, header: CertifyLogHeader, result: ImageResult) -> None:
    """One image's line, flushed at once (a log is read back after any interruption)."""
    new = not path.exists()
    with path.open("a") as log:
        if new:
            log.write(header.to_json() + "\n")
        log.write(json.dumps(asdict(result)) + "\n")


def certify_base(
    kind: str, config: EvalConfig, smoothing: SmoothingConfig, out: Path, process: Process | None = None
) -> CertifiedBase:
    """Certify the first n test images with one base classifier; resumable through `certify-<kind>.jsonl`.

    The log keeps every image certified so far; a rerun with a larger --n continues it, a smaller one reads its head.
    Under torchrun the images still to certify are dealt out over the ranks; each appends to its own part log
    (`certify-<kind>.part<rank>.jsonl`), and rank 0 merges the parts into the log at the end. An interrupted run leaves
    the parts, which any later run (any number of processes, CPU or GPU) reads as done: an image's noise depends only
    on the seed and its index, never on which process certified it.
    """
    process = process or Process(0, 1, 0, resolve_device(config.device))
    loaded = load_checkpoint(config.model, process.device)
    meta = loaded.meta
    # channels_last: oneDNN's faster convolution layout on CPU (2x on LeNet); the same function, so the same certificate
    network = loaded.network.to(memory_format=torch.channels_last)
    base = base_classifier(network, kind)
    data, source = load_test_data(meta.dataset, config.data_root, meta.input_shape)
    order, selection = evaluation_order(data, source)
    n = min(config.n, len(data))
    header = CertifyLogHeader(str(config.model), kind, config.seed, smoothing)
    path = out / f"certify-{kind}.jsonl"
    done = {r.index: r for log in [path, *_part_logs(out, kind)] for r in _load_done(log, header)}
    todo = [i for i in range(n) if int(order[i]) not in done]
    distributed.barrier(process)  # every rank has read the same logs before any rank appends to them
    mine = todo[process.rank :: process.world_size]
    part = out / f"certify-{kind}.part{process.rank}.jsonl" if process.distributed else path
    for i in tqdm(mine, desc=f"certify {kind}", unit="img", disable=not process.is_main):
        x, y = data.batch(order[i : i + 1], process.device)
        start = time.perf_counter()
        cert = certify(base, x, smoothing, len(meta.class_names), seed=config.seed + int(order[i]))[0]
        result = ImageResult(int(order[i]), int(y[0]), cert.label, cert.radius, cert.p_lower, 0.0)
        result.seconds = time.perf_counter() - start
        _append(part, header, result)
    distributed.barrier(process)
    parts = _part_logs(out, kind) if process.is_main else []
    if parts:  # one log again, in evaluation order: what soundness and the report read
        done = {r.index: r for log in [path, *parts] for r in _load_done(log, header)}
        merged = [done[int(i)] for i in order if int(i) in done]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join([header.to_json() + "\n", *(json.dumps(asdict(r)) + "\n" for r in merged)]))
        tmp.replace(path)
        for log in parts:
            log.unlink()
    distributed.barrier(process)
    done = {r.index: r for r in _load_done(path, header)}
    results = [done[int(order[i])] for i in range(n) if int(order[i]) in done]
    seconds = sum(r.seconds for r in results)
    return CertifiedBase(
        base=kind,
        data=f"{source}; {selection}",
        n=len(results),
        abstained=sum(r.predicted is None for r in results),
        certified_accuracy={str(r): certified_accuracy(results, r) for r in table_radii(smoothing.sigma)},
        average_certified_radius=average_certified_radius(results),
        seconds_per_image=seconds / max(len(results), 1),
        forward_passes_per_second=len(results) * (smoothing.n0 + smoothing.n) / max(seconds, 1e-9),
        radii=[r.radius if r.correct else None for r in results],
    )


def evaluate_certify(config: EvalConfig) -> CertifyResult | None:
    """Certify with every requested base classifier (`config.certify`); write certify.json, certify.md and the
    figure. Under torchrun the images are shared out over the ranks; rank 0 writes and returns the result, the
    others return None."""
    process = distributed.start(config.device)
    try:
        return _evaluate_certify(config, process)
    finally:
        distributed.stop(process)


def _evaluate_certify(config: EvalConfig, process: Process) -> CertifyResult | None:
    from . import figures  # noqa: PLC0415  (matplotlib only when evaluating)

    options = config.certify
    meta = load_checkpoint(config.model, "cpu").meta
    sigma = options.sigma if options.sigma is not None else meta.training_noise_std
    if sigma is None:
        raise ValueError(f"{config.model} records no training noise; give --sigma")
    smoothing = SmoothingConfig(
        sigma=sigma,
        n0=options.n0,
        n=options.n,
        alpha=options.alpha,
        batch_size=options.noise_batch,
        clamp=options.clamp if options.clamp is not None else meta.noise_clamp,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    bases = {kind: certify_base(kind, config, smoothing, config.out, process) for kind in options.bases}
    if not process.is_main:
        return None
    result = CertifyResult(
        model=str(config.model),
        network=meta.network,
        dataset=meta.dataset,
        smoothing=smoothing,
        sigma_source="--sigma" if options.sigma is not None else "checkpoint training noise",
        seed=config.seed,
        device=str(process.device),
        threads=torch.get_num_threads(),
        processes=process.world_size,
        git_commit=provenance.git_commit(),
        command=config.command(),
        radii=list(table_radii(smoothing.sigma)),
        bases=bases,
    )
    (config.out / CERTIFY_FILE).write_text(result.to_json())
    (config.out / "certify.md").write_text(markdown(result))
    if config.figures:
        figures.certified_accuracy_curve(result, config.out / "certified_accuracy.png")
    return result


def markdown(result: CertifyResult) -> str:
    s = result.smoothing
    lines = [
        f"# Certified L2 accuracy: {result.network} ({result.dataset})",
        "",
        f"Randomized smoothing (Cohen et al. 2019), σ = {s.sigma} ({result.sigma_source}), n0 = {s.n0}, "
        f"n = {s.n}, α = {s.alpha}, clamp to [0, 1] = {s.clamp}, seed {result.seed}, "
        f"device {result.device} ({result.processes} x {result.threads} threads), commit {result.git_commit}.",
        "",
        f"Command: `{result.command}`",
        "",
        "| base classifier | n | ACR | " + " | ".join(f"r = {r}" for r in result.radii) + " | abstained | s/img |",
        "| --- | --- | --- | " + " | ".join("---" for _ in result.radii) + " | --- | --- |",
    ]
    for kind, b in result.bases.items():
        cells = [b.certified_accuracy[str(r)].text() for r in result.radii]
        acr = "–" if b.average_certified_radius is None else f"{b.average_certified_radius:.3f}"
        lines.append(
            f"| {kind} | {b.n} | {acr} | " + " | ".join(cells) + f" | {b.abstained} | {b.seconds_per_image:.2f} |"
        )
    lines += [
        "",
        "Cells: certified accuracy % [Wilson 95 % interval]. ACR: average certified radius (the radius when correct, "
        "else 0, averaged over the images). The radius is L2 on the [0, 1] pixel scale.",
        "",
    ]
    return "\n".join(lines)
