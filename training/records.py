"""The typed record of an evaluation: what `python -m training evaluate` writes as results.json and what the report,
the results page, the model cards, model_info, the sanity checks and the figures read back.

One definition of each part, so that a writer and its readers cannot drift apart: the evaluation builds these records,
their serialisation is the results.json format (the same keys and values as the files under docs/results/), and every
reader validates a stored file through them, so a file that lost a key or changed a type is rejected with the file's
and the field's names instead of failing later on a missing string key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

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

from models import PurifierConfig, Recipe
from models.smoothing import SmoothingConfig

from .attacks.registry import AttackKind, Norm
from .rows import Row
from .stats import Accuracy, wilson_interval

RESULTS_FILE = "results.json"
CERTIFY_FILE = "certify.json"
# adaptive attacks only; every attack but the controls; every L∞ attack but the controls (the threat model of L∞
# adversarial training, so a SOAP network and a PGD-AT one compare on the same budget)
WorstCaseGroup = Literal["adaptive", "all", "linf"]


def pack_images(correct: torch.Tensor) -> str:
    """Which images (in evaluation order) a row got right, as hex: bit i of the packed bytes, most significant bit
    first (numpy.packbits' order), is image i. 250 characters for 1,000 images, so that results.json keeps the
    per-image outcome that a worst case over several evaluations of the same images needs."""
    bits = correct.detach().to("cpu", torch.uint8).flatten()
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
    return bytes((bits.int() * weights).sum(1).tolist()).hex()


def unpack_images(packed: str, n: int) -> torch.Tensor:
    """The inverse of `pack_images`: a bool tensor of the first n images."""
    data = torch.tensor(list(bytes.fromhex(packed)), dtype=torch.int32)
    if n > 8 * len(data):
        raise ValueError(f"{len(packed)} hex digits hold {4 * len(packed)} images, not {n}")
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    return ((data[:, None] >> shifts) & 1).flatten()[:n].bool()


class Record(BaseModel):
    """A part of results.json. Unknown keys are errors (a misspelt key would otherwise be dropped in silence); the
    fields named in `omitted_when_none` are left out of the JSON when None, as the evaluation has always written
    them (absent, not null), so that stored files load and dump back unchanged."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.omitted_when_none}

    def to_json(self) -> str:
        """The stored file's text (results.json, certify.json, soundness-<base>.json): indented JSON, ASCII only."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"


class PurifierRecord(Record):
    """The purifier the min-aux row ran with (models.PurifierConfig) and its budget grid."""

    step_size: float
    steps: int
    budget_step: float
    num_budgets: int
    budgets: list[float]

    @classmethod
    def of(cls, config: PurifierConfig) -> PurifierRecord:
        return cls(
            step_size=config.step_size,
            steps=config.steps,
            budget_step=config.budget_step,
            num_budgets=config.num_budgets,
            budgets=config.budgets(),
        )


class SettingsRecord(Record):
    """The attack settings of the run (training.attacks.AttackSettings as it was then). The fields that readers use
    are typed; the others are kept as recorded, since AttackSettings has gained fields since older results."""

    model_config = ConfigDict(extra="allow")

    linf_eps: float
    pgd_step: float
    pgd_steps: int
    l2_eps: float


class DetectorRates(Record):
    """How often the service's `suspicious` flag fires, and how often an image is misclassified (min-aux) without
    being flagged: what fools a user who acts on the flag."""

    flagged: Accuracy
    fooled_unflagged: Accuracy


class Detector(Record):
    """The calibrated flag (aux loss before purification above a clean quantile) and its rates on clean images."""

    threshold: float
    quantile: str  # the calibration's key, e.g. "0.99"
    calibration_images: int
    clean: DetectorRates


class AttackColumn(Record):
    """One attack's column of the table: what it is, what it cost, how large its perturbations were, and each row's
    accuracy (success rates against the same images clean)."""

    omitted_when_none = frozenset({"resumed_batches", "detector", "correct_images"})

    kind: AttackKind
    norm: Norm
    budget: float
    description: str
    n: int  # images attacked: fewer than the evaluation's n for adaptive attacks under --adaptive-n
    seconds_per_image: float
    max_linf: float
    max_l2: float
    out_of_range_images: int
    rows: dict[Row, Accuracy]
    resumed_batches: int | None = None  # absent from results written before evaluations could resume
    detector: DetectorRates | None = None  # SOAP checkpoints with a calibrated flag only
    # per row, which of the n images it got right under this attack (pack_images); absent from older results
    correct_images: dict[Row, str] | None = None


class WorstCase(Record):
    """Per image, correct only if it survived every attack of the group (and was correct clean). Stored flat, as
    {row: Accuracy, ..., "attacks": [names]}; held here as the rows and the attacks apart."""

    rows: dict[Row, Accuracy]
    attacks: list[str]

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rows" not in data:
            return {"rows": {k: v for k, v in data.items() if k != "attacks"}, "attacks": data.get("attacks")}
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {**data["rows"], "attacks": data["attacks"]}


class BetaSweep(Record):
    """Paper Fig. 5: accuracy before and after purification under aux-aware PGD, for each β (SOAP checkpoints)."""

    n: int
    betas: list[float]
    none: list[float]
    min_aux: list[float] = Field(alias="min-aux")


class BudgetSweep(Record):
    """Accuracy as the attack budget grows (PGD on the bare network; BPDA on min-aux for SOAP checkpoints)."""

    n: int
    budgets: list[float]
    bare_pgd: list[float]
    bpda_min_aux: list[float]  # empty for baselines
    bare_settings: str
    bpda_settings: str


class IdentityCheck(Record):
    """An attack at ε = 0: the largest change it made, and whether every row's accuracy stayed as it was."""

    max_change: float
    unchanged_accuracy: bool


class EpsilonZero(Record):
    """FGSM and PGD at ε = 0 on the first n images (they must be the identity)."""

    n: int
    fgsm: IdentityCheck
    pgd: IdentityCheck


class SanityCheck(Record):
    """One sanity check of training.sanity: reported with its evidence whether it passed or not."""

    name: str
    passed: bool
    detail: str


class EvaluationResult(Record):
    """Everything one evaluation measured, and how: results.json."""

    omitted_when_none = frozenset({"detector", "epsilon_zero", "figures", "clean_images"})

    model: str  # the checkpoint folder as given
    network: str
    dataset: str
    recipe: Recipe  # "soap" for every purifying checkpoint (imported ones too); else the baseline's recipe
    provenance: str
    aux_task: str
    purifier: PurifierRecord
    data: str  # the test data and how its images were chosen
    jpeg_caveat: bool
    n: int
    seed: int
    device: str
    rows: list[Row]
    settings: SettingsRecord
    command: str  # the command that reproduces it
    git_commit: str
    host: str
    clean: dict[Row, Accuracy]
    clean_images: dict[Row, str] | None = None  # per row, which images it got right clean (pack_images)
    purification_seconds_per_image: float | None  # None for baselines (no purification)
    attacks: dict[str, AttackColumn]  # in the order they ran
    detector: Detector | None = None  # absent unless the checkpoint has a calibrated flag
    worst_case: dict[WorstCaseGroup, WorstCase]
    beta_sweep: BetaSweep | None
    budget_sweep: BudgetSweep
    epsilon_zero: EpsilonZero | None = None  # absent from results written before the check existed
    sanity_checks: list[SanityCheck]
    wall_seconds: float
    figures: list[str] | None = None  # absent under --no-figures

    def accuracy(self, attack: str, row: Row) -> Accuracy | None:
        """One row's accuracy under one attack (None where that attack or row did not run)."""
        column = self.attacks.get(attack)
        return None if column is None else column.rows.get(row)

    def correct_images(self, attack: str | None, row: Row) -> torch.Tensor | None:
        """Which images `row` got right under `attack` (None: clean), as stored; None where not stored."""
        if attack is None:
            packed, n = (self.clean_images or {}).get(row), self.n
        else:
            column = self.attacks[attack]
            packed, n = (column.correct_images or {}).get(row), column.n
        return None if packed is None else unpack_images(packed, n)


class CertifiedBase(Record):
    """Randomized smoothing with one base classifier: certified accuracy at each radius, and each image's radius."""

    omitted_when_none = frozenset({"average_certified_radius"})

    base: str  # one of models.smoothing.BASE_CLASSIFIERS
    data: str
    n: int
    abstained: int
    certified_accuracy: dict[str, Accuracy]  # keyed by str(radius): JSON keys are strings
    seconds_per_image: float
    forward_passes_per_second: float
    radii: list[float | None]  # per image: its certified radius when correctly classified, else None
    # training.certify.average_certified_radius; absent from certify.json files written before it was recorded
    average_certified_radius: float | None = None


class CertifyResult(Record):
    """Everything one `evaluate --attacks certify` run measured, and how: certify.json."""

    model: str
    network: str
    dataset: str
    smoothing: SmoothingConfig
    sigma_source: str
    seed: int
    device: str
    threads: int  # per process
    processes: int = 1  # torchrun processes that shared the images
    git_commit: str
    command: str
    radii: list[float]
    bases: dict[str, CertifiedBase]


class SoundnessOutcome(Record):
    """PREDICT at the SmoothAdv images of one budget multiplier k (budget k·R, R each image's certified radius)."""

    multiplier: float
    attacked: int
    changed: int  # a different class, significant at level α
    abstained: int
    mean_l2: float
    max_l2_over_radius: float
    success_rate: float
    ci95: tuple[float, float]  # Wilson interval of changed / attacked

    @classmethod
    def of(
        cls, multiplier: float, attacked: int, changed: int, abstained: int, mean_l2: float, max_l2_over_radius: float
    ) -> SoundnessOutcome:
        return cls(
            multiplier=multiplier,
            attacked=attacked,
            changed=changed,
            abstained=abstained,
            mean_l2=mean_l2,
            max_l2_over_radius=max_l2_over_radius,
            success_rate=changed / attacked if attacked else 0.0,
            ci95=wilson_interval(changed, attacked),
        )


class SoundnessSmoothing(Record):
    """The smoothing the attacked certificates were made with (from the certification log)."""

    sigma: float
    n0: int
    n: int
    alpha: float
    clamp: bool


class SmoothAdvSettings(Record):
    steps: int
    samples: int  # noise samples per attack step
    step_size: str  # the rule, e.g. "2.5·ε/steps"
    seed: int


class PredictSettings(Record):
    n: int
    alpha: float


class SoundnessResult(Record):
    """One `python -m training soundness` run: soundness-<base>.json. `passed`: no prediction changed with k ≤ 1."""

    certified_log: str
    model: str
    base: str
    data: str
    smoothing: SoundnessSmoothing
    attack: SmoothAdvSettings
    predict: PredictSettings
    images: int
    outcomes: list[SoundnessOutcome]
    passed: bool
    command: str
    git_commit: str
    threads: int
    device: str
    wall_seconds: float


class StoredResultError(ValueError):
    """A stored result file that does not validate: says which file, and which fields are wrong."""


R = TypeVar("R", bound=BaseModel)


def _load(record: type[R], path: Path) -> R:
    try:
        return record.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise StoredResultError(f"{path} is not a valid {record.__name__}: {exc}") from exc


def load_evaluation(path: Path) -> EvaluationResult:
    """A stored results.json, validated."""
    return _load(EvaluationResult, path)


def load_certification(path: Path) -> CertifyResult:
    """A stored certify.json, validated."""
    return _load(CertifyResult, path)


def load_soundness(path: Path) -> SoundnessResult:
    """A stored soundness-<base>.json, validated."""
    return _load(SoundnessResult, path)
