"""Training: every preset and baseline runs on small real data, losses fall, --resume and seeds are exact on CPU,
DDP on two Gloo processes matches one process, checkpoints load in the core and the service, shipped models hold up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from models import create_model, load_checkpoint
from training import cli, train
from training.__main__ import main as training_main
from training.baselines import step_losses
from training.calibration import clean_accuracy
from training.data import load_image_folder
from training.presets import PRESETS, TrainConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "data"
ZOO = ROOT / "models" / "zoo"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SOAP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "soap-cache"))


@pytest.fixture(scope="module")
def cifar100_folder(tmp_path_factory) -> Path:
    """Synthetic 100-class ImageFolder (CIFAR-100 is not available offline): 2 random 32x32 PNGs per class."""
    root = tmp_path_factory.mktemp("cifar100")
    rng = np.random.default_rng(0)
    for c in range(100):
        (root / f"class{c:03d}").mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c:03d}" / f"{i}.png")
    return root


def train_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return train.run(parser.parse_args([str(a) for a in argv]))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def data_root(preset: str, cifar100: Path) -> Path:
    dataset = get_preset(preset).dataset
    return {"mnist": TESTS / "mnist", "cifar10": TESTS / "cifar10", "cifar100": cifar100}[dataset]


FULL_RUN_PRESETS = sorted(p for p in PRESETS if "wrn28" not in p)
STEP_ONLY_PRESETS = sorted(p for p in PRESETS if p not in FULL_RUN_PRESETS)


@pytest.mark.parametrize("preset", FULL_RUN_PRESETS)
def test_every_preset_and_baseline_trains_and_writes_a_loadable_checkpoint(preset, tmp_path, cifar100_folder):
    config = get_preset(preset)
    out = tmp_path / preset
    rc = train_cli(
        "--preset",
        preset,
        "--data-root",
        data_root(preset, cifar100_folder),
        "--out",
        out,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--max-steps-per-epoch",
        1,
        "--no-calibration",
        "--device",
        "cpu",
    )
    assert rc == 0
    loaded = load_checkpoint(out)
    assert loaded.meta.network == config.network
    assert loaded.meta.training.recipe == config.recipe
    # written explicitly (not left to the legacy inference): only soap's objective trains the auxiliary head
    assert json.loads((out / "model.json").read_text())["aux_head_trained"] is (config.recipe == "soap")
    assert len(loaded.meta.class_names) == (100 if config.dataset == "cifar100" else 10)
    (record,) = metrics(out)
    assert math.isfinite(record["train_loss"])
    assert record["train_steps"] == 1
    if config.recipe == "soap":
        assert record["train_aux_loss"] > 0
        assert record["train_loss"] == pytest.approx(
            record["train_cls_loss"] + config.alpha * record["train_aux_loss"], rel=1e-4
        )
    else:
        assert record["train_aux_loss"] == 0


@pytest.mark.parametrize("preset", STEP_ONLY_PRESETS)
def test_wide_resnet_presets_take_a_training_step(preset, cifar100_folder):
    """The 36M-parameter WRN presets: one real step of the training loop on one image (the CLI path is covered
    above)."""
    config = replace(get_preset(preset), batch_size=1)
    folder = data_root(preset, cifar100_folder)
    data = load_image_folder(folder, (3, 32, 32))
    torch.manual_seed(0)
    network = create_model(config.network, num_classes=len(data.class_names))
    optimizer = train.make_optimizer(network, config)
    before = network.classifier.weight.detach().clone()
    x, y = data.batch(torch.tensor([len(data) - 1]))
    loss, cls, aux, logits, consistency = train.train_step(
        train.Objective(network, config), network, optimizer, x, y, config, torch.Generator().manual_seed(0)
    )
    assert consistency.item() == 0
    assert math.isfinite(loss.item())
    assert logits.shape == (1, len(data.class_names))
    assert (aux.item() > 0) == (config.recipe == "soap")
    assert not torch.equal(before, network.classifier.weight)


@pytest.mark.parametrize(
    ("preset", "epochs", "batch"),
    [
        ("mnist-fcn-dr", 6, 30),
        ("mnist-cnn-dr", 4, 30),
        ("mnist-fcn-pgd-at", 6, 30),
        ("cifar10-resnet18-rp", 5, 24),
        ("cifar10-resnet18-lc", 5, 24),
    ],
)
def test_losses_go_down(preset, epochs, batch, tmp_path, cifar100_folder):
    out = tmp_path / "run"
    assert (
        train_cli(
            "--preset",
            preset,
            "--data-root",
            data_root(preset, cifar100_folder),
            "--out",
            out,
            "--epochs",
            epochs,
            "--batch-size",
            batch,
            "--no-calibration",
            "--device",
            "cpu",
        )
        == 0
    )
    first, last = metrics(out)[0], metrics(out)[-1]
    assert last["train_cls_loss"] < first["train_cls_loss"]
    if (
        get_preset(preset).recipe == "soap" and "-lc" not in preset
    ):  # LC's consistency loss starts near 0 and grows as logits do
        assert last["train_aux_loss"] < first["train_aux_loss"]


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """BatchNorm buffers, momentum, augmentation and training noise all continue exactly."""
    common = [
        "--preset",
        "cifar10-resnet18-rp",
        "--data-root",
        TESTS / "cifar10",
        "--epochs",
        3,
        "--batch-size",
        12,
        "--max-steps-per-epoch",
        2,
        "--no-calibration",
        "--device",
        "cpu",
    ]
    assert train_cli(*common, "--out", tmp_path / "straight") == 0
    assert train_cli(*common, "--out", tmp_path / "split", "--stop-after", 1) == 0
    assert len(metrics(tmp_path / "split")) == 1
    assert train_cli(*common, "--out", tmp_path / "split", "--resume") == 0
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["train_loss"] for m in metrics(tmp_path / "straight")] == [
        m["train_loss"] for m in metrics(tmp_path / "split")
    ]
    assert json.loads((tmp_path / "split" / "model.json").read_text())["training"]["epochs"] == 3


def test_training_is_deterministic_per_seed(tmp_path):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert (
            train_cli(
                "--preset",
                "mnist-fcn-dr",
                "--data-root",
                TESTS / "mnist",
                "--out",
                out,
                "--epochs",
                2,
                "--batch-size",
                30,
                "--max-steps-per-epoch",
                3,
                "--seed",
                seed,
                "--no-calibration",
                "--device",
                "cpu",
            )
            == 0
        )
        return load_file(out / "model.safetensors")

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    """Vanilla recipe on the FCN (no noise, no BatchNorm): averaged half-batch gradients = full-batch gradient."""
    args = [
        "train",
        "--preset",
        "mnist-fcn-vanilla",
        "--data-root",
        str(TESTS / "mnist"),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--max-steps-per-epoch",
        "3",
        "--no-calibration",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training",
            *args,
            "--out",
            str(tmp_path / "ddp"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_cli(*args[1:], "--out", tmp_path / "single") == 0
    ddp, single = (
        load_file(tmp_path / "ddp" / "model.safetensors"),
        load_file(tmp_path / "single" / "model.safetensors"),
    )
    assert not torch.equal(ddp["classifier.weight"], torch.zeros_like(ddp["classifier.weight"]))
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4)
    meta = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert meta["training"]["world_size"] == 2
    assert meta["training"]["command"].startswith("torchrun --nproc_per_node 2")
    assert meta["training"]["command"].endswith("--threads 1 --max-steps-per-epoch 3 --no-calibration")
    assert [m["train_steps"] for m in metrics(tmp_path / "ddp")] == [3, 3]


def test_checkpoint_from_training_loads_in_core_and_service(tmp_path):
    out = tmp_path / "fcn"
    assert (
        train_cli(
            "--preset",
            "mnist-fcn-dr",
            "--data-root",
            TESTS / "mnist",
            "--out",
            out,
            "--epochs",
            3,
            "--batch-size",
            30,
            "--calibration-images",
            20,
            "--device",
            "cpu",
        )
        == 0
    )
    loaded = load_checkpoint(out)
    cal = loaded.meta.calibration
    q = [cal.aux_loss_quantiles[k] for k in ("0.5", "0.9", "0.95", "0.99")]
    assert cal.n == 30
    assert q == sorted(q)
    assert q[0] > 0
    assert len(cal.mean_aux_loss_per_budget) == loaded.purifier.num_budgets
    assert cal.mean_aux_loss_per_budget[-1] < cal.mean_aux_loss_per_budget[0]  # purification lowers the aux loss
    training = loaded.meta.training
    assert training.command.startswith("python -m training train --preset mnist-fcn-dr")
    assert training.model_extra["epochs"] == 3
    assert training.model_extra["seed"] == 0
    assert training.git_commit
    assert training.model_extra["hardware"]
    card = (out / "MODEL_CARD.md").read_text()
    assert training.command in card
    assert "Clean test accuracy" in card

    from service.config import ServiceSettings
    from service.predict import PurifyRequest
    from service.runtime import ServiceRuntime

    runtime = ServiceRuntime(ServiceSettings(models=[out], device="cpu", compute_process=False))
    model = runtime.models["fcn"]
    assert model.suspicious_threshold == pytest.approx(cal.aux_loss_quantiles["0.99"])
    images = load_image_folder(TESTS / "mnist", (1, 28, 28)).batch(torch.arange(4))[0]
    predictions = model.compute(images, PurifyRequest())
    assert predictions.probs.shape == (4, 10)
    assert torch.allclose(predictions.probs.sum(1), torch.ones(4), atol=1e-5)


def test_corrupted_dataset_folder_gives_the_clear_error(tmp_path, capsys):
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(TESTS / "mnist", folder)
    bad = next((folder / "1").iterdir())
    bad.write_bytes(b"\x89PNG broken")
    rc = train_cli("--preset", "mnist-fcn-dr", "--data-root", folder, "--out", tmp_path / "out", "--epochs", 1)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "not a readable image" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_preset_lists_the_known_ones(capsys):
    assert train_cli("--preset", "mnist-mlp") == 2
    assert "mnist-fcn-dr" in capsys.readouterr().err


# ----------------------------------------------------------------------------- consistency regularisation


def tiny_dr_run(out: Path, *extra: object) -> int:
    return train_cli(
        "--preset",
        "mnist-fcn-dr",
        "--data-root",
        TESTS / "mnist",
        "--out",
        out,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--max-steps-per-epoch",
        3,
        "--no-calibration",
        "--device",
        "cpu",
        *extra,
    )


def dr_loss_is_ce_plus_alpha_mse(config, sigma: float, clamp: bool = True):
    """Asserts the DR recipe's step loss is CE + α·MSE on one noisy copy clamp(x + N(0, σ²), 0, 1) (x + N(0, σ²)
    without `clamp`), to the bit."""
    torch.manual_seed(0)
    network = create_model("mnist-fcn-dr")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(11)
    got = step_losses(network, x, x, y, config)
    torch.manual_seed(11)
    noisy = x + sigma * torch.randn_like(x)
    z = network.encode(noisy.clamp(0.0, 1.0) if clamp else noisy)
    expected = F.cross_entropy(network.classify(z), y) + config.alpha * F.mse_loss(network.auxiliary(z), x)
    assert torch.equal(got.total, expected)
    return got


def test_consistency_off_leaves_the_dr_loss_bit_identical():
    """λ = 0 (the default) is today's objective, to the bit: CE + α·MSE on one noisy copy."""
    config = get_preset("mnist-fcn-dr")
    assert not config.consistency
    assert config.consistency_lambda == 0
    assert dr_loss_is_ce_plus_alpha_mse(config, 0.5).consistency_loss is None


