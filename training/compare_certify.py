"""`python -m training compare-certify A B`: two certifications of the same test images compared image by image.

Two certified accuracies measured on the same images are not independent samples: their Wilson intervals overlap
even when one model certifies more on nearly every image, and they can differ by a point through a handful of
images. The paired questions are the ones to ask: at each radius, how many images does one certify that the other
does not (McNemar's exact test on those discordant images); how much does the average certified radius move (a t
interval over the per-image differences); and on how many images is p_A's lower bound higher (where both logs have it).

A log is ours (`certify-<base>.jsonl`: a header with σ, then one line per image; unfinished torchrun part logs are
read together when a folder is given) or a released per-image TSV of Cohen et al.'s certify.py (the published logs
under docs/results/published/, which carry no σ: give `--sigma`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from scipy.stats import binomtest, t

from .certify import CertifyLogHeader, ImageResult, average_certified_radius, read_certify_log, table_radii
from .published_certify import read_log
from .records import Record


class RadiusComparison(Record):
    """Certified (correct, radius ≥ r) images at one radius: each log's count and the discordant images."""

    radius: float
    certified_a: int
    certified_b: int
    a_only: int
    b_only: int
    p_value: float  # McNemar's exact test (two-sided binomial on the discordant images)


class CertifyComparison(Record):
    a: str
    b: str
    sigma: float
    images: int  # the images both logs certified (first_n applied)
    radii: list[RadiusComparison]
    acr_a: float
    acr_b: float
    acr_difference: float  # A − B
    acr_difference_ci95: tuple[float, float]  # t interval over the per-image radius differences
    p_lower_higher: int | None  # images where A's lower bound on p_A is above B's (None: a log without p_A)
    p_lower_lower: int | None
    p_lower_p_value: float | None  # sign test on those two counts

    def table(self) -> str:
        lines = [
            f"A = {self.a}",
            f"B = {self.b}",
            f"σ = {self.sigma:g}, {self.images} images certified by both",
            "",
            "| radius | A | B | A only | B only | McNemar p |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r.radius:g} | {r.certified_a} | {r.certified_b} | {r.a_only} | {r.b_only} | {r.p_value:.3g} |"
            for r in self.radii
        ]
        lo, hi = self.acr_difference_ci95
        lines += [
            "",
            f"ACR: A {self.acr_a:.3f}, B {self.acr_b:.3f}, A − B {self.acr_difference:+.3f} [{lo:+.3f}, {hi:+.3f}]",
        ]
        if self.p_lower_higher is not None:
            lines.append(
                f"p_A lower bound: higher in A on {self.p_lower_higher} images, lower on {self.p_lower_lower} "
                f"(sign test p = {self.p_lower_p_value:.3g})"
            )
        return "\n".join(lines)


def read_any_log(path: Path) -> tuple[CertifyLogHeader | None, list[ImageResult]]:
    """Our log (a file, or a folder's `certify-noisy.jsonl` and its part logs) or a released TSV (no header)."""
    if path.is_dir():
        logs = sorted(path.glob("certify-noisy*.jsonl"))
        if not logs:
            raise ValueError(f"{path} holds no certify-noisy*.jsonl log")
        read = [read_certify_log(log) for log in logs]
        headers = {header for header, _ in read}
        if len(headers) != 1:
            raise ValueError(f"the logs in {path} were written with different settings")
        return headers.pop(), [r for _, results in read for r in results]
    if path.suffix == ".jsonl":
        return read_certify_log(path)
    return None, read_log(path)


def compare(
    a: list[ImageResult], b: list[ImageResult], sigma: float, names: tuple[str, str], first_n: int | None = None
) -> CertifyComparison:
    """The paired comparison of two logs on the images both hold (of the first `first_n`, when given)."""
    by_index_a, by_index_b = {r.index: r for r in a}, {r.index: r for r in b}
    common = sorted(set(by_index_a) & set(by_index_b))
    if first_n is not None:
        common = [i for i in common if i < first_n]
    if not common:
        raise ValueError("the two logs have no image in common")
    pairs = [(by_index_a[i], by_index_b[i]) for i in common]
    for x, y in pairs:
        if x.label != y.label:
            raise ValueError(f"image {x.index} has label {x.label} in A and {y.label} in B: not the same test set")
    radii = []
    for radius in table_radii(sigma):
        hit = [
            (x.correct and x.certified_radius >= radius, y.correct and y.certified_radius >= radius) for x, y in pairs
        ]
        a_only = sum(p and not q for p, q in hit)
        b_only = sum(q and not p for p, q in hit)
        radii.append(
            RadiusComparison(
                radius=radius,
                certified_a=sum(p for p, _ in hit),
                certified_b=sum(q for _, q in hit),
                a_only=a_only,
                b_only=b_only,
                p_value=binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0,
            )
        )
    differences = [x.certified_radius - y.certified_radius for x, y in pairs]
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else 0.0
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else math.inf
    with_p = [(x.p_lower, y.p_lower) for x, y in pairs if not (math.isnan(x.p_lower) or math.isnan(y.p_lower))]
    higher = lower = sign_p = None
    if len(with_p) == n:
        higher, lower = sum(p > q for p, q in with_p), sum(p < q for p, q in with_p)
        sign_p = binomtest(higher, higher + lower).pvalue if higher + lower else 1.0
    return CertifyComparison(
        a=names[0],
        b=names[1],
        sigma=sigma,
        images=n,
        radii=radii,
        acr_a=average_certified_radius([x for x, _ in pairs]),
        acr_b=average_certified_radius([y for _, y in pairs]),
        acr_difference=mean,
        acr_difference_ci95=(mean - half, mean + half),
        p_lower_higher=higher,
        p_lower_lower=lower,
        p_lower_p_value=sign_p,
    )


def _sigma(headers: list[CertifyLogHeader | None], given: float | None) -> float:
    known = {h.smoothing.sigma for h in headers if h is not None} | ({given} if given is not None else set())
    if not known:
        raise ValueError("neither log records σ (released TSV logs do not): give --sigma")
    if len(known) > 1:
        raise ValueError(f"the logs were certified at different σ ({sorted(known)}): not comparable")
    return known.pop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="log A: certify-<base>.jsonl, a folder of them (with part logs), or a TSV")
    parser.add_argument("b", type=Path, help="log B, the same kinds")
    parser.add_argument("--first-n", type=int, help="compare only the first n test images")
    parser.add_argument("--sigma", type=float, help="σ, needed when neither log records it (two released TSVs)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")


def run(args: argparse.Namespace) -> int:
    try:
        (header_a, a), (header_b, b) = read_any_log(args.a), read_any_log(args.b)
        sigma = _sigma([header_a, header_b], args.sigma)
        result = compare(a, b, sigma, (str(args.a), str(args.b)), args.first_n)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        args.json.write_text(result.to_json())
    return 0
