"""Per-dataset attack settings; the defaults are the paper's (soap-reference §4), each overridable.

Settings the paper does not fix (CW's search schedule, the adaptive attacks) are ours and are stated
with every result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .blackbox import SubstituteConfig


@dataclass(frozen=True)
class AttackSettings:
    linf_eps: float  # FGSM, PGD, aux-aware PGD, black-box, adaptive attacks
    pgd_step: float
    pgd_steps: int
    l2_eps: float  # CW, DeepFool results are projected onto this L2 ball
    cw_binary_steps: int = 5
    cw_steps: int = 100
    cw_lr: float = 0.01
    cw_initial_const: float = 0.1
    df_steps: int = 50
    df_overshoot: float = 0.02
    aux_betas: tuple[float, ...] = (-1.0, -0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1, 1.0)
    adaptive_steps: int = 40  # BPDA / full-gradient PGD iterations (step = pgd_step scaled to reach ε)
    apgd_steps: int = 100
    apgd_restarts: int = 1  # APGD random restarts (each image keeps its best run)
    square_queries: int = 5000  # Square attack: the query budget per image (AutoAttack's)
    eot_samples: int = 1  # SOAP's purifier is deterministic: one sample is exact
    blackbox_seed_images: int = 150  # held-out test images the black-box substitute starts from
    substitute: SubstituteConfig = field(default_factory=SubstituteConfig)  # its training (Papernot et al.)

    def with_overrides(self, **changes) -> AttackSettings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def adaptive_step(self) -> float:
        """Step size for BPDA/full-gradient PGD: 2.5·ε/steps (Madry et al.'s rule)."""
        return 2.5 * self.linf_eps / self.adaptive_steps


PAPER_SETTINGS: dict[str, AttackSettings] = {
    "mnist": AttackSettings(linf_eps=0.3, pgd_step=0.01, pgd_steps=40, l2_eps=4.0, cw_lr=0.1),
    "cifar10": AttackSettings(linf_eps=8 / 255, pgd_step=2 / 255, pgd_steps=20, l2_eps=2.0, adaptive_steps=20),
    "cifar100": AttackSettings(linf_eps=8 / 255, pgd_step=2 / 255, pgd_steps=20, l2_eps=2.0, adaptive_steps=20),
}


def paper_settings(dataset: str) -> AttackSettings:
    if dataset not in PAPER_SETTINGS:
        raise ValueError(f"no attack settings for dataset {dataset!r}; known: {sorted(PAPER_SETTINGS)}")
    return PAPER_SETTINGS[dataset]
