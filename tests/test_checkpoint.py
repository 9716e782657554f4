"""Checkpoint format: safetensors + JSON, round trip, and a clear CheckpointError for every way it breaks."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, Recipe, create_model, get_spec, load_checkpoint, save_checkpoint
from models.checkpoint import Calibration, _sha256, meta_for, read_meta

DIGITS = [str(i) for i in range(10)]


def _fcn():
    torch.manual_seed(0)
    return create_model("mnist-fcn-dr")


def _meta(model, network="mnist-fcn-dr", dataset="mnist", classes=DIGITS):
    return meta_for(
        model,
        network=network,
        dataset=dataset,
        class_names=classes,
        aux_head_trained=True,
        training={
            "command": "python -m training train --preset x",
            "epochs": 3,
            "seed": 7,
            "git_commit": "abc",
            "date": "2026-11-29",
        },
        metrics={"clean_accuracy": 0.91},
        calibration=Calibration(
            n=100,
            aux_loss_quantiles={"0.5": 0.01, "0.9": 0.02, "0.95": 0.03, "0.99": 0.05},
            mean_aux_loss_per_budget=[0.01] * 11,
        ),
    )


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = _fcn()
    return save_checkpoint(model, _meta(model), tmp_path / "mnist-fcn-dr")


def _rewrite_weights(directory: Path, tensors: dict[str, torch.Tensor] | None = None, raw: bytes | None = None) -> None:
    """Replace the weights and record their new sha256, so that only the intended problem remains."""
    weights = directory / "model.safetensors"
    if raw is not None:
        weights.write_bytes(raw)
    else:
        save_file(tensors, str(weights))
    _edit_meta(directory, lambda m: m.update(weights_sha256=_sha256(weights)))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The saved tensors, copied out of the memory map (the tests overwrite the file)."""
    return {k: v.clone() for k, v in load_file(str(directory / "model.safetensors")).items()}


def _edit_meta(directory: Path, change) -> None:
    meta = json.loads((directory / "model.json").read_text())
    change(meta)
    (directory / "model.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_logits_and_metadata(ckpt: Path) -> None:
    model = _fcn().eval()
    x = torch.rand(5, 1, 28, 28)
    loaded = load_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model(x))
    assert not loaded.network.training
    assert not any(p.requires_grad for p in loaded.network.parameters())
    meta = loaded.meta
    assert meta.network == "mnist-fcn-dr"
    assert meta.dataset == "mnist"
    assert meta.class_names == DIGITS
    assert meta.input_shape == [1, 28, 28]
    assert meta.aux_task == "reconstruction"
    assert meta.training.model_extra["seed"] == 7
    assert meta.metrics["clean_accuracy"] == 0.91
    assert meta.calibration.suspicious_threshold == 0.05
    assert loaded.purifier == get_spec("mnist-fcn-dr").purifier
    assert meta.weights_sha256 == _sha256(ckpt / "model.safetensors")
    assert loaded.path == ckpt
    # Either file of the folder names the checkpoint too.
    assert load_checkpoint(ckpt / "model.json").meta == meta
    assert read_meta(ckpt / "model.safetensors") == meta


