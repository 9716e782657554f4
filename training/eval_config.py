"""The settings of `python -m training evaluate`, declared once: each field is its command-line flag (`training.cli`
builds the parser and the recorded command line from them). A leaf of the evaluation: the evaluation and the
certification both read it, neither through the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.smoothing import BASE_CLASSIFIERS

from .attacks.registry import ATTACKS, DEFAULT_ATTACKS
from .cli import Recorded, option, recorded

_OVERRIDE = "override {field}"


@dataclass(frozen=True)
class AttackOverrides:
    """Attack settings given on the command line (None: the paper's for the checkpoint's dataset); the fields are
    AttackSettings fields."""

    linf_eps: float | None = option(None, names=("--eps",), help=_OVERRIDE)
    l2_eps: float | None = option(None, help=_OVERRIDE)
    pgd_step: float | None = option(None, help=_OVERRIDE)
    pgd_steps: int | None = option(None, help=_OVERRIDE)
    cw_steps: int | None = option(None, help=_OVERRIDE)
    cw_binary_steps: int | None = option(None, help=_OVERRIDE)
    df_steps: int | None = option(None, help=_OVERRIDE)
    adaptive_steps: int | None = option(None, help=_OVERRIDE)
    apgd_steps: int | None = option(None, help=_OVERRIDE)
    apgd_restarts: int | None = option(None, help=_OVERRIDE)
    square_queries: int | None = option(None, help=_OVERRIDE)
    eot_samples: int | None = option(None, help=_OVERRIDE)

    def given(self) -> dict[str, Any]:
        """The overrides that were given, by AttackSettings field."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class CertifyOptions:
    """The smoothing settings of `evaluate --attacks certify` (σ None: the checkpoint's training noise)."""

    sigma: float | None = option(None, help="noise σ (default: the checkpoint's training noise)")
    n0: int = option(100, record=Recorded.ALWAYS, help="noise samples to select the class")
    n: int = option(10_000, names=("--certify-n",), record=Recorded.ALWAYS, help="noise samples to estimate p_A")
    alpha: float = option(0.001, record=Recorded.ALWAYS, help="failure probability of each certificate")
    noise_batch: int = option(1_000, record=Recorded.ALWAYS, help="noisy copies per forward pass (memory)")
    bases: tuple[str, ...] = option(
        BASE_CLASSIFIERS, record=Recorded.ALWAYS, help=f"base classifiers: {', '.join(BASE_CLASSIFIERS)}"
    )
    clamp: bool | None = option(
        None, names=("--clamp",), help="clamp noisy inputs to [0, 1] (default: as the checkpoint's training noise)"
    )


# The options of an evaluation that a certification depends on (its recorded command carries these and its own).
CERTIFY_RECORDS = ("model", "data_root", "n", "attacks", "seed", "out", "certify")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation (or, with `attacks == ("certify",)`, one certification) of a checkpoint."""

    model: Path = option(record=Recorded.ALWAYS, help="checkpoint folder (model.safetensors + model.json)")
    data_root: Path | None = option(
        None, help="dataset root: torchvision layout (MNIST/raw/...) or an ImageFolder tree (ROOT/test/<class>/)"
    )
    n: int = option(
        1000,
        names=("--n", "--images"),
        record=Recorded.ALWAYS,
        help="number of test images (the first n; default 1000). Under torchrun write --images: torchrun's own "
        "parser rejects --n as an ambiguous abbreviation of its options",
    )
    attacks: tuple[str, ...] = option(
        DEFAULT_ATTACKS, record=Recorded.ALWAYS, help=f"comma-separated subset of: {', '.join(ATTACKS)}"
    )
    seed: int = option(0, record=Recorded.ALWAYS)
    device: str = option("auto", record=Recorded.NEVER, help="auto | cpu | cuda | cuda:N")
    out: Path = option(Path("results"), record=Recorded.ALWAYS, help="output folder")
    batch_size: int = option(250, record=Recorded.ALWAYS)
    beta: float = option(0.5, record=Recorded.ALWAYS, help="β of the aux-aware PGD column (paper scale)")
    sanity_n: int = option(100, record=Recorded.ALWAYS, help="images for the budget sweep and ε = 0 checks")
    beta_n: int = option(500, record=Recorded.ALWAYS, help="images for the β sweep (Fig. 5)")
    adaptive_n: int | None = option(  # adaptive attacks on the first adaptive_n images only (CPU budget)
        None, help="run adaptive attacks on the first N of the n images only (they cost ~T·K gradients per step)"
    )
    figures: bool = option(True, names=("--no-figures",), record=Recorded.NEVER)
    resume: bool = option(  # reuse the per-batch partial results under out/.partial (same configuration only)
        True,
        names=("--no-resume",),
        record=Recorded.NEVER,
        help="recompute every batch (default: reuse OUT/.partial of this config)",
    )
    threads: int | None = option(None, record=Recorded.NEVER, help="torch CPU threads")
    certify: CertifyOptions = option(
        factory=CertifyOptions, help="--attacks certify: randomized smoothing (Cohen et al. 2019)"
    )
    settings: AttackOverrides = option(
        factory=AttackOverrides, help="attack settings (defaults: the paper's for the checkpoint's dataset)"
    )

    def command(self) -> str:
        """The command that reproduces this evaluation (or certification)."""
        certifies = self.attacks == ("certify",)
        options = recorded(self, only=CERTIFY_RECORDS) if certifies else recorded(self, skip=("certify",))
        return " ".join(["python -m training evaluate", *options])
