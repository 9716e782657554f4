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

import torch

from .attacks import aux_aware_pgd, bpda_objective, fgsm, pgd
from .attacks.registry import AttackContext
from .records import BetaSweep, BudgetSweep, EpsilonZero, EvaluationResult, IdentityCheck, SanityCheck
from .rows import Row

BUDGET_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
NEAR_ZERO = 0.05
CLEAN_DROP = 0.02
BUDGET_TOLERANCE = {"linf": 1e-5, "l2": 1e-4}


def _accuracy(scorer, x, y, batch_size: int = 250) -> dict[str, float]:
    parts = [scorer.correct(xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]
    return {row: float(torch.cat([p[row] for p in parts]).float().mean()) for row in parts[0]}


def epsilon_zero(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor) -> EpsilonZero:
    """FGSM and PGD with ε = 0 must return the images unchanged and leave every row's accuracy as it was."""
    s = ctx.settings
    clean = _accuracy(scorer, x, y)

    def identity(adv: torch.Tensor) -> IdentityCheck:
        return IdentityCheck(
            max_change=float((adv - x).abs().max()), unchanged_accuracy=_accuracy(scorer, adv, y) == clean
        )

    return EpsilonZero(
        n=int(x.shape[0]),
        fgsm=identity(fgsm(ctx.model, x, y, 0.0)),
        pgd=identity(pgd(ctx.model, x, y, 0.0, s.pgd_step, s.pgd_steps)),
    )


def budget_sweep(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor, defended: bool) -> BudgetSweep:
    """Accuracy against PGD (bare network) and BPDA-PGD (SOAP min-aux) as ε grows to 4× the paper's budget."""
    s = ctx.settings
    budgets = [min(1.0, m * s.linf_eps) for m in BUDGET_MULTIPLIERS]
    bare: list[float] = []
    bpda: list[float] = []
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
    return BudgetSweep(
        n=int(x.shape[0]),
        budgets=budgets,
        bare_pgd=bare,
        bpda_min_aux=bpda,
        bare_settings=f"PGD {s.pgd_steps} steps of max(step, 2.5ε/steps), no random start",
        bpda_settings=f"BPDA-PGD {steps_bpda} steps of 2.5ε/steps, best iterate kept",
    )


def beta_sweep(ctx: AttackContext, scorer, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> BetaSweep:
    """Paper Fig. 5: accuracy before/after purification under aux-aware PGD for each β (SOAP checkpoints only)."""
    s = ctx.settings
    undefended: list[float] = []
    purified: list[float] = []
    for beta in s.aux_betas:
        adv = torch.cat(
            [
                aux_aware_pgd(ctx.model, xb, yb, s.linf_eps, s.pgd_step, s.pgd_steps, beta=beta)
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
            ]
        )
        acc = _accuracy(scorer, adv, y)
        undefended.append(acc["none"])
        purified.append(acc["min-aux"])
    return BetaSweep(n=int(x.shape[0]), betas=list(s.aux_betas), none=undefended, min_aux=purified)


def _acc(result: EvaluationResult, attack: str, row: Row) -> float | None:
    acc = result.accuracy(attack, row)
    return None if acc is None else acc.accuracy


def run_checks(result: EvaluationResult) -> list[SanityCheck]:
    """Every check the result's numbers allow (its sweeps and ε = 0 runs included); its stored checks are not read."""
    checks: list[SanityCheck] = []
    ez = result.epsilon_zero
    if ez is not None:
        ok = all(c.max_change == 0 and c.unchanged_accuracy for c in (ez.fgsm, ez.pgd))
        checks.append(
            SanityCheck(
                name="epsilon-zero-identity",
                passed=ok,
                detail=f"FGSM/PGD at ε = 0 on {ez.n} images: max change "
                f"{max(ez.fgsm.max_change, ez.pgd.max_change):.2g}, accuracy unchanged in "
                f"every row: {ez.fgsm.unchanged_accuracy and ez.pgd.unchanged_accuracy}",
            )
        )
    bad = []
    for name, a in result.attacks.items():
        size = a.max_linf if a.norm == "linf" else a.max_l2
        if size > a.budget + BUDGET_TOLERANCE[a.norm] or a.out_of_range_images:
            bad.append(f"{name} ({a.norm} {size:.4g} > {a.budget:.4g} or {a.out_of_range_images} outside [0, 1])")
    checks.append(
        SanityCheck(
            name="within-budget-and-range",
            passed=not bad,
            detail="every adversarial image within its budget and in [0, 1]" if not bad else "; ".join(bad),
        )
    )
    f = _acc(result, "fgsm", "none")
    if f is not None:
        found = {k: _acc(result, k, "none") for k in ("pgd", "apgd-ce")}
        iterative = {k: v for k, v in found.items() if v is not None}
        weaker = {k: v for k, v in iterative.items() if v > f}
        checks.append(
            SanityCheck(
                name="iterative-at-least-fgsm",
                passed=not weaker,
                detail=f"bare network: FGSM {100 * f:.2f} %, "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in iterative.items()),
            )
        )
    sweep = result.budget_sweep
    for key, label, accs in (
        ("bare_pgd", "PGD on the bare network", sweep.bare_pgd),
        ("bpda_min_aux", "BPDA on SOAP min-aux", sweep.bpda_min_aux),
    ):
        if not accs:
            continue
        monotone = all(b <= a + 1.0 / sweep.n + 1e-9 for a, b in itertools.pairwise(accs))
        ok = monotone and accs[-1] <= NEAR_ZERO
        checks.append(
            SanityCheck(
                name=f"accuracy-falls-with-budget ({key})",
                passed=ok,
                detail=f"{label} at ε = "
                + ", ".join(f"{e:.3g}: {100 * a:.1f} %" for e, a in zip(sweep.budgets, accs, strict=True))
                + f" (n = {sweep.n}; needs non-increasing and ≤ {100 * NEAR_ZERO:.0f} % at the largest)",
            )
        )
    if "min-aux" in result.rows and "adaptive" in result.worst_case:
        worst = result.worst_case["adaptive"].rows["min-aux"].accuracy
        blind = {
            k: _acc(result, k, "min-aux")
            for k, a in result.attacks.items()
            if a.kind == "blind" and a.norm == "linf" and k not in ("blackbox", "aux-pgd")
        }
        stronger_blind = {k: v for k, v in blind.items() if v is not None and v < worst}
        checks.append(
            SanityCheck(
                name="adaptive-at-least-blind",
                passed=not stronger_blind,
                detail=f"min-aux row: worst adaptive {100 * worst:.2f} % vs blind "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in blind.items() if v is not None),
            )
        )
    if "min-aux" in result.rows:
        before, after = result.clean["none"].accuracy, result.clean["min-aux"].accuracy
        checks.append(
            SanityCheck(
                name="purification-keeps-clean-accuracy",
                passed=after >= before - CLEAN_DROP,
                detail=f"clean accuracy {100 * before:.2f} % without, {100 * after:.2f} % with min-aux purification "
                f"(allowed drop {100 * CLEAN_DROP:.0f} points)",
            )
        )
    for row in result.rows[:2]:
        noise = _acc(result, "noise", row)
        if noise is None:
            continue
        found = {k: _acc(result, k, row) for k in ("fgsm", "pgd")}
        gradient = {k: v for k, v in found.items() if v is not None}
        stronger = {k: v for k, v in gradient.items() if v > noise}
        checks.append(
            SanityCheck(
                name=f"noise-weaker-than-gradient ({row})",
                passed=not stronger,
                detail=f"uniform noise {100 * noise:.2f} % vs "
                + ", ".join(f"{k} {100 * v:.2f} %" for k, v in gradient.items()),
            )
        )
    return checks
