"""Sanity checks that run with every evaluation (issue 5); a failure is reported, never hidden.

1. ε = 0 is the identity: the image is unchanged and so is every row's accuracy.
2. Every adversarial image lies within its budget and in [0, 1].
3. Iterative attacks are at least as strong as FGSM (bare network).
4. Accuracy falls towards zero as the attack budget grows (PGD on the bare network; BPDA on SOAP).
5. Adaptive attacks are at least as strong as purifier-blind ones (min-aux row).
6. Uniform noise in the ε-ball is weaker than the gradient attacks.
7. Purification costs at most 2 points of clean accuracy (the paper: 97.57 → 97.56 on MNIST FCN); a larger
   drop means the auxiliary task does not model the data (e.g. a collapsed decoder).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .attacks import aux_aware_pgd, bpda_objective, fgsm, pgd
from .attacks.registry import AttackContext

BUDGET_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
NEAR_ZERO = 0.05
CLEAN_DROP = 0.02
BUDGET_TOLERANCE = {"linf": 1e-5, "l2": 1e-4}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Extras:
    beta_sweep: dict | None = None
    budget_sweep: dict | None = None
    epsilon_zero: dict = field(default_factory=dict)


def _accuracy(scorer, x, y, batch_size: int = 250) -> dict[str, float]:
    parts = [scorer.correct(xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]
    return {row: float(torch.cat([p[row] for p in parts]).float().mean()) for row in parts[0]}


def epsilon_zero(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """FGSM and PGD with ε = 0 must return the images unchanged and leave every row's accuracy as it was."""
    s = ctx.settings
    clean = _accuracy(scorer, x, y)
    out: dict[str, object] = {"n": int(x.shape[0])}
    for name, adv in (
        ("fgsm", fgsm(ctx.model, x, y, 0.0)),
        ("pgd", pgd(ctx.model, x, y, 0.0, s.pgd_step, s.pgd_steps)),
    ):
        out[name] = {
            "max_change": float((adv - x).abs().max()),
            "unchanged_accuracy": _accuracy(scorer, adv, y) == clean,
        }
    return out


def budget_sweep(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor, defended: bool) -> dict:
    """Accuracy against PGD (bare network) and BPDA-PGD (SOAP min-aux) as ε grows to 4× the paper's budget."""
    s = ctx.settings
    budgets = [min(1.0, m * s.linf_eps) for m in BUDGET_MULTIPLIERS]
    bare: list[float] = []
    bpda: list[float] = []
    out = {
        "n": int(x.shape[0]),
        "budgets": budgets,
        "bare_pgd": bare,
        "bpda_min_aux": bpda,
        "bare_settings": f"PGD {s.pgd_steps} steps of max(step, 2.5ε/steps), no random start",
        "bpda_settings": f"BPDA-PGD {min(s.adaptive_steps, 10)} steps of 2.5ε/steps, best iterate kept",
    }
    steps_bpda = min(s.adaptive_steps, 10)
    for eps in budgets:
        adv = pgd(ctx.model, x, y, eps, max(s.pgd_step, 2.5 * eps / s.pgd_steps), s.pgd_steps)
        bare.append(_accuracy(scorer, adv, y)["none"])
        if defended:
            adv = pgd(
                ctx.model,
                x,
                y,
                eps,
                2.5 * eps / steps_bpda,
                steps_bpda,
                keep_best=True,
                objective=bpda_objective(ctx.model, ctx.purifier),
            )
            bpda.append(_accuracy(scorer, adv, y)["min-aux"])
    return out