def test_round_trip_keeps_batchnorm_statistics_and_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("cifar10-resnet18-rp", num_classes=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    meta = _meta(model, network="cifar10-resnet18-rp", dataset="cifar10", classes=["a", "b", "c"])
    loaded = load_checkpoint(save_checkpoint(model, meta, tmp_path / "rp"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model(x))
        assert torch.equal(loaded.network.auxiliary(loaded.network.encode(x)), model.auxiliary(model.encode(x)))
    assert loaded.network.num_classes == 3
    assert loaded.meta.normalization.mean == pytest.approx([0.4914, 0.4822, 0.4465])


def test_an_untrained_auxiliary_head_is_not_saved_and_loads_as_zeros(tmp_path: Path) -> None:
    model = _fcn().eval()
    baseline = save_checkpoint(model, _meta(model).model_copy(update={"aux_head_trained": False}), tmp_path / "b")
    trained = save_checkpoint(model, _meta(model), tmp_path / "t")
    assert not any(k.startswith("aux_head.") for k in _tensors(baseline))
    assert any(k.startswith("aux_head.") for k in _tensors(trained))
    assert (baseline / "model.safetensors").stat().st_size < (trained / "model.safetensors").stat().st_size
    loaded = load_checkpoint(baseline)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model(x))  # the classifier is whole
    assert all(not v.any() for k, v in loaded.network.state_dict().items() if k.startswith("aux_head."))


def test_a_trained_auxiliary_head_may_not_be_missing(ckpt: Path) -> None:
    _rewrite_weights(ckpt, {k: v for k, v in _tensors(ckpt).items() if not k.startswith("aux_head.")})
    with pytest.raises(CheckpointError, match=r"missing tensors \['aux_head"):
        load_checkpoint(ckpt)


# ----------------------------------------------------------------------------- failures, each named


def test_missing_tensor(ckpt: Path) -> None:
    tensors = _tensors(ckpt)
    del tensors["classifier.bias"]
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \['classifier.bias'\]"):
        load_checkpoint(ckpt)


def test_extra_tensor(ckpt: Path) -> None:
    tensors = _tensors(ckpt)
    tensors["aux_head.9.weight"] = torch.zeros(3)
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['aux_head.9.weight'\]"):
        load_checkpoint(ckpt)


def test_shape_mismatch(ckpt: Path) -> None:
    tensors = _tensors(ckpt)
    tensors["encoder.1.weight"] = torch.zeros(256, 700)
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(
        CheckpointError, match=r"wrong shape: encoder.1.weight: file \(256, 700\) vs network \(256, 784\)"
    ):
        load_checkpoint(ckpt)


def test_unknown_network(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(network="mnist-transformer"))
    with pytest.raises(CheckpointError, match="unknown network 'mnist-transformer'"):
        load_checkpoint(ckpt)


def test_truncated_weights(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    _rewrite_weights(ckpt, raw=data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


def test_truncated_weights_without_hash_check(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt, verify_hash=False)


def test_garbage_weights(ckpt: Path) -> None:
    _rewrite_weights(ckpt, raw=os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


def test_weights_changed_after_saving(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # still a well-formed safetensors file; one weight differs in its last bits
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)
    # Without the hash check the (valid) file loads: the sha256 is what caught it.
    assert load_checkpoint(ckpt, verify_hash=False).network is not None


def test_invalid_json(ckpt: Path) -> None:
    (ckpt / "model.json").write_text('{"network": "mnist-fcn-dr", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_metadata_schema_errors_name_the_field(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: (m.pop("dataset"), m.update(surprise=1)))
    with pytest.raises(CheckpointError, match="invalid metadata") as err:
        load_checkpoint(ckpt)
    assert "dataset" in str(err.value)
    assert "surprise" in str(err.value)


def test_newer_format_version(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(ckpt)


def test_class_names_do_not_match_the_classifier(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(class_names=["a", "b", "c", "d", "e"]))
    with pytest.raises(CheckpointError, match="5 class names but the classifier .* has 10 outputs"):
        load_checkpoint(ckpt)


def test_normalisation_does_not_match_the_weights(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(normalization={"mean": [0.1307], "std": [0.3081]}))
    with pytest.raises(CheckpointError, match="normalisation"):
        load_checkpoint(ckpt)


def test_input_shape_does_not_match_the_weights(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(input_shape=[1, 32, 32]))
    with pytest.raises(CheckpointError, match="wrong shape: encoder.1.weight"):
        load_checkpoint(ckpt)


def test_aux_task_does_not_match_the_network(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(aux_task="rotation"))
    with pytest.raises(CheckpointError, match="task 'rotation'"):
        load_checkpoint(ckpt)


def test_saved_files_are_readable_by_every_user(ckpt: Path) -> None:
    """0644 whoever saves (safetensors alone writes 0600): a container's user must read a mounted checkpoint."""
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in ckpt.iterdir()} == {
        "model.safetensors": "0o644",
        "model.json": "0o644",
    }


def test_unreadable_file_names_the_file_and_the_fix(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    if os.geteuid() == 0:
        pytest.skip("root reads any file; tests/test_service_server.py checks this without the capability")
    weights.chmod(0o000)
    with pytest.raises(CheckpointError, match=r"cannot read .*model.safetensors: Permission denied .*chmod a\+r"):
        load_checkpoint(ckpt)


def test_missing_files(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    (ckpt / "model.json").unlink()
    with pytest.raises(CheckpointError, match="has no model.json"):
        load_checkpoint(ckpt)


class _Exploit:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_loading_never_unpickles(ckpt: Path, tmp_path: Path, monkeypatch, kind: str) -> None:
    marker = tmp_path / "code-ran"
    weights = ckpt / "model.safetensors"
    if kind == "pickle":
        payload = pickle.dumps({"classifier.weight": _Exploit(marker)})
        _rewrite_weights(ckpt, raw=payload)
    else:
        state = _tensors(ckpt)
        state["exploit"] = _Exploit(marker)
        torch.save(state, weights)  # a torch pickle (zip) renamed to model.safetensors
        _rewrite_weights(ckpt, raw=weights.read_bytes())

    def forbidden(*args, **kwargs):
        raise AssertionError("load_checkpoint unpickled something")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)
    assert not marker.exists()


# ----------------------------------------------------------------------------- whether the auxiliary head was trained

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"


@pytest.mark.parametrize(
    ("name", "trained"),
    [
        ("mnist-fcn-dr", True),
        ("mnist-cnn-dr", True),
        ("mnist-fcn-dr-consistency", True),
        ("cifar10-resnet18-lc", True),
        ("cifar10-resnet18-rp", True),
        ("cifar10-resnet18-lc-official", True),
        ("mnist-fcn-dr-vanilla", False),
        ("mnist-fcn-dr-fgsm-at", False),
        ("mnist-fcn-dr-pgd-at", False),
        ("mnist-cnn-dr-pgd-at", False),
    ],
)
def test_shipped_metadata_says_whether_the_auxiliary_head_was_trained(name: str, trained: bool) -> None:
    raw = json.loads((ZOO / name / "model.json").read_text())
    assert raw["aux_head_trained"] is trained  # stated in the file, not inferred
    assert read_meta(ZOO / name).aux_head_trained is trained


@pytest.mark.parametrize(
    ("training", "inferred"),
    [({"recipe": "soap"}, True), ({"recipe": "pgd-at"}, False), ({"recipe": "vanilla"}, False), ({}, False)],
)
def test_metadata_without_the_field_reads_it_from_the_training_recipe(ckpt: Path, training, inferred: bool) -> None:
    _edit_meta(ckpt, lambda m: (m.pop("aux_head_trained"), m.update(training=training)))
    assert load_checkpoint(ckpt).meta.aux_head_trained is inferred


def test_the_field_round_trips_and_overrides_the_recipe(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(aux_head_trained=False, training={"recipe": "soap"}))
    assert read_meta(ckpt).aux_head_trained is False


@pytest.mark.parametrize("name", sorted(p.name for p in ZOO.iterdir() if (p / "model.json").is_file()))
def test_shipped_training_records_read_as_typed_records_and_write_back_unchanged(name: str) -> None:
    """The training record's recipe is a closed enum; the shipped model.json files (written before it) still read,
    and everything but the prose of a pre-enum import writes back as it was."""
    raw = json.loads((ZOO / name / "model.json").read_text())["training"]
    record = read_meta(ZOO / name).training
    assert isinstance(record.recipe, Recipe)
    if raw["recipe"].startswith("imported:"):
        assert record.recipe is Recipe.IMPORTED
        assert record.provenance == raw["recipe"]  # "imported: authors' released checkpoint (...)", as before
        raw = {**raw, "recipe": "imported", "origin": record.origin}
    assert record.model_dump(mode="json") == raw


def test_a_recipe_outside_the_closed_set_is_refused(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m.update(training={"recipe": "trained somehow"}))
    with pytest.raises(CheckpointError, match="recipe"):
        load_checkpoint(ckpt)


def test_training_record_round_trips_recipe_and_run_details(tmp_path: Path) -> None:
    meta = meta_for(_fcn(), "mnist-fcn-dr", "mnist", DIGITS, training={"recipe": "pgd-at", "epochs": 3})
    save_checkpoint(_fcn(), meta, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"] == {"recipe": "pgd-at", "epochs": 3}
    record = read_meta(tmp_path / "m").training
    assert record.recipe is Recipe.PGD_AT
    assert record.model_extra == {"epochs": 3}
