"""The paper's figures for one evaluation, as PNG (matplotlib, Agg backend).

- aux_loss_vs_budget.png (Fig. 3): mean auxiliary loss after purifying at each ε_pfy, for clean and for
  PGD images, with the unpurified losses as dashed lines.
- examples.png (Fig. 4): clean, PGD-adversarial and min-aux-purified images with their predictions.
- accuracy_vs_beta.png (Fig. 5): accuracy before and after purification under aux-aware PGD over β.
- accuracy_vs_budget.png: the budget sweep of the sanity checks.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from models import purify
from models.checkpoint import LoadedModel

from .attacks import pgd
from .records import BetaSweep, CertifyResult, EvaluationResult


def _title(result: EvaluationResult) -> str:
    return f"{result.network} · {result.dataset} · n={result.n} · seed {result.seed}"


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aux_loss_curve(
    result: EvaluationResult, loaded: LoadedModel, clean: torch.Tensor, adv: torch.Tensor, path: Path
) -> None:
    model, cfg = loaded.network, loaded.purifier
    fig, ax = plt.subplots(figsize=(5, 3.5))
    budgets = cfg.budgets()
    for images, label, colour in ((clean, "clean", "tab:blue"), (adv, "PGD adversarial", "tab:red")):
        curve = purify(model, images, cfg).curve.mean(0).cpu().numpy()
        ax.plot(budgets, curve, marker="o", color=colour, label=f"{label}, purified at ε_pfy")
        ax.axhline(float(curve[0]), color=colour, linestyle="--", linewidth=0.8)
    ax.set_xlabel("purification budget ε_pfy")
    ax.set_ylabel("mean auxiliary loss")
    ax.set_title(f"Aux loss vs ε_pfy ({images.shape[0]} images)\n{_title(result)}", fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, path)


def examples(
    result: EvaluationResult, loaded: LoadedModel, clean: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, path: Path
) -> None:
    model, cfg = loaded.network, loaded.purifier
    names = loaded.meta.class_names
    k = min(8, clean.shape[0])
    clean, y, adv = clean[:k], y[:k], adv[:k]
    purified = purify(model, adv, cfg)
    with torch.no_grad():
        preds = [model(t).argmax(1).cpu() for t in (clean, adv, purified.images)]
    rows = [("clean", clean), ("PGD", adv), ("purified", purified.images)]
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.4))
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            img = images[c].detach().cpu().numpy()
            ax.imshow(
                img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                cmap="gray" if img.shape[0] == 1 else None,
                vmin=0,
                vmax=1,
            )
            ok = int(preds[r][c]) == int(y[c])
            extra = f"\nε={float(purified.epsilon[c]):.2f}" if label == "purified" else ""
            ax.set_xlabel(f"{names[int(preds[r][c])]}{extra}", color="green" if ok else "red", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(names[int(y[c])], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"Clean / PGD / min-aux purified, prediction under each\n{_title(result)}", fontsize=8)
    _save(fig, path)


def accuracy_vs_beta(result: EvaluationResult, sweep: BetaSweep, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sweep.betas, [100 * a for a in sweep.none], marker="o", label="before purification")
    ax.plot(sweep.betas, [100 * a for a in sweep.min_aux], marker="o", label="after purification (min-aux)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("β (paper scale; objective CE − 100·β·L_aux; symlog axis)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Aux-aware PGD, n={sweep.n}\n{_title(result)}", fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, path)


def accuracy_vs_budget(result: EvaluationResult, path: Path) -> None:
    sweep = result.budget_sweep
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sweep.budgets, [100 * a for a in sweep.bare_pgd], marker="o", label="PGD, bare network")
    if sweep.bpda_min_aux:
        ax.plot(sweep.budgets, [100 * a for a in sweep.bpda_min_aux], marker="o", label="BPDA, SOAP min-aux")
    ax.set_xlabel("attack budget ε (L∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs attack budget, n={sweep.n}\n{_title(result)}", fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, path)


def make_all(
    result: EvaluationResult,
    loaded: LoadedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    kept: dict[str, torch.Tensor],
    out: Path,
) -> list[str]:
    """Draw every figure the result supports; returns the file paths."""

    s = result.settings
    adv = kept.get("pgd")
    if adv is None:
        adv = pgd(loaded.network, x, y, s.linf_eps, s.pgd_step, s.pgd_steps)
    adv = adv.to(x.device)[: x.shape[0]]
    paths = []
    if "min-aux" in result.rows:
        aux_loss_curve(result, loaded, x, adv, out / "aux_loss_vs_budget.png")
        examples(result, loaded, x, y, adv, out / "examples.png")
        paths += [out / "aux_loss_vs_budget.png", out / "examples.png"]
    if result.beta_sweep is not None:
        accuracy_vs_beta(result, result.beta_sweep, out / "accuracy_vs_beta.png")
        paths.append(out / "accuracy_vs_beta.png")
    accuracy_vs_budget(result, out / "accuracy_vs_budget.png")
    paths.append(out / "accuracy_vs_budget.png")
    return [str(p) for p in paths]


def certified_accuracy_curve(result: CertifyResult, path: Path) -> None:
    """Certified accuracy vs L2 radius, one line per base classifier (the curve of Cohen et al., Fig. 7)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, base in result.bases.items():
        radii = sorted(r for r in base.radii if r is not None)
        n = base.n
        grid = [i * 0.01 for i in range(int(100 * max(radii + [2.0])) + 2)]
        acc = [sum(r >= t for r in radii) / n for t in grid]
        ax.plot(grid, acc, label=f"{kind} (n={n})")
    s = result.smoothing
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result.network} · σ={s.sigma} · n={s.n} · α={s.alpha} · seed {result.seed}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
