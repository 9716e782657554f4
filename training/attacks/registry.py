"""Named attacks for the evaluation harness: what each one is, its threat model, and how to run it.

Purifier-blind attacks (the paper's) are computed on the bare network and then shown to every row of
the table; adaptive attacks target the purify-then-classify pipeline itself. Every runner has the
signature run(ctx, x, y) -> x_adv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from models import PurifierConfig, SoapNetwork
from models.attacks.linf import fgsm, pgd, uniform_noise
from models.attacks.losses import LossName, Objective
from models.attacks.seeding import ImageGenerators

from .adaptive import bpda_objective, bpda_trajectory_objective, defended_logits, full_gradient_objective
from .apgd import apgd
from .aux_aware import aux_aware_pgd
from .blackbox import substitute_fgsm, train_substitute
from .defended import Backward, DefendedClassifier
from .eot import eot
from .evasion import evasion_objective
from .l2 import cw_l2, deepfool
from .settings import AttackSettings

Tensor = torch.Tensor
AttackKind = Literal["blind", "adaptive", "control"]  # purifier-blind (the paper's), adaptive, or a control (noise)
Norm = Literal["linf", "l2"]  # the norm of the attack's budget


@dataclass
class AttackContext:
    """Everything an attack may use: the network, its purifier, settings, randomness, black-box seed data.

    `rng` holds one generator per image of the current batch and `batch_seed` seeds libraries that take one
    seed per call (torchattacks); the harness sets both before every batch, from the images' indices.
    """

    model: SoapNetwork
    purifier: PurifierConfig
    settings: AttackSettings
    seed: int = 0
    rng: ImageGenerators | None = None
    batch_seed: int = 0
    suspicious_threshold: float | None = None  # the checkpoint's calibrated flag (aux loss before purification)
    beta: float = 0.5
    substitute_seed: Tensor | None = None  # images the black-box attacker may label (never scored)
    substitute_factory: Callable[[], torch.nn.Module] | None = None
    cache: dict = field(default_factory=dict)  # e.g. the trained substitute, reused across batches


@dataclass(frozen=True)
class AttackSpec:
    name: str
    kind: AttackKind
    norm: Norm
    description: Callable[[AttackSettings], str]
    run: Callable[[AttackContext, Tensor, Tensor], Tensor]

    def budget(self, s: AttackSettings) -> float:
        return s.linf_eps if self.norm == "linf" else s.l2_eps


def _substitute(ctx: AttackContext) -> torch.nn.Module:
    if "substitute" not in ctx.cache:
        if ctx.substitute_seed is None or ctx.substitute_factory is None:
            raise ValueError("the black-box attack needs seed images and a substitute architecture")

        def oracle(x: torch.Tensor) -> torch.Tensor:
            return defended_logits(ctx.model, ctx.purifier)(x).argmax(1)

        generator = torch.Generator().manual_seed(ctx.seed)  # the same substitute in every process
        ctx.cache["substitute"] = train_substitute(
            ctx.substitute_factory(), oracle, ctx.substitute_seed, ctx.settings.substitute, generator
        )
    return ctx.cache["substitute"]


def _adaptive_pgd(objective_factory):
    def run(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
        s = ctx.settings
        objective = eot(objective_factory(ctx), s.eot_samples)
        return pgd(ctx.model, x, y, s.linf_eps, s.adaptive_step, s.adaptive_steps, keep_best=True, objective=objective)

    return run


def _bare_apgd(loss: LossName):
    def run(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
        s = ctx.settings
        return apgd(ctx.model, x, y, s.linf_eps, s.apgd_steps, loss=loss, restarts=s.apgd_restarts, generator=ctx.rng)

    return run


def _adaptive_apgd(objective_factory):
    def run(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
        s = ctx.settings
        objective = eot(objective_factory(ctx), s.eot_samples)
        return apgd(
            ctx.model,
            x,
            y,
            s.linf_eps,
            s.apgd_steps,
            objective=objective,
            restarts=s.apgd_restarts,
            generator=ctx.rng,
        )

    return run


def _evasion(ctx: AttackContext) -> Objective:
    if ctx.suspicious_threshold is None:
        raise ValueError("the detector-aware attack needs the checkpoint's calibrated suspicious threshold")
    base = bpda_trajectory_objective(ctx.model, ctx.purifier)
    return evasion_objective(base, ctx.model, ctx.suspicious_threshold)


def _autoattack(model: nn.Module, ctx: AttackContext) -> Callable[[Tensor, Tensor], Tensor]:
    import torchattacks  # noqa: PLC0415  (only when a library column is asked for)

    return torchattacks.AutoAttack(
        model, norm="Linf", eps=ctx.settings.linf_eps, version="standard", n_classes=ctx.model.num_classes,
        seed=ctx.batch_seed,
    )  # fmt: skip


def _square(model: nn.Module, ctx: AttackContext) -> Callable[[Tensor, Tensor], Tensor]:
    import torchattacks  # noqa: PLC0415

    return torchattacks.Square(
        model, norm="Linf", eps=ctx.settings.linf_eps, n_queries=ctx.settings.square_queries, seed=ctx.batch_seed
    )


def _library(
    attack: Callable[[nn.Module, AttackContext], Callable[[Tensor, Tensor], Tensor]],
    classifier: Callable[[AttackContext], nn.Module],
):
    """A torchattacks attack (`_autoattack`, `_square`) on `classifier(ctx)`: the defended model or the bare network."""
    return lambda ctx, x, y: attack(classifier(ctx), ctx)(x, y)


def _through_purifier(backward: Backward) -> Callable[[AttackContext], nn.Module]:
    return lambda ctx: DefendedClassifier(ctx.model, ctx.purifier, backward)


def _bare(ctx: AttackContext) -> nn.Module:
    return ctx.model


_AUTOATTACK = "AutoAttack standard (torchattacks: APGD-CE, APGD-T, FAB-T, Square 5000 queries)"


def _square_text(on: str):
    return lambda s: (
        f"Square (gradient-free, torchattacks) on {on}, {s.square_queries} queries per image at most; "
        f"L∞ ε={s.linf_eps:.4g}"
    )


def _pgd_text(s: AttackSettings) -> str:
    return f"L∞ ε={s.linf_eps:.4g}, {s.pgd_steps} steps of {s.pgd_step:.4g}, no random start"


def _adaptive_text(what: str):
    return lambda s: (
        f"{what}; L∞ ε={s.linf_eps:.4g}, PGD {s.adaptive_steps} steps of {s.adaptive_step:.4g}, "
        f"best iterate kept, EOT {s.eot_samples}"
    )


def _apgd_text(what: str):
    return lambda s: (
        f"{what}; L∞ ε={s.linf_eps:.4g}, {s.apgd_steps} iterations, {s.apgd_restarts} random start"
        + ("s" if s.apgd_restarts > 1 else "")
        + f", EOT {s.eot_samples}"
    )


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in [
        AttackSpec(
            "noise",
            "control",
            "linf",
            lambda s: f"uniform noise in the L∞ ball ε={s.linf_eps:.4g}",
            lambda c, x, y: uniform_noise(x, c.settings.linf_eps, c.rng),
        ),
        AttackSpec(
            "fgsm",
            "blind",
            "linf",
            lambda s: f"FGSM L∞ ε={s.linf_eps:.4g}",
            lambda c, x, y: fgsm(c.model, x, y, c.settings.linf_eps),
        ),
        AttackSpec(
            "pgd",
            "blind",
            "linf",
            _pgd_text,
            lambda c, x, y: pgd(c.model, x, y, c.settings.linf_eps, c.settings.pgd_step, c.settings.pgd_steps),
        ),
        AttackSpec(
            "cw",
            "blind",
            "l2",
            lambda s: (
                f"CW-L2 ({s.cw_binary_steps} binary-search steps × {s.cw_steps} Adam steps, lr {s.cw_lr}, "
                f"c₀ {s.cw_initial_const}), projected onto the L2 ball ε={s.l2_eps:.4g}"
            ),
            lambda c, x, y: cw_l2(
                c.model,
                x,
                y,
                c.settings.l2_eps,
                binary_search_steps=c.settings.cw_binary_steps,
                steps=c.settings.cw_steps,
                learning_rate=c.settings.cw_lr,
                initial_const=c.settings.cw_initial_const,
            ),
        ),
        AttackSpec(
            "df",
            "blind",
            "l2",
            lambda s: (
                f"DeepFool L2 (all classes, {s.df_steps} steps, overshoot {s.df_overshoot}), "
                f"projected onto the L2 ball ε={s.l2_eps:.4g}"
            ),
            lambda c, x, y: deepfool(
                c.model, x, y, c.settings.l2_eps, steps=c.settings.df_steps, overshoot=c.settings.df_overshoot
            ),
        ),
        AttackSpec(
            "aux-pgd",
            "blind",
            "linf",
            lambda s: "auxiliary-aware PGD (CE − 100·β·L_aux), " + _pgd_text(s),
            lambda c, x, y: aux_aware_pgd(
                c.model, x, y, c.settings.linf_eps, c.settings.pgd_step, c.settings.pgd_steps, beta=c.beta
            ),
        ),
        AttackSpec(
            "blackbox",
            "blind",
            "linf",
            lambda s: (
                f"black-box: substitute trained on {s.blackbox_seed_images} held-out test images labelled by the "
                f"defended model (min-aux), {s.substitute.rounds} Jacobian-augmentation rounds of "
                f"{s.substitute.epochs} epochs, λ={s.substitute.lam:g}, FGSM ε={s.linf_eps:.4g} on it"
            ),
            lambda c, x, y: substitute_fgsm(_substitute(c), x, y, c.settings.linf_eps),
        ),
        AttackSpec(
            "apgd-ce",
            "blind",
            "linf",
            _apgd_text("APGD-CE on the bare network"),
            _bare_apgd("ce"),
        ),
        AttackSpec(
            "apgd-dlr",
            "blind",
            "linf",
            _apgd_text("APGD-DLR on the bare network"),
            _bare_apgd("dlr"),
        ),
        AttackSpec(
            "bpda",
            "adaptive",
            "linf",
            _adaptive_text("BPDA: real min-aux purifier forward, identity backward"),
            _adaptive_pgd(lambda c: bpda_objective(c.model, c.purifier)),
        ),
        AttackSpec(
            "bpda-traj",
            "adaptive",
            "linf",
            _adaptive_text("BPDA averaged over the purification trajectory at the min-aux ε"),
            _adaptive_pgd(lambda c: bpda_trajectory_objective(c.model, c.purifier)),
        ),
        AttackSpec(
            "full-grad",
            "adaptive",
            "linf",
            _adaptive_text("full gradient through Algorithm 2 unrolled at the min-aux ε (sign: tanh straight-through)"),
            _adaptive_pgd(lambda c: full_gradient_objective(c.model, c.purifier)),
        ),
        AttackSpec(
            "apgd-bpda",
            "adaptive",
            "linf",
            _apgd_text("APGD-CE, BPDA over the purification trajectory"),
            _adaptive_apgd(lambda c: bpda_trajectory_objective(c.model, c.purifier)),
        ),
        AttackSpec(
            "apgd-dlr-bpda",
            "adaptive",
            "linf",
            _apgd_text("APGD-DLR, BPDA over the purification trajectory"),
            _adaptive_apgd(lambda c: bpda_trajectory_objective(c.model, c.purifier, loss="dlr")),
        ),
        AttackSpec(
            "apgd-full",
            "adaptive",
            "linf",
            _apgd_text("APGD-CE, full gradient through the unrolled purifier"),
            _adaptive_apgd(lambda c: full_gradient_objective(c.model, c.purifier)),
        ),
        AttackSpec(
            "apgd-dlr-full",
            "adaptive",
            "linf",
            _apgd_text("APGD-DLR, full gradient through the unrolled purifier"),
            _adaptive_apgd(lambda c: full_gradient_objective(c.model, c.purifier, loss="dlr")),
        ),
        AttackSpec(
            "autoattack",
            "adaptive",
            "linf",
            lambda s: f"{_AUTOATTACK} on the defended model, trajectory-BPDA backward; L∞ ε={s.linf_eps:.4g}",
            _library(_autoattack, _through_purifier(Backward.TRAJECTORY)),
        ),
        AttackSpec(
            "square",
            "adaptive",
            "linf",
            _square_text("the defended model"),
            _library(_square, _through_purifier(Backward.BPDA)),  # gradient-free: the backward is unused
        ),
        # the same two on the bare network: the library suite of a network without a purifier (a PGD-AT baseline)
        AttackSpec(
            "autoattack-bare",
            "blind",
            "linf",
            lambda s: f"{_AUTOATTACK} on the bare network; L∞ ε={s.linf_eps:.4g}",
            _library(_autoattack, _bare),
        ),
        AttackSpec(
            "square-bare",
            "blind",
            "linf",
            _square_text("the bare network"),
            _library(_square, _bare),
        ),
        AttackSpec(
            "apgd-evade",
            "adaptive",
            "linf",
            _apgd_text(
                "APGD-CE through trajectory BPDA that keeps the auxiliary loss under the suspicious threshold "
                "(penalty 10·relu(L_aux/(0.9·threshold) − 1)); success = misclassified and not flagged"
            ),
            _adaptive_apgd(_evasion),
        ),
    ]
}

DEFAULT_ATTACKS = (
    "noise",
    "fgsm",
    "pgd",
    "cw",
    "df",
    "aux-pgd",
    "blackbox",
    "apgd-ce",
    "bpda",
    "bpda-traj",
    "full-grad",
    "apgd-bpda",
    "apgd-dlr-bpda",
    "apgd-full",
)


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name]
