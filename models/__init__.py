"""SOAP core: networks, self-supervised tasks, the purifier and the checkpoint format.

This package must not import `training` or `service`.
"""

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it from here)

from .acceleration import Acceleration, AuxLossFn, Precision, aux_loss_fn
from .checkpoint import (
    CheckpointError,
    CheckpointMeta,
    LoadedModel,
    Recipe,
    TrainingRecord,
    load_checkpoint,
    save_checkpoint,
)
from .device import resolve_device
from .networks import SoapNetwork
from .purifier import Mode, PurifierConfig, PurifyResult, oracle_select, purify, purify_naive
from .registry import ModelSpec, create_model, get_spec, list_models, register_model
from .tasks import aux_loss, training_losses

__all__ = [
    "__version__",
    "Acceleration",
    "AuxLossFn",
    "Precision",
    "aux_loss_fn",
    "CheckpointError",
    "CheckpointMeta",
    "LoadedModel",
    "Recipe",
    "TrainingRecord",
    "load_checkpoint",
    "save_checkpoint",
    "resolve_device",
    "SoapNetwork",
    "Mode",
    "PurifierConfig",
    "PurifyResult",
    "oracle_select",
    "purify",
    "purify_naive",
    "ModelSpec",
    "create_model",
    "get_spec",
    "list_models",
    "register_model",
    "aux_loss",
    "training_losses",
]
