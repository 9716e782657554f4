"""Import the authors' checkpoints (GitHub Mishne-Lab/SOAP) into our format.

Their files are legacy torch pickles holding a bare state dict of the thin CIFAR ResNet with keys
`conv1.*`, `bn1.*`, `layer{1,2,3}.*` and `linear.*`, and no normaliser. `torch.load(weights_only=True)`
reads them without executing code; we rename the keys and add the CIFAR normalisation buffers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict
from .networks import SoapNetwork
from .registry import create_model


def convert_reference_state_dict(state: dict[str, torch.Tensor], network: str = "cifar10-resnet18-lc") -> SoapNetwork:
    """Our network holding the reference weights: `linear.*` becomes the classifier, the rest the encoder."""
    model = create_model(network)
    renamed = {
        (f"classifier.{k[len('linear.') :]}" if k.startswith("linear.") else f"encoder.{k}"): v
        for k, v in state.items()
    }
    renamed["mean"], renamed["std"] = model.mean.clone(), model.std.clone()
    check_state_dict(model, renamed, "reference state dict")
    model.load_state_dict(renamed)
    return model.eval()


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference checkpoint safely (no arbitrary unpickling)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path} is not a readable reference checkpoint: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
