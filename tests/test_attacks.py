"""Attacks: cross-checks against torchattacks and foolbox, and properties of every registered attack.

Runs on the shipped MNIST FCN-DR checkpoint and real MNIST test digits (tests/data/mnist).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import aux_loss, load_checkpoint, purify
from models.attacks.losses import input_gradient
from training.attacks import (
    SubstituteConfig,
    apgd,
    aux_aware_pgd,
    bpda_objective,
    classifier_objective,
    cw_l2,
    deepfool,
    dlr,
    eot,
    fgsm,
    full_gradient_objective,
    paper_settings,
    pgd,
    unrolled_purification,
)
from training.attacks.adaptive import chosen_epsilon
from training.attacks.registry import ATTACKS, AttackContext
from training.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
DIGITS = ROOT / "tests" / "data" / "mnist"


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real MNIST digits, interleaved over classes."""
    per_class = [sorted((DIGITS / str(d)).glob("*.png")) for d in range(10)]
    files = [(d, per_class[d][i]) for i in range(30) for d in range(10) if i < len(per_class[d])][:n]
    x = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0)[None] for _, p in files]
    )
    return x, torch.tensor([d for d, _ in files])


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return load_checkpoint(MODEL, "cpu")


@pytest.fixture(scope="module")
def model(loaded):
    return loaded.network


@pytest.fixture(scope="module")
def batch(model):
    x, y = _digits(60)
    with torch.no_grad():
        keep = model(x).argmax(1) == y  # attack only clean-correct digits
    return x[keep][:40], y[keep][:40]


