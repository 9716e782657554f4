"""Checkpoint format: a folder with `model.safetensors` (weights) and `model.json` (metadata).

Loading never unpickles anything: weights are safetensors, metadata is JSON validated by pydantic.
Every way a checkpoint can be wrong raises `CheckpointError` with a message naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .networks import SoapNetwork
from .purifier import PurifierConfig
from .registry import create_model, get_spec
from .tasks import TRAINING_NOISE_STD

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or inconsistent with its metadata."""


class Normalization(BaseModel):
    mean: list[float]
    std: list[float]


class PurifierSettings(BaseModel):
    step_size: float = Field(gt=0)
    steps: int = Field(ge=1)
    budget_step: float = Field(ge=0)
    num_budgets: int = Field(ge=1)

    def config(self) -> PurifierConfig:
        return PurifierConfig(**self.model_dump())

    @classmethod
    def of(cls, config: PurifierConfig) -> PurifierSettings:
        return cls(
            step_size=config.step_size,
            steps=config.steps,
            budget_step=config.budget_step,
            num_budgets=config.num_budgets,
        )


class Calibration(BaseModel):
    """Test-time auxiliary loss on clean held-out images: quantiles (keys like "0.99") and the mean per budget."""

    n: int
    aux_loss_quantiles: dict[str, float]
    mean_aux_loss_per_budget: list[float] = []
    suspicious_quantile: str = "0.99"

    @property
    def suspicious_threshold(self) -> float:
        return self.aux_loss_quantiles[self.suspicious_quantile]


class Recipe(StrEnum):
    """How a checkpoint's weights came about (a closed set)."""

    SOAP = "soap"  # joint training with the auxiliary loss (paper Eq. 2): the only recipe that trains it
    VANILLA = "vanilla"  # the baselines train L_cls alone (training/baselines.py)
    FGSM_AT = "fgsm-at"
    PGD_AT = "pgd-at"
    IMPORTED = "imported"  # converted from another codebase's release; `origin` says whose


_AUX_RECIPE = Recipe.SOAP
_IMPORTED_PROSE = "imported:"  # how records before Recipe wrote an import: "imported: <origin>"


