"""Model registry: one place that maps a network name to its architecture and defaults.

Modelled on timm: `@register_model` adds a builder, `create_model(name)` builds it, and code that builds or loads a
network reads its `ModelSpec`. Two places still read a network's name, to reproduce the paper rather than to build
anything: training/presets.py picks the paper's MNIST schedule for the CNN and derives baseline preset names from the
backbone's, and training/results_page.py maps a network to its row of the paper's tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .ensemble import ensemble_builder
from .networks import SoapNetwork, cnn_dr, fcn_dr, lenet_dr, resnet18_thin, wrn28_10
from .purifier import PurifierConfig

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
MNIST_MEAN, MNIST_STD = (0.0,), (1.0,)

MNIST_PURIFIER = PurifierConfig(step_size=0.1, steps=5, budget_step=0.05, num_budgets=11)
ENSEMBLE_SIZES = (2, 3, 4, 5)  # `mnist-lenet-dr-x<k>`: k LeNet-DR members as one network (models/ensemble.py)
CIFAR_PURIFIER = PurifierConfig(step_size=4 / 255, steps=5, budget_step=4 / 255, num_budgets=11)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a network and the defaults that go with it."""

    name: str
    builder: Callable[..., SoapNetwork]
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aux_task: str
    purifier: PurifierConfig
    builder_kwargs: dict[str, object] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; known networks: {', '.join(list_models())}") from None


def create_model(
    name: str,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> SoapNetwork:
    """Build network `name` with random weights; any default of its spec can be overridden."""
    spec = get_spec(name)
    shape = tuple(input_shape or spec.input_shape)
    channels = shape[0]
    if mean is None:
        mean = spec.mean if len(spec.mean) == channels else (0.0,) * channels
    if std is None:
        std = spec.std if len(spec.std) == channels else (1.0,) * channels
    return spec.builder(
        num_classes=num_classes or spec.num_classes, input_shape=shape, mean=mean, std=std, **spec.builder_kwargs
    )


def _register_defaults() -> None:
    builders: tuple[tuple[str, Callable[..., SoapNetwork]], ...] = (
        ("fcn-dr", fcn_dr),
        ("cnn-dr", cnn_dr),
        ("lenet-dr", lenet_dr),
        *((f"lenet-dr-x{k}", ensemble_builder(lenet_dr, k)) for k in ENSEMBLE_SIZES),
    )
    for arch, builder in builders:
        register_model(
            ModelSpec(
                f"mnist-{arch}",
                builder,
                "mnist",
                10,
                (1, 28, 28),
                MNIST_MEAN,
                MNIST_STD,
                "reconstruction",
                MNIST_PURIFIER,
            )
        )
    for dataset, classes, mean, std in (
        ("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD),
        ("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD),
    ):
        builders = (("resnet18", resnet18_thin), ("wrn28", wrn28_10))
        for arch, builder in builders:
            for suffix, task in (("rp", "rotation"), ("lc", "label_consistency")):
                register_model(
                    ModelSpec(
                        f"{dataset}-{arch}-{suffix}",
                        builder,
                        dataset,
                        classes,
                        (3, 32, 32),
                        mean,
                        std,
                        task,
                        CIFAR_PURIFIER,
                        {"aux_task": task},
                    )
                )


_register_defaults()