def _acc(logits_fn, x, y) -> float:
    with torch.no_grad():
        return float((logits_fn(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- cross-checks


def test_fgsm_matches_torchattacks(model, batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    ours = fgsm(model, x, y, 0.3)
    theirs = torchattacks.FGSM(model, eps=0.3)(x, y)
    assert (ours - theirs).abs().max() <= 1e-6
    assert (ours - x).abs().max() > 0.29  # it did perturb


def test_pgd_matches_torchattacks(model, batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    ours = pgd(model, x, y, 0.3, 0.01, 40)
    theirs = torchattacks.PGD(model, eps=0.3, alpha=0.01, steps=40, random_start=False)(x, y)
    assert (ours - theirs).abs().max() <= 1e-6
    assert _acc(model, ours, y) < 0.2


def _median_l2(x, adv, fooled) -> float:
    return float((adv - x).flatten(1).norm(dim=1)[fooled].median())


def test_cw_and_deepfool_agree_with_foolbox(model, batch):
    """Same settings, same model: the median minimal L2 perturbation agrees within 10 %.

    foolbox returns an all-zero image where it found nothing, so failures are excluded on both sides."""
    fb = pytest.importorskip("foolbox")
    x, y = batch[0][:20], batch[1][:20]
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    criterion = fb.criteria.Misclassification(y)

    ours_cw = cw_l2(model, x, y, None, binary_search_steps=4, steps=50, learning_rate=0.1, initial_const=0.1)
    theirs_cw = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=4, steps=50, stepsize=0.1, initial_const=0.1).run(
        fmodel, x, criterion
    )
    ours_df = deepfool(model, x, y, None, steps=50, overshoot=0.02)
    theirs_df = fb.attacks.L2DeepFoolAttack(steps=50, candidates=None, overshoot=0.02).run(fmodel, x, criterion)

    for ours, theirs in ((ours_cw, theirs_cw), (ours_df, theirs_df)):
        with torch.no_grad():
            ours_fooled = model(ours).argmax(1) != y
            theirs_fooled = (model(theirs).argmax(1) != y) & (theirs.flatten(1).abs().sum(1) > 0)
        assert ours_fooled.float().mean() >= 0.75
        assert theirs_fooled.float().mean() >= 0.75
        ours_med, theirs_med = _median_l2(x, ours, ours_fooled), _median_l2(x, theirs, theirs_fooled)
        assert ours_med > 0
        assert abs(ours_med - theirs_med) <= 0.1 * theirs_med, (ours_med, theirs_med)


# ----------------------------------------------------------------------------- properties of every attack

FAST = dataclasses.replace(
    paper_settings("mnist"),
    substitute=SubstituteConfig(rounds=2, epochs=4),
    pgd_steps=10,
    pgd_step=0.04,
    cw_binary_steps=3,
    cw_steps=40,
    df_steps=20,
    adaptive_steps=5,
    apgd_steps=8,
    square_queries=20,
)
SMALL_BUDGET = {"linf": 0.03, "l2": 0.3}


@pytest.fixture(scope="module")
def contexts(loaded, batch):
    """One context per budget (the trained substitute is shared through the cache)."""
    x, _ = batch
    seed_images, _ = _digits(300)
    cache: dict = {}

    def make(scale: str) -> AttackContext:
        settings = FAST
        if scale != "paper":
            value = 0.0 if scale == "zero" else None
            settings = dataclasses.replace(
                FAST,
                linf_eps=SMALL_BUDGET["linf"] if value is None else value,
                l2_eps=SMALL_BUDGET["l2"] if value is None else value,
            )
        return AttackContext(
            model=loaded.network,
            purifier=loaded.purifier,
            settings=settings,
            seed=0,
            suspicious_threshold=loaded.meta.calibration.suspicious_threshold,
            substitute_seed=seed_images[-60:],
            substitute_factory=lambda: _fresh_fcn(loaded),
            cache=cache,
        )

    return {s: make(s) for s in ("zero", "small", "paper")}


def _fresh_fcn(loaded):
    from models import create_model

    torch.manual_seed(1)
    return create_model("mnist-fcn-dr")


# AutoAttack's schedule is fixed (minutes through the purifier); tests/test_library_attacks.py runs it on a few
# digits. On the bare network (autoattack-bare) it takes seconds and is tested here.
@pytest.mark.parametrize("name", [name for name in ATTACKS if name != "autoattack"])
def test_attack_properties(name, contexts, batch, model):
    """Within budget and [0, 1]; inputs and parameters untouched; ε = 0 is the identity; success rises with ε."""
    spec = ATTACKS[name]
    x, y = batch
    x_before, params_before = x.clone(), [p.clone() for p in model.parameters()]
    results = {}
    for scale, ctx in contexts.items():
        adv = spec.run(ctx, x, y)
        budget = spec.budget(ctx.settings)
        size = (adv - x).abs().flatten(1).amax(1) if spec.norm == "linf" else (adv - x).flatten(1).norm(dim=1)
        assert size.max() <= budget + 1e-5, (scale, float(size.max()), budget)
        assert adv.min() >= 0
        assert adv.max() <= 1
        results[scale] = adv
    assert torch.equal(x, x_before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before, strict=True))
    assert torch.equal(results["zero"], x)
    ctx = contexts["paper"]
    if spec.kind == "adaptive":

        def judge(images):
            return model(purify(model, images, ctx.purifier).images)
    else:
        judge = model
    small, paper = _acc(judge, results["small"], y), _acc(judge, results["paper"], y)
    assert paper <= small
    assert paper < _acc(judge, x, y) or name == "noise"


# ----------------------------------------------------------------------------- specific behaviour


def test_pgd_best_loss_tracking_keeps_every_success(model, batch):
    x, y = batch
    final = pgd(model, x, y, 0.1, 0.02, 10)
    best = pgd(model, x, y, 0.1, 0.02, 10, keep_best=True)
    with torch.no_grad():
        final_wrong, best_wrong = model(final).argmax(1) != y, model(best).argmax(1) != y
    assert bool((best_wrong | ~final_wrong).all())  # whatever the final iterate fooled, the best one fools
    restarts = pgd(model, x, y, 0.1, 0.02, 10, True, restarts=3, generator=torch.Generator().manual_seed(0))
    assert (restarts - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="without random_start"):
        pgd(model, x, y, 0.1, 0.02, 10, restarts=2)


def test_aux_aware_pgd_beta_zero_is_pgd_and_beta_lowers_aux_loss(model, batch):
    x, y = batch
    assert torch.equal(aux_aware_pgd(model, x, y, 0.3, 0.01, 20, beta=0.0), pgd(model, x, y, 0.3, 0.01, 20))
    with torch.no_grad():
        plain = aux_loss(model, pgd(model, x, y, 0.3, 0.01, 20)).mean()
        aware = aux_loss(model, aux_aware_pgd(model, x, y, 0.3, 0.01, 20, beta=1.0)).mean()
    assert aware < plain


def test_unrolled_purification_replays_min_aux(loaded, batch):
    model, cfg = loaded.network, loaded.purifier
    x, _ = batch
    adv = fgsm(model, x, batch[1], 0.3)
    reference = purify(model, adv, cfg)
    replay = unrolled_purification(model, adv, reference.epsilon, cfg)[-1]
    same = (replay - reference.images).abs().flatten(1).amax(1) < 1e-5
    assert same.float().mean() >= 0.95


def test_full_gradient_sees_the_purifier(loaded, batch):
    """Straight-through sign gives a gradient that differs from BPDA's; the exact (zero) sign derivative
    reduces to the classifier gradient at the purified image, masked by the clips."""
    model, cfg = loaded.network, loaded.purifier
    x, y = batch
    adv = fgsm(model, x, y, 0.2)
    g_bpda, _, _ = input_gradient(bpda_objective(model, cfg), adv, y)
    g_full, _, logits = input_gradient(full_gradient_objective(model, cfg), adv, y)
    g_zero, _, _ = input_gradient(full_gradient_objective(model, cfg, sign_backward="zero"), adv, y)
    assert torch.isfinite(g_full).all()
    assert g_full.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(g_full.flatten(1), g_bpda.flatten(1)).mean()
    assert cos < 0.999
    nonzero = g_zero != 0
    assert torch.allclose(g_zero[nonzero], g_bpda[nonzero], atol=1e-5)
    defended = model(purify(model, adv, cfg).images)
    assert (logits.argmax(1) == defended.argmax(1)).float().mean() >= 0.95


def test_eot_averages_a_random_objective(model, batch):
    x, y = batch
    base = classifier_objective(model)

    def noisy(xx, yy):
        return base((xx + 0.2 * torch.randn_like(xx)).clamp(0, 1), yy)

    assert torch.allclose(eot(base, 3)(x, y)[0], base(x, y)[0], rtol=1e-5, atol=1e-7)
    one = torch.stack([eot(noisy, 1)(x, y)[0] for _ in range(8)]).detach()
    many = torch.stack([eot(noisy, 16)(x, y)[0] for _ in range(8)]).detach()
    assert many.std(0).mean() < one.std(0).mean()
    with pytest.raises(ValueError, match="at least one sample"):
        eot(base, 0)


def test_apgd_dlr_is_scale_invariant_and_apgd_beats_fgsm(model, batch):
    x, y = batch
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert torch.allclose(dlr(logits, labels), dlr(3.0 * logits + 1.0, labels), atol=1e-5)
    adv = apgd(model, x, y, 0.3, 20, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert _acc(model, adv, y) <= _acc(model, fgsm(model, x, y, 0.3), y)


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-4
    assert abs(hi - 0.7634) < 1e-4
    lo, hi = wilson_interval(0, 10)
    assert lo == 0
    assert abs(hi - 0.2775) < 1e-4
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_chosen_epsilon_is_on_the_grid(loaded, batch):
    eps = chosen_epsilon(loaded.network, batch[0], loaded.purifier)
    grid = torch.tensor(loaded.purifier.budgets())
    assert ((eps[:, None] - grid[None]).abs().min(1).values < 1e-6).all()


def test_blackbox_description_states_the_settings_it_runs_with() -> None:
    """D6: the results describe the black-box attack from its actual settings, not from a fixed text."""
    settings = paper_settings("mnist").with_overrides(
        blackbox_seed_images=60, substitute=SubstituteConfig(rounds=2, epochs=4, lam=0.05)
    )
    text = ATTACKS["blackbox"].description(settings)
    assert "60 held-out test images" in text
    assert "2 Jacobian-augmentation rounds of 4 epochs" in text
    assert "λ=0.05" in text
    assert "ε=0.3" in text
