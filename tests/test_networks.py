"""Networks and registry (soap-reference §1): parameter counts, shapes, normalisation, statelessness."""

from __future__ import annotations

import pytest
import torch

from models import create_model, get_spec, list_models
from models.registry import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from models.tasks import aux_loss

# soap-reference §1, C = 10 (the numbers).
PARAMETER_COUNTS = {
    "mnist-fcn-dr": 469_658,
    "mnist-cnn-dr": 6_474_507,
    # LeNet of the smoothing papers (431,080) + the 500-256-784 decoder (329,744)
    "mnist-lenet-dr": 760_824,
    "cifar10-resnet18-lc": 175_818,
    "cifar10-resnet18-rp": 176_078,
    "cifar10-wrn28-lc": 36_489_290,
    "cifar10-wrn28-rp": 36_491_854,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_network() -> None:
    names = set(list_models())
    assert set(PARAMETER_COUNTS) <= names
    assert {"cifar100-resnet18-rp", "cifar100-resnet18-lc", "cifar100-wrn28-rp", "cifar100-wrn28-lc"} <= names


def test_unknown_network_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown network 'resnet50'"):
        get_spec("resnet50")


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_reference(name: str) -> None:
    assert n_params(create_model(name)) == PARAMETER_COUNTS[name]


def test_lenet_dr_is_the_smoothing_papers_lenet_plus_a_decoder() -> None:
    """Encoder + classifier are jh-jeong/smoothing-consistency's LeNet layer for layer: conv 20 and 50 of 5x5, each
    with 2x2 max-pooling, FC 500, FC 10 (431,080 parameters); the head reconstructs a 28x28 image."""
    model = create_model("mnist-lenet-dr")
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.encoder) == 2
    assert n_params(model.encoder) + n_params(model.classifier) == 431_080
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.auxiliary(model.encode(x)).shape == (3, 1, 28, 28)


def test_lenet_dr_pools_before_its_relu_and_computes_the_papers_order_exactly() -> None:
    """The encoder pools before each ReLU (cheaper); the papers' LeNet applies ReLU first. Max and ReLU commute, so
    the logits and their gradients are bit for bit those of the papers' order on the same weights."""
    torch.manual_seed(0)
    model = create_model("mnist-lenet-dr")
    kinds = [type(m).__name__ for m in model.encoder]
    assert kinds[:6] == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    e = model.encoder
    papers = torch.nn.Sequential(e[0], e[2], e[1], e[3], e[5], e[4], *e[6:])  # conv, ReLU, pool, conv, ReLU, pool
    x = torch.randn(16, 1, 28, 28)  # pixels outside [0, 1] too: negative pre-activations in every window
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model.classify(model.encode(ours)), model.classify(papers(theirs))
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


def test_cifar100_classifier_is_the_only_difference() -> None:
    # 100 classes: the classifier grows by 90 rows (64 or 640 inputs + bias).
    assert n_params(create_model("cifar100-resnet18-lc")) == 175_818 + 90 * 65
    assert n_params(create_model("cifar100-resnet18-rp")) == 176_078 + 90 * 65


@pytest.mark.parametrize(
    ("name", "aux_task", "has_head"),
    [
        ("mnist-fcn-dr", "reconstruction", True),
        ("mnist-cnn-dr", "reconstruction", True),
        ("cifar10-resnet18-rp", "rotation", True),
        ("cifar10-resnet18-lc", "label_consistency", False),
        ("cifar10-wrn28-rp", "rotation", True),
        ("cifar10-wrn28-lc", "label_consistency", False),
    ],
)
def test_aux_task_and_head(name: str, aux_task: str, has_head: bool) -> None:
    spec = get_spec(name)
    model = create_model(name)
    assert spec.aux_task == model.aux_task == aux_task
    assert (model.aux_head is not None) == has_head
    if not has_head:
        with pytest.raises(RuntimeError, match="no auxiliary head"):
            model.auxiliary(torch.zeros(1, 64))


