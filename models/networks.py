"""The SOAP networks (soap-reference §1): encoder f, classifier g, auxiliary head h.

Every network takes pixels in [0, 1]; per-channel normalisation is a saved buffer applied inside
`encode`. Forward passes only return values and never store state on the module, so one model can
serve concurrent batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

AUX_TASKS = ("reconstruction", "rotation", "label_consistency")


class SoapNetwork(nn.Module):
    """Base class: `encoder` (f), `classifier` (g), optional `aux_head` (h), `mean`/`std` buffers.

    `forward(x)` returns logits so that the network plugs into any attack library unchanged.
    """

    mean: torch.Tensor  # [1, C, 1, 1] buffers, saved with the weights
    std: torch.Tensor

    def __init__(
        self,
        encoder: nn.Module,
        classifier: nn.Linear,
        aux_head: nn.Module | None,
        aux_task: str,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if aux_task not in AUX_TASKS:
            raise ValueError(f"unknown auxiliary task {aux_task!r}; expected one of {AUX_TASKS}")
        channels = input_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"normalisation needs {channels} values per statistic, got {len(mean)}/{len(std)}")
        self.encoder = encoder
        self.classifier = classifier
        self.aux_head = aux_head
        self.aux_task = aux_task
        self.input_shape = tuple(int(s) for s in input_shape)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f: pixels in [0, 1] -> representation z."""
        return self.encoder((x - self.mean) / self.std)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """g: representation -> logits."""
        return self.classifier(z)

    def auxiliary(self, z: torch.Tensor) -> torch.Tensor:
        """h: representation -> auxiliary output (reconstruction or rotation logits)."""
        if self.aux_head is None:
            raise RuntimeError(f"{type(self).__name__} with task {self.aux_task!r} has no auxiliary head")
        return self.aux_head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(x))


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def fcn_dr(num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> SoapNetwork:
    """MNIST FCN-DR: 784-256-128 encoder, linear classifier, 128-256-784 sigmoid decoder."""
    c, h, w = input_shape
    d = c * h * w
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, d), nn.Sigmoid(), _Reshape(c, h, w))
    return SoapNetwork(encoder, nn.Linear(128, num_classes), decoder, "reconstruction", input_shape, mean, std)


def cnn_dr(num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> SoapNetwork:
    """MNIST CNN-DR: two stride-2 convs + FC 1024 encoder, mirrored transposed-conv decoder."""
    c, h, w = input_shape
    if h % 4 or w % 4:
        raise ValueError(f"cnn-dr needs input sides divisible by 4, got {h}x{w}")
    h4, w4 = h // 4, w // 4
    flat = 64 * h4 * w4
    encoder = nn.Sequential(
        nn.Conv2d(c, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 1024),
        nn.ReLU(),
    )
    decoder = nn.Sequential(
        nn.Linear(1024, flat),
        nn.ReLU(),
        _Reshape(64, h4, w4),
        nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, c, 3, stride=2, padding=1, output_padding=1),
        nn.Sigmoid(),
    )
    return SoapNetwork(encoder, nn.Linear(1024, num_classes), decoder, "reconstruction", input_shape, mean, std)


def lenet_dr(num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> SoapNetwork:
    """MNIST LeNet-DR: the LeNet of the randomized-smoothing papers (Cohen et al. 2019; Jeong & Shin 2020; Jeong et al.
    2021: conv 20 and 50 channels of 5x5, each followed by 2x2 max-pooling, FC 500) as encoder f, its last layer as the
    classifier g, and an FCN-DR-style decoder 500-256-784 as the reconstruction head h. Comparing certified accuracy
    with those papers needs their network; the head adds denoised smoothing and SOAP's purification.

    Each pooling comes before its ReLU: max(relu(a), relu(b)) = relu(max(a, b)) exactly, so the function (and every
    certificate) is the papers', but the ReLU touches a quarter of the values (about a fifth off a forward pass on
    CPU, where certifying with n = 100,000 samples is forward passes and little else)."""
    c, h, w = input_shape
    if (h - 12) % 4 or (w - 12) % 4 or h < 16 or w < 16:
        raise ValueError(f"lenet-dr needs input sides of 16 + 4k pixels (28 for MNIST), got {h}x{w}")
    flat = 50 * ((h - 12) // 4) * ((w - 12) // 4)
    encoder = nn.Sequential(
        nn.Conv2d(c, 20, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(20, 50, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 500),
        nn.ReLU(),
    )
    decoder = nn.Sequential(nn.Linear(500, 256), nn.ReLU(), nn.Linear(256, c * h * w), nn.Sigmoid(), _Reshape(c, h, w))
    return SoapNetwork(encoder, nn.Linear(500, num_classes), decoder, "reconstruction", input_shape, mean, std)


class _BasicBlock(nn.Module):
    """Post-activation residual block of the thin CIFAR ResNet (convs with bias, as the reference)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ThinResNetEncoder(nn.Module):
    """3-stage CIFAR ResNet (16/32/64 channels, 2 blocks each) ending in global average pooling.

    Attribute names match the authors' state dict (`conv1`, `bn1`, `layer1..3`) so importing is a prefix.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(_BasicBlock(16, 32, 2), _BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(_BasicBlock(32, 64, 2), _BasicBlock(64, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class _WideBlock(nn.Module):
    """Pre-activation wide block with dropout between the convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNetEncoder(nn.Module):
    """Wide-ResNet-28-10 trunk: 3 stages x 4 wide blocks at 160/320/640 channels, final BN + ReLU, pooling."""

    def __init__(self, in_channels: int, depth: int = 28, widen: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _rotation_head(features: int) -> nn.Module:
    return nn.Linear(features, 4)


def resnet18_thin(
    num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], aux_task: str
) -> SoapNetwork:
    head = _rotation_head(64) if aux_task == "rotation" else None
    return SoapNetwork(
        ThinResNetEncoder(input_shape[0]), nn.Linear(64, num_classes), head, aux_task, input_shape, mean, std
    )


def wrn28_10(
    num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], aux_task: str
) -> SoapNetwork:
    head = _rotation_head(640) if aux_task == "rotation" else None
    return SoapNetwork(
        WideResNetEncoder(input_shape[0]), nn.Linear(640, num_classes), head, aux_task, input_shape, mean, std
    )