def beta_sweep(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Paper Fig. 5: accuracy before/after purification under aux-aware PGD for each β."""
    s = ctx.settings
    undefended: list[float] = []
    purified: list[float | None] = []
    out = {"n": int(x.shape[0]), "betas": list(s.aux_betas), "none": undefended, "min-aux": purified}
    for beta in s.aux_betas:
        adv = torch.cat(
            [
                aux_aware_pgd(ctx.model, xb, yb, s.linf_eps, s.pgd_step, s.pgd_steps, beta=beta)
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
            ]
        )
        acc = _accuracy(scorer, adv, y)
        undefended.append(acc["none"])
        purified.append(acc.get("min-aux"))
    return out


def _acc(result: dict, attack: str, row: str) -> float | None:
    a = result["attacks"].get(attack)
    return None if a is None or row not in a["rows"] else a["rows"][row]["accuracy"]


def run_checks(result: dict, extras: Extras) -> list[Check]:
    checks: list[Check] = []
    ez = extras.epsilon_zero
    if ez:
        ok = all(ez[a]["max_change"] == 0 and ez[a]["unchanged_accuracy"] for a in ("fgsm", "pgd"))
        checks.append(
            Check(
                "epsilon-zero-identity",
                ok,
                f"FGSM/PGD at ε = 0 on {ez['n']} images: max change "
                f"{max(ez['fgsm']['max_change'], ez['pgd']['max_change']):.2g}, accuracy unchanged in "
                f"every row: {ez['fgsm']['unchanged_accuracy'] and ez['pgd']['unchanged_accuracy']}",
            )
        )
    bad = []
    for name, a in result["attacks"].items():
        size = a["max_linf"] if a["norm"] == "linf" else a["max_l2"]
        if size > a["budget"] + BUDGET_TOLERANCE[a["norm"]] or a["out_of_range_images"]:
            bad.append(
                f"{name} ({a['norm']} {size:.4g} > {a['budget']:.4g} or {a['out_of_range_images']} outside [0, 1])"
            )
    checks.append(
        Check(
            "within-budget-and-range",
            not bad,
            "every adversarial image within its budget and in [0, 1]" if not bad else "; ".join(bad),
        )
    )
    f = _acc(result, "fgsm", "none")
    if f is not None:
        found = {k: _acc(result, k, "none") for k in ("pgd", "apgd-ce")}
        iterative = {k: v for k, v in found.items() if v is not None}
        weaker = {k: v for k, v in iterative.items() if v > f}
        checks.append(
            Check(
                "iterative-at-least-fgsm",
                not weaker,
                f"bare network: FGSM {100 * f:.2f} %, "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in iterative.items()),
            )
        )
    sweep = extras.budget_sweep
    if sweep:
        for key, label in (("bare_pgd", "PGD on the bare network"), ("bpda_min_aux", "BPDA on SOAP min-aux")):
            accs = sweep.get(key) or []
            if not accs:
                continue
            monotone = all(b <= a + 1.0 / sweep["n"] + 1e-9 for a, b in itertools.pairwise(accs))
            ok = monotone and accs[-1] <= NEAR_ZERO
            checks.append(
                Check(
                    f"accuracy-falls-with-budget ({key})",
                    ok,
                    f"{label} at ε = "
                    + ", ".join(f"{e:.3g}: {100 * a:.1f} %" for e, a in zip(sweep["budgets"], accs, strict=True))
                    + f" (n = {sweep['n']}; needs non-increasing and ≤ {100 * NEAR_ZERO:.0f} % at the largest)",
                )
            )
    if "min-aux" in result["rows"] and "adaptive" in result.get("worst_case", {}):
        worst = result["worst_case"]["adaptive"]["min-aux"]["accuracy"]
        blind = {
            k: _acc(result, k, "min-aux")
            for k, a in result["attacks"].items()
            if a["kind"] == "blind" and a["norm"] == "linf" and k not in ("blackbox", "aux-pgd")
        }
        stronger_blind = {k: v for k, v in blind.items() if v is not None and v < worst}
        checks.append(
            Check(
                "adaptive-at-least-blind",
                not stronger_blind,
                f"min-aux row: worst adaptive {100 * worst:.2f} % vs blind "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in blind.items() if v is not None),
            )
        )
    if "min-aux" in result["rows"]:
        before, after = result["clean"]["none"]["accuracy"], result["clean"]["min-aux"]["accuracy"]
        checks.append(
            Check(
                "purification-keeps-clean-accuracy",
                after >= before - CLEAN_DROP,
                f"clean accuracy {100 * before:.2f} % without, {100 * after:.2f} % with min-aux purification "
                f"(allowed drop {100 * CLEAN_DROP:.0f} points)",
            )
        )
    for row in result["rows"][:2]:
        noise = _acc(result, "noise", row)
        if noise is None:
            continue
        found = {k: _acc(result, k, row) for k in ("fgsm", "pgd")}
        gradient = {k: v for k, v in found.items() if v is not None}
        stronger = {k: v for k, v in gradient.items() if v > noise}
        checks.append(
            Check(
                f"noise-weaker-than-gradient ({row})",
                not stronger,
                f"uniform noise {100 * noise:.2f} % vs "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in gradient.items()),
            )
        )
    return checks