class TrainingRecord(BaseModel):
    """A checkpoint's training record. What other modules read is typed; the run's details as the training command
    recorded them (preset, schedule, config, hardware, durations, data, ...) stay as extra fields, for the model card.
    Records that predate the enum (an import's recipe written as prose) read as `imported` with that `origin`."""

    model_config = ConfigDict(extra="allow")

    recipe: Recipe | None = None  # None: not recorded (hand-written or test metadata)
    command: str | None = None  # the command that reproduces the weights
    git_commit: str | None = None  # training.provenance.git_commit
    origin: str | None = None  # imported weights: whose release, which version

    @model_validator(mode="before")
    @classmethod
    def _legacy_imported_prose(cls, data: Any) -> Any:
        recipe = data.get("recipe") if isinstance(data, dict) else None
        if isinstance(recipe, str) and recipe.startswith(_IMPORTED_PROSE):
            data = {**data, "recipe": Recipe.IMPORTED, "origin": recipe.removeprefix(_IMPORTED_PROSE).strip()}
        return data

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields that are None are left out of model.json, as before the record was typed."""
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def provenance(self) -> str:
        """One line: the recipe, and for imports whose weights (the prose records before the enum carried)."""
        return str(self.recipe or Recipe.SOAP) + (f": {self.origin}" if self.origin else "")


class CheckpointMeta(BaseModel):
    """A checkpoint's metadata (`model.json`).

    `aux_head_trained` says whether training minimised the auxiliary loss (for reconstruction and rotation the
    head h; for label consistency the classifier's agreement across views). Purification descends that loss, so on a
    network where it was never trained it moves images along noise: the service refuses purification for such a
    model. Metadata written before the field existed is read with the value its training record implies: true only
    when `training.recipe` is "soap", false otherwise (baselines, imports, no record) — a checkpoint is never
    purified without evidence that its auxiliary task was learnt.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    network: str
    dataset: str
    class_names: list[str]
    input_shape: list[int] = Field(min_length=3, max_length=3)
    normalization: Normalization
    aux_task: str
    aux_head_trained: bool = Field(description="training minimised the auxiliary loss, so purification is meaningful")
    purifier: PurifierSettings
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    metrics: dict[str, float] = {}
    calibration: Calibration | None = None
    noise_std: float | None = Field(default=None, gt=0)  # σ of the training input noise (smoothing's default σ)
    # The training noise was clamped to [0, 1] (SOAP's DR recipe); smoothing adds its noise the same way by default.
    noise_clamp: bool = True
    weights_sha256: str = ""

    @model_validator(mode="before")
    @classmethod
    def _legacy_aux_head_trained(cls, data: Any) -> Any:
        """Metadata from before `aux_head_trained`: infer it from the training record (see the class docstring)."""
        if isinstance(data, dict) and "aux_head_trained" not in data:
            training = data.get("training")
            recipe = training.get("recipe") if isinstance(training, dict) else getattr(training, "recipe", None)
            data = {**data, "aux_head_trained": str(getattr(recipe, "value", recipe)) == _AUX_RECIPE}
        return data

    @property
    def training_noise_std(self) -> float | None:
        """σ of the training input noise: the recorded value, else (metadata written before it was recorded) the
        task's default when the SOAP recipe trained it, else None (a baseline: no noise known)."""
        if self.noise_std is not None:
            return self.noise_std
        return TRAINING_NOISE_STD[self.aux_task] if self.aux_head_trained else None


@dataclass
class LoadedModel:
    """A network in eval mode with its metadata and where it came from."""

    network: SoapNetwork
    meta: CheckpointMeta
    path: Path

    @property
    def purifier(self) -> PurifierConfig:
        return self.meta.purifier.config()


def meta_for(model: SoapNetwork, network: str, dataset: str, class_names: list[str], **fields: Any) -> CheckpointMeta:
    """Metadata describing `model` (built from registry entry `network`); purifier defaults from the registry."""
    fields.setdefault("purifier", PurifierSettings.of(get_spec(network).purifier))
    return CheckpointMeta(
        network=network,
        dataset=dataset,
        class_names=class_names,
        input_shape=list(model.input_shape),
        normalization=Normalization(mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist()),
        aux_task=model.aux_task,
        **fields,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


AUX_HEAD_PREFIX = "aux_head."
CHECKPOINT_FILE_MODE = 0o644  # readable by the user a container runs as, whoever wrote the files


def save_checkpoint(model: SoapNetwork, meta: CheckpointMeta, directory: str | Path) -> Path:
    """Write weights and metadata (with the weights' sha256) into `directory`; returns it.

    A head that training never used (`aux_head_trained` false: a baseline) is not written: it holds its random
    initialisation, nothing reads it (purification is refused without a trained head), and on the MNIST CNN it
    is half the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if meta.aux_head_trained or not k.startswith(AUX_HEAD_PREFIX)
    }
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "network": meta.network})
    # safetensors writes 0600: a checkpoint mounted read-only into a container that runs as another user (uid
    # 10001 in docker/Dockerfile) could not be read. Weights are not secrets; the folder's mode guards access.
    tmp.chmod(CHECKPOINT_FILE_MODE)
    tmp.replace(weights)
    meta = meta.model_copy(update={"weights_sha256": _sha256(weights)})
    (directory / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    (directory / META_FILE).chmod(CHECKPOINT_FILE_MODE)
    return directory


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, META_FILE):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a folder holding {WEIGHTS_FILE} and {META_FILE}")
    for name in (WEIGHTS_FILE, META_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
        try:
            (path / name).open("rb").close()
        except OSError as exc:
            raise CheckpointError(
                f"cannot read {path / name}: {exc.strerror} (this process runs as uid {os.getuid()}; "
                "make the checkpoint's files readable, e.g. chmod a+r)"
            ) from None
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    """Parse and validate a checkpoint's metadata without touching the weights."""
    directory = _resolve(path)
    try:
        raw = json.loads((directory / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / META_FILE} is not valid JSON: {exc}") from None
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{directory / META_FILE} has invalid metadata: {problems}") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has format version {meta.format_version}; this build reads {FORMAT_VERSION}"
        )
    return meta


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None


def build_network(meta: CheckpointMeta) -> SoapNetwork:
    """A randomly initialised network shaped as the metadata describes."""
    try:
        spec = get_spec(meta.network)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    if meta.aux_task != spec.aux_task:
        raise CheckpointError(
            f"metadata says task {meta.aux_task!r} but network {meta.network!r} uses {spec.aux_task!r}"
        )
    try:
        return create_model(
            meta.network,
            num_classes=len(meta.class_names),
            input_shape=tuple(meta.input_shape),
            mean=tuple(meta.normalization.mean),
            std=tuple(meta.normalization.std),
        )
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot build {meta.network!r} from its metadata: {exc}") from None


def check_state_dict(network: SoapNetwork, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing or unexpected tensors and shape mismatches."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise CheckpointError(f"{source} does not match the network: {'; '.join(parts)}")
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if tensors[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{source} has tensors of the wrong shape: {'; '.join(wrong[:8])}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify_hash: bool = True) -> LoadedModel:
    """Load a checkpoint folder (or the path of either of its files) onto `device`, in eval mode."""
    directory = _resolve(path)
    meta = read_meta(directory)
    weights = directory / WEIGHTS_FILE
    if verify_hash and meta.weights_sha256 and _sha256(weights) != meta.weights_sha256:
        raise CheckpointError(
            f"{weights} does not match the sha256 recorded in {META_FILE}: the weights were changed or damaged"
        )
    tensors = _read_tensors(weights)
    classifier = tensors.get("classifier.weight")
    if classifier is not None and classifier.ndim == 2 and classifier.shape[0] != len(meta.class_names):
        raise CheckpointError(
            f"{META_FILE} lists {len(meta.class_names)} class names but the classifier in {weights} has "
            f"{classifier.shape[0]} outputs"
        )
    network = build_network(meta)
    if not meta.aux_head_trained and not any(k.startswith(AUX_HEAD_PREFIX) for k in tensors):
        # an untrained head is not saved (save_checkpoint): zeros, so that it is the same on every load
        tensors |= {k: torch.zeros_like(v) for k, v in network.state_dict().items() if k.startswith(AUX_HEAD_PREFIX)}
    check_state_dict(network, tensors, str(weights))
    saved_mean, saved_std = tensors["mean"].flatten().tolist(), tensors["std"].flatten().tolist()
    if not (_close(saved_mean, meta.normalization.mean) and _close(saved_std, meta.normalization.std)):
        raise CheckpointError(f"normalisation in {META_FILE} {meta.normalization} differs from the weights' buffers")
    network.load_state_dict(tensors)
    network.requires_grad_(False)
    return LoadedModel(network.to(device).eval(), meta, directory)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 for x, y in zip(a, b, strict=True))