@pytest.mark.parametrize(
    ("name", "num_classes", "shape", "batch"),
    [
        ("mnist-fcn-dr", 10, (1, 28, 28), 3),
        ("mnist-fcn-dr", 3, (3, 32, 32), 2),
        ("mnist-cnn-dr", 10, (1, 28, 28), 3),
        ("mnist-cnn-dr", 7, (3, 32, 32), 2),
        ("cifar10-resnet18-lc", 10, (3, 32, 32), 3),
        ("cifar10-resnet18-rp", 100, (1, 28, 28), 2),
        ("cifar10-resnet18-lc", 2, (4, 24, 24), 2),
        ("cifar10-wrn28-rp", 5, (1, 8, 8), 1),
    ],
)
def test_forward_shapes(name: str, num_classes: int, shape: tuple[int, int, int], batch: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, input_shape=shape).eval()
    assert model.num_classes == num_classes
    assert model.input_shape == shape
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        logits = model(x)
        z = model.encode(x)
        assert logits.shape == (batch, num_classes)
        assert torch.allclose(model.classify(z), logits, atol=1e-6)
        if model.aux_task == "reconstruction":
            recon = model.auxiliary(z)
            assert recon.shape == x.shape
            assert recon.min() >= 0
            assert recon.max() <= 1  # sigmoid output, comparable with pixels
        elif model.aux_task == "rotation":
            assert model.auxiliary(z).shape == (batch, 4)
        assert aux_loss(model, x).shape == (batch,)


def test_cnn_rejects_sides_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("mnist-cnn-dr", input_shape=(1, 30, 30))


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("cifar10-resnet18-lc", CIFAR10_MEAN, CIFAR10_STD),
        ("cifar100-resnet18-rp", CIFAR100_MEAN, CIFAR100_STD),
        ("mnist-fcn-dr", (0.0,), (1.0,)),
    ],
)
def test_normalisation_is_a_saved_buffer(name: str, mean, std) -> None:
    model = create_model(name)
    state = model.state_dict()
    assert torch.allclose(state["mean"].flatten(), torch.tensor(mean))
    assert torch.allclose(state["std"].flatten(), torch.tensor(std))
    assert "mean" not in dict(model.named_parameters())  # a buffer, not trained


def test_normalisation_is_applied_inside_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("cifar10-resnet18-lc").eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.classifier(model.encoder((x - mean) / std))
        assert torch.allclose(model(x), expected, atol=1e-5)
        # Changing the buffer changes the output: the model really reads it.
        model.mean.fill_(0.0)
        assert not torch.allclose(model(x), expected, atol=1e-3)


def test_custom_normalisation_and_channel_defaults() -> None:
    model = create_model("cifar10-resnet18-lc", input_shape=(1, 32, 32))
    assert model.mean.flatten().tolist() == [0.0]
    assert model.std.flatten().tolist() == [1.0]
    model = create_model("cifar10-resnet18-lc", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert model.state_dict()["std"].flatten().tolist() == [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="normalisation"):
        create_model("cifar10-resnet18-lc", mean=(0.5,), std=(0.25,))


def _module_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Per submodule: its attribute names and the identity of every attribute value."""
    snapshot = {}
    for name, module in model.named_modules():
        attrs = {k: id(v) for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
        snapshot[name] = (
            attrs,
            {k: id(v) for k, v in module._parameters.items()},
            {k: id(v) for k, v in module._buffers.items()},
        )
    return snapshot


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mnist-fcn-dr", (1, 28, 28)),
        ("mnist-cnn-dr", (1, 28, 28)),
        ("cifar10-resnet18-rp", (3, 32, 32)),
        ("cifar10-resnet18-lc", (3, 32, 32)),
        ("cifar10-wrn28-rp", (3, 8, 8)),
    ],
)
def test_forward_stores_nothing_on_the_module(name: str, shape) -> None:
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape).eval()
    before = _module_state(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, *shape, requires_grad=True)
    logits = model(x)
    loss = aux_loss(model, x).sum() + logits.sum()
    loss.backward()
    assert _module_state(model) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed during an eval-mode forward"


def test_eval_forward_is_batch_independent() -> None:
    """BatchNorm in eval mode: an image's logits do not depend on its batch-mates."""
    torch.manual_seed(0)
    model = create_model("cifar10-resnet18-rp").eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)
