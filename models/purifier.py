"""Test-time purification (paper Algorithm 2) with per-example min-aux budget selection.

Algorithm 2 is sign-gradient descent on the auxiliary loss inside an L∞ ball of radius ε:
    δ ← δ − γ·sign(∇ L_aux(x + δ));  δ ← clip(δ, −ε, ε);  δ ← clip(x + δ, 0, 1) − x.

min-aux runs it for every budget of a grid and keeps, per image, the smallest ε whose purified image
has the lowest auxiliary loss. Work sharing: |δ_t| ≤ t·γ, so all budgets ε ≥ t·γ follow one trajectory
up to step t. We keep one state per distinct trajectory and evaluate all of them in one batched
gradient call per step (11 evaluations per image with Δ = γ, T = 5, 11 budgets, instead of 50).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch

from .acceleration import AuxLossFn
from .networks import SoapNetwork
from .tasks import aux_loss


class Mode(StrEnum):
    """The purification modes, a closed set: the values are what the API, the metrics and the results name."""

    MIN_AUX = "min-aux"  # per-image budget search (SOAP's Algorithm 2)
    FIXED = "fixed"  # purify at one given budget
    NONE = "none"  # no purification; the auxiliary loss is still measured


@dataclass(frozen=True)
class PurifierConfig:
    """Step size γ, number of steps T, and the budget grid ε_e = e·Δ for e = 0..num_budgets-1."""

    step_size: float
    steps: int = 5
    budget_step: float = 0.05
    num_budgets: int = 11

    def budgets(self) -> list[float]:
        return [e * self.budget_step for e in range(self.num_budgets)]

    @property
    def max_budget(self) -> float:
        return (self.num_budgets - 1) * self.budget_step


@dataclass
class PurifyResult:
    """Purified images and, per image, the chosen ε and the auxiliary loss before/after.

    `curve[i, e]` is image i's auxiliary loss after purification at budget e (paper Fig. 3; always there: the
    selection computes it); `candidates[e]` are the purified images at budget e (for the oracle; only when asked,
    being K copies of the batch). `grad_evals` counts the auxiliary-gradient evaluations per image.
    """

    images: torch.Tensor
    epsilon: torch.Tensor
    aux_before: torch.Tensor
    aux_after: torch.Tensor
    budgets: torch.Tensor
    grad_evals: int
    curve: torch.Tensor
    candidates: torch.Tensor | None = None


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "purification needs input gradients: call it outside torch.inference_mode() (torch.no_grad() is fine)"
        )


def _aux_gradient(loss_fn: AuxLossFn, x: torch.Tensor) -> torch.Tensor:
    """∇_x of the per-example auxiliary loss (the sum decouples examples), without parameter grads."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return grad