def test_consistency_lambda_zero_trains_exactly_as_without_the_option(tmp_path):
    assert tiny_dr_run(tmp_path / "plain") == 0
    assert tiny_dr_run(tmp_path / "zero", "--consistency-lambda", 0, "--consistency-copies", 4) == 0
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "zero" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    (plain,), (zero,) = metrics(tmp_path / "plain"), metrics(tmp_path / "zero")
    assert plain["train_loss"] == zero["train_loss"]
    assert "train_consistency_loss" not in zero
    training = json.loads((tmp_path / "zero" / "model.json").read_text())["training"]
    assert "consistency" not in training
    assert "--consistency" not in training["command"]


def test_a_tiny_run_with_consistency_records_it(tmp_path):
    out = tmp_path / "cons"
    assert tiny_dr_run(out, "--consistency-lambda", 5, "--consistency-eta", 0.5, "--consistency-copies", 3) == 0
    (record,) = metrics(out)
    assert record["train_consistency_loss"] > 0
    assert record["train_loss"] == pytest.approx(
        record["train_cls_loss"] + 100.0 * record["train_aux_loss"] + record["train_consistency_loss"], rel=1e-4
    )
    training = load_checkpoint(out).meta.training.model_dump(mode="json")
    assert training["config"]["consistency_lambda"] == 5.0
    assert training["config"]["consistency_eta"] == 0.5
    assert training["config"]["consistency_copies"] == 3
    assert "λ = 5" in training["consistency"]
    assert "3 noisy copies" in training["consistency"]
    assert "--consistency-lambda 5 --consistency-eta 0.5 --consistency-copies 3" in training["command"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "- consistency: consistency regularisation (Jeong & Shin" in card


def test_noise_std_sets_the_dr_training_noise_and_the_recorded_sigma(tmp_path):
    """--noise-std trains on clamp(x + N(0, σ²)) and records σ (certification's default) in the checkpoint."""
    dr_loss_is_ce_plus_alpha_mse(replace(get_preset("mnist-fcn-dr"), noise_std=0.25), 0.25)
    out = tmp_path / "s025"
    assert tiny_dr_run(out, "--noise-std", 0.25) == 0
    meta = load_checkpoint(out).meta
    assert meta.noise_std == 0.25
    assert "--noise-std 0.25" in meta.training.model_dump(mode="json")["command"]


def test_no_noise_clamp_trains_on_unclamped_noise_and_certification_follows_it(tmp_path):
    """--no-noise-clamp trains on x + N(0, σ²) as the smoothing papers do (issue 26: clamping cost certified radius
    at σ = 1.0), is recorded in the checkpoint, and certification then adds its noise the same way by default."""
    unclamped = replace(get_preset("mnist-fcn-dr"), noise_clamp=False)
    dr_loss_is_ce_plus_alpha_mse(unclamped, 0.5, clamp=False)
    with pytest.raises(AssertionError):  # the clamp makes a difference the check sees
        dr_loss_is_ce_plus_alpha_mse(unclamped, 0.5, clamp=True)
    with pytest.raises(ValueError, match="--no-noise-clamp"):
        replace(get_preset("mnist-cnn-vanilla"), noise_clamp=False)
    out = tmp_path / "unclamped"
    assert tiny_dr_run(out, "--no-noise-clamp", "--consistency-lambda", 5) == 0
    meta = load_checkpoint(out).meta
    assert meta.noise_clamp is False
    assert "--no-noise-clamp" in meta.training.model_dump(mode="json")["command"]
    assert load_checkpoint(ROOT / "models" / "zoo" / "mnist-fcn-dr").meta.noise_clamp is True  # older metadata

    argv = ["evaluate", "--model", str(out), "--data-root", str(ROOT / "tests" / "data" / "mnist"), "--n", "1"]
    argv += ["--attacks", "certify", "--n0", "10", "--certify-n", "50", "--bases", "noisy", "--noise-batch", "50"]
    assert training_main([*argv, "--out", str(tmp_path / "default")]) == 0
    assert training_main([*argv, "--clamp", "--out", str(tmp_path / "forced")]) == 0
    default = json.loads((tmp_path / "default" / "certify.json").read_text())
    forced = json.loads((tmp_path / "forced" / "certify.json").read_text())
    assert default["smoothing"]["clamp"] is False
    assert forced["smoothing"]["clamp"] is True
    assert " --clamp" in forced["command"]
    assert "--clamp" not in default["command"]  # the checkpoint's own noise needs no flag
    assert "--no-clamp" not in default["command"]


def test_a_tiny_run_with_smoothmix_records_it(tmp_path):
    out = tmp_path / "smix"
    assert tiny_dr_run(out, "--smoothmix-eta", 5, "--smoothmix-steps", 2, "--smoothmix-mix-step", 1) == 0
    (record,) = metrics(out)
    assert record["train_smoothmix_loss"] >= 0
    assert record["train_loss"] == pytest.approx(
        record["train_cls_loss"] + 100.0 * record["train_aux_loss"] + record["train_smoothmix_loss"], rel=1e-4
    )
    training = load_checkpoint(out).meta.training.model_dump(mode="json")
    assert training["config"]["smoothmix_eta"] == 5.0
    assert "SmoothMix (Jeong et al." in training["smoothmix"]
    assert "--smoothmix-eta 5 --smoothmix-steps 2 --smoothmix-mix-step 1" in training["command"]
    assert "- smoothmix: SmoothMix" in (out / "MODEL_CARD.md").read_text()


def test_smoothmix_is_refused_outside_the_dr_recipe_and_beside_consistency(capsys):
    assert train_cli("--preset", "mnist-fcn-vanilla", "--smoothmix-eta", 5) == 2
    assert "DR recipe" in capsys.readouterr().err
    assert train_cli("--preset", "mnist-fcn-dr", "--smoothmix-eta", 5, "--consistency-lambda", 5) == 2
    assert "separate recipes" in capsys.readouterr().err
    assert train_cli("--preset", "mnist-fcn-dr", "--smoothmix-eta", 5, "--smoothmix-mix-step", 4) == 2


def test_every_training_setting_is_a_flag_and_the_recorded_command_parses_back_to_the_run():
    """The flags come from TrainConfig's fields (a field added there gets its flag and its recorded option), and the
    command written into a checkpoint (`training.command`) reproduces the configuration it trained with."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    settings = [f.name for f in fields(TrainConfig) if f.name not in ("network", "dataset")]
    assert {"--" + name.replace("_", "-") for name in settings} <= flags
    runs = [
        ["--preset", "mnist-cnn-pgd-at", "--lr", "1e-05", "--lr-milestones", "0.3,0.6", "--no-calibration"],
        ["--preset", "cifar10-resnet18-lc", "--recipe", "pgd-at", "--crop-flip", "--alpha", "50", "--threads", "1"],
        ["--preset", "mnist-fcn-dr", "--consistency-lambda", "5", "--consistency-copies", "3", "--data-root", "d"],
        ["--preset", "mnist-lenet-dr", "--noise-std", "0.25", "--smoothmix-eta", "5", "--smoothmix-mix-step", "1"],
    ]
    for argv in runs:
        args = parser.parse_args(argv)
        config, options = train.config_from_args(args), cli.from_args(train.TrainOptions, args)
        recorded = train.reproducing_options(config, options)
        again = parser.parse_args(recorded)
        assert train.config_from_args(again) == config, recorded
        assert cli.from_args(train.TrainOptions, again) == options, recorded
    # the options of a part of the recipe that is off change nothing, and are left out
    args = parser.parse_args(["--preset", "mnist-fcn-dr", "--consistency-lambda", "0", "--consistency-copies", "4"])
    recorded = train.reproducing_options(train.config_from_args(args), cli.from_args(train.TrainOptions, args))
    assert recorded == [
        "--preset",
        "mnist-fcn-dr",
        "--epochs",
        "100",
        "--lr",
        "0.01",
        "--batch-size",
        "128",
        "--seed",
        "0",
    ]


def test_consistency_is_refused_outside_the_dr_recipe(capsys):
    assert train_cli("--preset", "mnist-fcn-vanilla", "--consistency-lambda", 5) == 2
    assert "DR recipe" in capsys.readouterr().err
    assert train_cli("--preset", "mnist-fcn-dr", "--consistency-lambda", -1) == 2


# ----------------------------------------------------------------------------- shipped models

SHIPPED = sorted(p for p in ZOO.iterdir() if (p / "model.json").is_file()) if ZOO.is_dir() else []
# Paper (no purification): FCN 97.57 %, CNN 99.04 % (issue 3 asks for 97.5 / 98.9). The shipped FCN reaches 97.76 %
# (paper recipe at 200 epochs, seed sweep in its card); the shipped CNN 99.07 % (lr 0.1, 30 epochs, 1 warm-up epoch).
MIN_ACCURACY = {"mnist-fcn-dr": 0.975, "mnist-cnn-dr": 0.989, "mnist-fcn-dr-pgd-at": 0.9, "mnist-cnn-dr-pgd-at": 0.98}


def test_the_default_model_is_shipped():
    assert (ZOO / "mnist-fcn-dr" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_loads_with_calibration_metrics_card_and_claimed_accuracy(path):
    loaded = load_checkpoint(path)
    meta = loaded.meta
    assert meta.calibration is not None
    assert len(meta.calibration.mean_aux_loss_per_budget) == loaded.purifier.num_budgets
    assert meta.calibration.n >= 1000
    assert meta.metrics["clean_accuracy"] > 0.3
    assert meta.metrics["test_images"] >= 1000
    assert meta.training.command.startswith("python -m training ")
    assert "## How to reproduce" in (path / "MODEL_CARD.md").read_text()
    assert meta.metrics["clean_accuracy"] >= MIN_ACCURACY.get(path.name, 0.0)
    # The weights do what the metadata says: accuracy on the committed real test images is close to the claim.
    folder, shape = (TESTS / "mnist", (1, 28, 28)) if meta.dataset == "mnist" else (TESTS / "cifar10", (3, 32, 32))
    measured = clean_accuracy(loaded.network, load_image_folder(folder, shape))
    assert measured >= meta.metrics["clean_accuracy"] - 0.15


def test_warmup_and_eps_ramp_follow_their_schedules(tmp_path):
    """--warmup-epochs raises lr linearly within the first epochs; --attack-eps-ramp-epochs grows the training
    attack's ε to its preset value; both are recorded and are part of the reproducing command."""
    config = replace(get_preset("mnist-cnn-dr"), epochs=10, warmup_epochs=2, lr_milestones=(0.5,))
    assert train.lr_at(config, 0, 0.5) == pytest.approx(0.025)
    assert train.lr_at(config, 1, 1.0) == pytest.approx(0.1)
    assert train.lr_at(config, 2) == pytest.approx(0.1)
    assert train.lr_at(config, 5) == pytest.approx(0.01)
    ramp = replace(get_preset("mnist-fcn-pgd-at"), attack_eps_ramp_epochs=2)
    assert [ramp.attack_eps_at(e) for e in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])

    out = tmp_path / "pgd"
    assert (
        train_cli(
            "--preset",
            "mnist-fcn-pgd-at",
            "--data-root",
            TESTS / "mnist",
            "--out",
            out,
            "--epochs",
            3,
            "--batch-size",
            50,
            "--warmup-epochs",
            1,
            "--attack-eps-ramp-epochs",
            2,
            "--no-calibration",
            "--device",
            "cpu",
        )
        == 0
    )
    rows = metrics(out)
    assert [r["attack_eps"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.001])  # in force at the end of each epoch
    command = load_checkpoint(out).meta.training.command
    assert "--warmup-epochs 1" in command
    assert "--attack-eps-ramp-epochs 2" in command


def test_init_from_fine_tunes_the_given_weights_and_records_it(tmp_path):
    """--init-from starts from a checkpoint's weights: with lr 0 the result is those weights exactly; the option is in
    the recorded command; a checkpoint of another network is refused."""
    zoo = Path(__file__).resolve().parents[1] / "models" / "zoo" / "mnist-fcn-dr"
    out = tmp_path / "tuned"
    assert tiny_dr_run(out, "--init-from", zoo, "--lr", 0) == 0
    tuned, shipped = load_file(out / "model.safetensors"), load_file(zoo / "model.safetensors")
    assert all(torch.equal(tuned[k], shipped[k]) for k in shipped)
    assert f"--init-from {zoo}" in load_checkpoint(out).meta.training.model_dump(mode="json")["command"]
    assert tiny_dr_run(tmp_path / "fresh", "--lr", 0) == 0
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    assert not all(torch.equal(fresh[k], shipped[k]) for k in shipped)
    cnn = Path(__file__).resolve().parents[1] / "models" / "zoo" / "mnist-cnn-dr"
    with pytest.raises(SystemExit, match="holds a mnist-cnn-dr"):
        tiny_dr_run(tmp_path / "wrong", "--init-from", cnn)