def _step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    delta = (delta - gamma * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def _trajectories(
    loss_fn: AuxLossFn, x: torch.Tensor, budgets: list[float], config: PurifierConfig
) -> tuple[list[torch.Tensor], int]:
    """Final δ for every budget, sharing the steps of identical trajectories. Returns (deltas, grad evals).

    A state is (δ, budget indices following it). At step t a state's members with ε ≥ t·γ stay together
    (the ε-clip is a no-op for them); each member with a smaller ε leaves with its own clipped δ.
    """
    gamma = config.step_size
    finals: dict[int, torch.Tensor] = {}
    zero = torch.zeros_like(x)
    active = [e for e, eps in enumerate(budgets) if eps > 0]
    for e, eps in enumerate(budgets):
        if eps <= 0:
            finals[e] = zero
    states: list[tuple[torch.Tensor, list[int]]] = [(zero, active)] if active else []
    grad_evals = 0
    b = x.shape[0]
    for t in range(1, config.steps + 1):
        if not states:
            break
        grads = _aux_gradient(loss_fn, torch.cat([x + d for d, _ in states])).split(b)
        grad_evals += len(states)
        next_states = []
        reach = t * gamma * (1 - 1e-6)
        for (delta, members), grad in zip(states, grads, strict=True):
            shared = [e for e in members if budgets[e] >= reach]
            for e in members:
                if budgets[e] < reach:
                    next_states.append((_step(x, delta, grad, gamma, budgets[e]), [e]))
            if shared:
                next_states.append((_step(x, delta, grad, gamma, min(budgets[e] for e in shared)), shared))
        states = next_states
    for delta, members in states:
        for e in members:
            finals[e] = delta
    return [finals[e] for e in range(len(budgets))], grad_evals


@torch.no_grad()
def _losses(loss_fn: AuxLossFn, images: list[torch.Tensor]) -> torch.Tensor:
    """Auxiliary loss of each candidate batch, shape [len(images), B], in one forward pass."""
    return loss_fn(torch.cat(images)).view(len(images), -1)


def purify(
    model: SoapNetwork,
    x: torch.Tensor,
    config: PurifierConfig,
    mode: Mode | str = Mode.MIN_AUX,
    epsilon: float | None = None,
    return_candidates: bool = False,
    loss_fn: AuxLossFn | None = None,
) -> PurifyResult:
    """Purify a batch of images in [0, 1]. Pure: neither `x` nor the model's parameters are changed.

    mode "min-aux" searches the config's budget grid per image; "fixed" purifies at `epsilon`; "none"
    only measures the auxiliary loss. The model is put in eval mode (BatchNorm/dropout must not couple
    examples). `loss_fn` replaces the model's auxiliary loss by an accelerated one (models.acceleration).
    """
    if mode not in set(Mode):
        raise ValueError(f"unknown purification mode {mode!r}; expected one of {[m.value for m in Mode]}")
    mode = Mode(mode)
    fixed_epsilon = 0.0
    if mode is Mode.FIXED:
        if epsilon is None or epsilon < 0:
            raise ValueError("mode 'fixed' needs a non-negative epsilon")
        fixed_epsilon = float(epsilon)
    if mode is not Mode.NONE:
        _require_autograd()
    model.eval()
    x = x.detach()
    if mode is Mode.NONE:
        budgets = [0.0]
    elif mode is Mode.FIXED:
        budgets = [0.0, fixed_epsilon] if fixed_epsilon > 0 else [0.0]
    else:
        budgets = config.budgets()
    loss = loss_fn or partial(aux_loss, model)
    with torch.enable_grad():
        deltas, grad_evals = _trajectories(loss, x, budgets, config)
    # Budgets that end in the same state share one loss evaluation.
    unique: list[torch.Tensor] = []
    slot: dict[int, int] = {}
    for d in deltas:
        if id(d) not in slot:
            slot[id(d)] = len(unique)
            unique.append(x + d)
    curve = _losses(loss, unique)[[slot[id(d)] for d in deltas]].T  # [B, K]
    result = _select(x, [x + d for d in deltas], curve, budgets, fixed=mode is Mode.FIXED, grad_evals=grad_evals)
    if not return_candidates:
        result.candidates = None
    return result


def _select(
    x: torch.Tensor, images: list[torch.Tensor], curve: torch.Tensor, budgets: list[float], fixed: bool, grad_evals: int
) -> PurifyResult:
    """Pick per image the budget to keep: the last one for "fixed", else the first minimum of the curve
    (argmin returns the first minimum, i.e. the smallest ε attaining the lowest loss)."""
    b = x.shape[0]
    choice = torch.full((b,), len(budgets) - 1, device=x.device, dtype=torch.long) if fixed else curve.argmin(dim=1)
    stacked = torch.stack(images)  # [K, B, ...]
    idx = torch.arange(b, device=x.device)
    budget_t = torch.tensor(budgets, device=x.device, dtype=x.dtype)
    return PurifyResult(
        images=stacked[choice, idx],
        epsilon=budget_t[choice],
        aux_before=curve[:, 0],
        aux_after=curve[idx, choice],
        budgets=budget_t,
        grad_evals=grad_evals,
        curve=curve,
        candidates=stacked,
    )


def purify_naive(model: SoapNetwork, x: torch.Tensor, config: PurifierConfig) -> PurifyResult:
    """Reference min-aux: Algorithm 2 run separately for every budget ε > 0, with no sharing.

    Kept as the baseline that tests and the benchmark compare the shared-trajectory purifier against.
    """
    _require_autograd()
    model.eval()
    x = x.detach()
    budgets = config.budgets()
    images, grad_evals = [], 0
    with torch.enable_grad():
        for eps in budgets:
            delta = torch.zeros_like(x)
            if eps > 0:
                for _ in range(config.steps):
                    delta = _step(x, delta, _aux_gradient(partial(aux_loss, model), x + delta), config.step_size, eps)
                    grad_evals += 1
            images.append(x + delta)
    with torch.no_grad():
        curve = torch.stack([aux_loss(model, im) for im in images], dim=1)
    result = _select(x, images, curve, budgets, fixed=False, grad_evals=grad_evals)
    result.candidates = None
    return result


@torch.no_grad()
def oracle_select(model: SoapNetwork, result: PurifyResult, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation-only upper bound: per image, the smallest budget whose purified image is classified
    correctly; the min-aux choice where none is. Needs `purify(..., return_candidates=True)`.

    Returns (images, epsilon).
    """
    if result.candidates is None:
        raise ValueError("oracle selection needs purify(..., return_candidates=True)")
    k, b = result.candidates.shape[:2]
    preds = model(result.candidates.flatten(0, 1)).argmax(1).view(k, b)
    correct = preds == labels.view(1, b)
    first_correct = correct.float().argmax(0)
    fallback = (result.budgets.view(k, 1) == result.epsilon.view(1, b)).float().argmax(0)
    choice = torch.where(correct.any(0), first_correct, fallback)
    idx = torch.arange(b, device=labels.device)
    return result.candidates[choice, idx], result.budgets[choice]
