"""MODEL_CARD.md next to the weights, in the Hugging Face format: YAML front matter (licence, library, datasets,
tags, metrics and a model-index with the evaluation results) written through huggingface_hub's ModelCardData, then
intended use, evaluation, limitations (what purification resists and what it does not), how to reproduce, and the
source and licence of the weights.

The evaluation comes from the model's `results.json` (docs/results/<name>/, written by `python -m training
evaluate`); a card written at the end of training, before any evaluation, has the training metrics only. The
hand-written `## Notes` section of an existing card is kept when the card is regenerated:

    python -m training.model_card models/zoo/*          # rewrite every shipped card from model.json + results.json
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from models import CheckpointMeta, Recipe, load_checkpoint

from .records import (
    CERTIFY_FILE,
    RESULTS_FILE,
    AttackColumn,
    CertifyResult,
    EvaluationResult,
    WorstCase,
    load_certification,
    load_evaluation,
)
from .rows import Row
from .stats import Accuracy

CARD_FILE = "MODEL_CARD.md"
WEIGHTS_LICENSE_FILE = "LICENSE"  # next to imported weights: the licence they were released under
RESULTS_ROOT = Path("docs/results")
RESULTS_PAGE = "docs/results.md"
DATASETS = {"mnist": ("mnist", "MNIST"), "cifar10": ("cifar10", "CIFAR-10")}
NORMS = {"linf": "L∞", "l2": "L2"}
KINDS = {"control": "control", "blind": "purifier-blind", "adaptive": "adaptive"}
ROW_NAMES = {"none": "no purification", "min-aux": "min-aux purification"}
NOTES_HEADING = "## Notes"
WORST_ADAPTIVE = "worst-adaptive"


@dataclass(frozen=True)
class Evaluated:
    """A model's evaluation as its card reads it: its results.json and, if it was certified, certify/certify.json."""

    result: EvaluationResult
    certified: CertifyResult | None = None


@dataclass(frozen=True)
class Score:
    """One evaluated accuracy: an attack (or "clean") against one row (defence), with its interval."""

    attack: str
    kind: str
    threat: str
    row: Row
    n: int
    accuracy: float
    ci95: tuple[float, float]

    @classmethod
    def of(cls, attack: str, kind: str, threat: str, row: Row, acc: Accuracy) -> Score:
        return cls(attack, kind, threat, row, acc.n, acc.accuracy, acc.ci95)

    @property
    def config(self) -> str:
        """The model-index's metric `config`: attack/row, how a reader (or a test) finds one number."""
        return f"{self.attack}/{self.row}"

    def pct(self) -> str:
        lo, hi = self.ci95
        return f"{100 * self.accuracy:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def is_baseline(meta: CheckpointMeta) -> bool:
    """A network whose auxiliary task was never trained: purification is meaningless and the service refuses it."""
    return not meta.aux_head_trained


def _threat(attack: AttackColumn) -> str:
    value = f"{attack.budget * 255:.0f}/255" if attack.budget < 0.1 else f"{attack.budget:g}"
    return f"{NORMS[attack.norm]} ε = {value}"


def scores(results: EvaluationResult, baseline: bool) -> list[Score]:
    """The card's numbers from results.json: clean and every attack, for no purification and (SOAP models) min-aux.
    The oracle row (best budget chosen with the label) is not a deployable defence and stays in results.md."""
    candidates: tuple[Row, ...] = ("none",) if baseline else ("none", "min-aux")
    rows = [r for r in candidates if r in results.rows]
    out = [Score.of("clean", "clean", "", row, results.clean[row]) for row in rows]
    for name, attack in results.attacks.items():
        for row in rows:
            r = attack.rows.get(row)
            if r is not None:
                out.append(Score.of(name, KINDS[attack.kind], _threat(attack), row, r))
    worst = results.worst_case.get("adaptive")
    if worst is not None and not baseline:  # per image, the strongest of the adaptive attacks
        threat = "worst of " + ", ".join(worst.attacks)
        out += [Score.of(WORST_ADAPTIVE, "adaptive", threat, row, worst.rows[row]) for row in rows if row in worst.rows]
    return out


def _worst_adaptive(results: EvaluationResult) -> WorstCase | None:
    worst = results.worst_case.get("adaptive")
    return worst if worst is not None and "min-aux" in worst.rows else None


def card_data(meta: CheckpointMeta, name: str, results: EvaluationResult | None) -> ModelCardData:
    dataset_id, dataset_name = DATASETS.get(meta.dataset, (meta.dataset, meta.dataset))
    evals = []
    for s in scores(results, is_baseline(meta)) if results else []:
        label = "clean" if s.attack == "clean" else f"{s.attack} ({s.kind}, {s.threat})"
        evals.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_split="test",
                metric_type="accuracy",
                metric_value=round(s.accuracy, 4),
                metric_name=f"accuracy, {label}, {ROW_NAMES[s.row]} (n = {s.n})",
                metric_config=s.config,
            )
        )
    tags = ["image-classification", "adversarial-robustness", "soap", meta.aux_task.replace("_", "-")]
    tags.append("baseline" if is_baseline(meta) else "adversarial-purification")
    return ModelCardData(
        model_name=name,
        license="mit",
        library_name="pytorch",
        pipeline_tag="image-classification",
        datasets=[dataset_id],
        tags=tags,
        metrics=["accuracy"],
        eval_results=evals or None,
    )


def _evaluation_section(meta: CheckpointMeta, results: EvaluationResult) -> list[str]:
    baseline = is_baseline(meta)
    columns = ["none"] if baseline else ["none", "min-aux"]
    table: dict[tuple[str, str, str], dict[str, Score]] = {}
    for s in scores(results, baseline):
        table.setdefault((s.attack, s.kind, s.threat), {})[s.row] = s
    lines = [
        "## Evaluation",
        "",
        f"From `{RESULTS_ROOT / Path(results.model).name / RESULTS_FILE}` (summarised in `{RESULTS_PAGE}`): "
        f"{results.data}; n = {results.n} unless the row says otherwise, seed {results.seed}, "
        f"{results.device} ({results.host}). Accuracy in %, 95 % interval in brackets (as in docs/results.md).",
        "",
        "| attack | kind | threat | n | " + " | ".join(ROW_NAMES[c] for c in columns) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for (attack, kind, threat), by_row in table.items():
        n = next(iter(by_row.values())).n
        cells = " | ".join(by_row[c].pct() if c in by_row else "" for c in columns)
        lines.append(f"| {attack} | {kind} | {threat} | {n} | {cells} |")
    return [*lines, ""]


def _limitations_section(meta: CheckpointMeta, evaluated: Evaluated | None) -> list[str]:
    lines = ["## Limitations", ""]
    if is_baseline(meta):
        lines += [
            "- A baseline without SOAP: its auxiliary task was not trained (`aux_head_trained: false`), so purifying "
            "would only move images along noise. The service serves it with purification mode `none` and refuses "
            "`min-aux` and `fixed`; there is no purification row.",
        ]
    if evaluated is None:
        lines += [
            "- Not evaluated under attack yet (no results.json): nothing is known about its robustness.",
            "",
        ]
        return lines
    results = evaluated.result
    found = scores(results, is_baseline(meta))
    by = {(s.attack, s.row): s for s in found}
    if not is_baseline(meta):
        blind = [s for s in found if s.kind == "purifier-blind" and s.row == "min-aux"]
        adaptive = [s for s in found if s.kind == "adaptive" and s.row == "min-aux" and s.attack != WORST_ADAPTIVE]
        if blind:
            pairs = ", ".join(
                f"{s.attack} {100 * by[(s.attack, 'none')].accuracy:.1f} → {100 * s.accuracy:.1f} %"
                for s in blind
                if (s.attack, "none") in by
            )
            lines.append(
                "- **Purifier-blind attacks** (adversarial examples computed on the bare network, the paper's "
                f"threat model), accuracy without → with min-aux purification: {pairs}."
            )
        worst = _worst_adaptive(results)
        if adaptive:
            each = ", ".join(f"{s.attack} {s.pct()}" for s in adaptive)
            lines.append(
                "- **Purification does not resist adaptive attacks** (attacks through purify-then-classify), with "
                f"min-aux purification: {each}."
            )
        if worst is not None:
            w = worst.rows["min-aux"]
            lines.append(
                f"  Worst case over {', '.join(worst.attacks)}: **{100 * w.accuracy:.1f} % "
                f"[{100 * w.ci95[0]:.1f}, {100 * w.ci95[1]:.1f}]** (n = {w.n}). Do not rely on it against an "
                "adversary who knows the defence."
            )
        if not adaptive:
            lines.append(
                "- Not evaluated under adaptive attacks: expect them to break purification, as they do for the "
                f"other SOAP models ({RESULTS_PAGE})."
            )
    else:
        every = results.worst_case.get("all")
        overall = every.rows.get("none") if every is not None else None
        if overall is not None:
            lines.append(f"- Worst case over the attacks evaluated: {_pct_ci(overall)} (n = {overall.n}).")
    if evaluated.certified is not None:
        lines += _certified_lines(evaluated.certified)
    else:
        lines.append("- No certified robustness result for this model: nothing here is a guarantee.")
    if results.jpeg_caveat:
        lines.append(
            "- Evaluated on the JPEG re-encoded CIFAR-10 test set (quality ~75): accuracies are slightly below "
            "numbers on the original images."
        )
    return [*lines, ""]


def _pct_ci(acc: Accuracy) -> str:
    lo, hi = acc.ci95
    return f"{100 * acc.accuracy:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _certified_lines(certified: CertifyResult) -> list[str]:
    """Randomized smoothing's certified table (docs/results/<name>/certify/certify.json): one row per base classifier,
    certified accuracy at every radius the run recorded, and the average certified radius."""
    sm = certified.smoothing
    radii = [str(r) for r in certified.radii if any(str(r) in b.certified_accuracy for b in certified.bases.values())]
    lines = [
        f"- **Certified** (randomized smoothing, σ = {sm.sigma:g}, n0 = {sm.n0}, n = {sm.n}, α = {sm.alpha:g}; served "
        "as `mode=certify`, without purification): an L2 guarantee on the [0, 1] pixel scale, not an L∞ one (L∞ "
        "ε = 0.3 can be an L2 norm of 8 on MNIST). Certified accuracy in % [Wilson 95 % interval] on the first n test "
        "images; ACR: the average certified radius (the radius when correct, else 0).",
        "",
        "  | base | n | ACR | " + " | ".join(f"r = {r}" for r in radii) + " |",
        "  | --- | --- | --- | " + " | ".join("---" for _ in radii) + " |",
    ]
    for base, b in certified.bases.items():
        acr = "–" if b.average_certified_radius is None else f"{b.average_certified_radius:.3f}"
        cells = " | ".join(_pct_ci(b.certified_accuracy[r]) if r in b.certified_accuracy else "–" for r in radii)
        lines.append(f"  | {base} | {b.n} | {acr} | {cells} |")
    return [*lines, "", "  Reproduce with:", "", "  ```", f"  {certified.command}", "  ```"]


def _licence_section(meta: CheckpointMeta, directory: Path | None) -> list[str]:
    licence = directory / WEIGHTS_LICENSE_FILE if directory is not None else None
    record = meta.training
    imported = record.recipe is Recipe.IMPORTED
    lines = ["## Source and licence of the weights", ""]
    if imported and licence is not None and licence.is_file():
        lines += [
            f"Imported, not trained here: {record.origin or 'origin not recorded'}, converted by "
            "`python -m training import-reference` (command under How to reproduce). The authors' repository is "
            "released under the "
            f"MIT License; its text, kept next to the weights in `{WEIGHTS_LICENSE_FILE}`:",
            "",
            "```",
            licence.read_text().strip(),
            "```",
        ]
    elif imported:
        lines += [f"Imported: {record.provenance}. The licence file of the source was not found next to the weights."]
    else:
        lines += [
            "Trained in this repository (command under How to reproduce); released with it under the MIT License "
            "(`LICENSE` at the repository root)."
        ]
    return [*lines, ""]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


TRAINING_KEYS = (
    "recipe",
    "origin",
    "data",
    "test_data",
    "epochs",
    "epochs_planned",
    "lr",
    "lr_milestones",
    "batch_size",
    "alpha",
    "consistency",
    "smoothmix",
    "seed",
    "world_size",
    "hardware",
    "started_utc",
    "finished_utc",
    "duration_seconds",
    "git_commit",
)


def _serving_path(directory: Path | None, name: str) -> str:
    """The --model path of the card's own checkpoint: models/zoo/NAME for a shipped model, else the folder the card
    is written to (relative to the working directory when inside it: `runs/tiny`, not models/zoo/tiny)."""
    if directory is None or directory.resolve().parent.parts[-2:] == ("models", "zoo"):
        return f"models/zoo/{name}"
    try:
        return directory.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(directory)


def render(
    meta: CheckpointMeta,
    name: str,
    notes: str = "",
    evaluated: Evaluated | None = None,
    directory: Path | None = None,
) -> str:
    """The card's text. `evaluated`: the model's results.json (and certify.json), if evaluated; `directory`: where
    the weights live (for the licence file of imported weights)."""
    results = evaluated.result if evaluated is not None else None
    t, m, c = meta.training.model_dump(mode="json"), meta.metrics, meta.calibration
    kind = "baseline without purification" if is_baseline(meta) else "SOAP (self-supervised online purification)"
    body = [
        f"# {name}",
        "",
        f"`{meta.network}` ({meta.aux_task} auxiliary task), {kind}, for {meta.dataset}: "
        f"{len(meta.class_names)} classes, input {'x'.join(map(str, meta.input_shape))} in [0, 1].",
        "",
        "## Intended use",
        "",
        "Research and demonstration of test-time adversarial purification (Shi, Holtz & Mishne, ICLR 2021): "
        "served by this repository's service (`python -m service --model "
        + _serving_path(directory, name)
        + "`), which "
        + (
            "classifies without purification."
            if is_baseline(meta)
            else "purifies every input by minimising the auxiliary loss, then classifies it, and flags inputs whose "
            "auxiliary loss exceeds the calibrated clean quantile as suspicious."
        )
        + (
            " Not robust to adversarial examples (see Limitations); "
            if is_baseline(meta)
            else " Not a defence against an adversary who knows the model and the purifier (see Limitations); "
        )
        + f"not for {meta.dataset} look-alikes outside its test distribution.",
        "",
    ]
    if results is not None:
        body += _evaluation_section(meta, results)
    body += _limitations_section(meta, evaluated)
    body += ["## Metrics at training time", ""]
    if "clean_accuracy" in m:
        body.append(
            f"- Clean test accuracy: **{100 * m['clean_accuracy']:.2f} %** on {int(m.get('test_images', 0))} "
            f"test images ({t.get('test_data', t.get('data', '?'))}), no purification."
        )
    if "min_aux_accuracy" in m and not is_baseline(meta):
        body.append(
            f"- Accuracy after min-aux purification (no attack): **{100 * m['min_aux_accuracy']:.2f} %** on the "
            f"first {int(m.get('min_aux_images', 0))} of those test images."
        )
    for key, value in m.items():
        if key not in ("clean_accuracy", "test_images", "min_aux_accuracy", "min_aux_images"):
            body.append(f"- {key}: {_fmt(value)}")
    if c is not None:
        q = ", ".join(f"q{k} = {v:.4g}" for k, v in c.aux_loss_quantiles.items())
        body.append(
            f"- Calibration (clean held-out images, n = {c.n}): test-time auxiliary loss {q}; inputs above "
            f"q{c.suspicious_quantile} are flagged as suspicious by the service."
        )
        if not is_baseline(meta):
            body.append(
                f"- Mean auxiliary loss after purification per budget {meta.purifier.budget_step:.4g}·e, e = "
                f"0..{meta.purifier.num_budgets - 1} (first {t.get('calibration_curve_images', '?')} held-out "
                "images): " + ", ".join(f"{v:.4g}" for v in c.mean_aux_loss_per_budget)
            )
    body += ["", "## How to reproduce", ""]
    if "command" in t:
        body += ["Weights:", "", "```", t["command"], "```", ""]
    if results is not None:
        body += ["Evaluation (then `python -m training.results_page` for the results page):", ""]
        body += ["```", results.command, "```", ""]
    body += ["Details of the run:", ""]
    body += [f"- {key}: {_fmt(t[key])}" for key in TRAINING_KEYS if key in t]
    body.append("")
    body += _licence_section(meta, directory)
    if notes:
        body += [NOTES_HEADING, "", notes.strip(), ""]
    card = ModelCard(f"---\n{card_data(meta, name, results).to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card).rstrip("\n") + "\n"


def read_notes(card_path: Path) -> str:
    """The `## Notes` section of an existing card (hand-written; kept across regenerations), or ""."""
    if not card_path.is_file():
        return ""
    match = re.search(rf"^{re.escape(NOTES_HEADING)}\n(.*)\Z", card_path.read_text(), flags=re.M | re.S)
    return match.group(1).strip() if match else ""


def load_results(name: str, results_root: Path = RESULTS_ROOT) -> Evaluated | None:
    """results.json of the model, with its certification (certify/certify.json) if there is one."""
    path = results_root / name / RESULTS_FILE
    if not path.is_file():
        return None
    certify = results_root / name / "certify" / CERTIFY_FILE
    return Evaluated(load_evaluation(path), load_certification(certify) if certify.is_file() else None)


def write(directory: str | Path, meta: CheckpointMeta, notes: str = "", evaluated: Evaluated | None = None) -> Path:
    directory = Path(directory)
    path = directory / CARD_FILE
    path.write_text(render(meta, directory.name, notes, evaluated, directory))
    return path


def regenerate(directory: Path, results_root: Path = RESULTS_ROOT) -> Path:
    """Rewrite a checkpoint's card from its model.json and results.json, keeping its Notes."""
    meta = load_checkpoint(directory).meta
    notes = read_notes(directory / CARD_FILE)
    return write(directory, meta, notes, load_results(directory.name, results_root))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (models/zoo/NAME)")
    parser.add_argument("--results-root", type=Path, default=RESULTS_ROOT, help="where NAME/results.json live")
    args = parser.parse_args(argv)
    for directory in args.checkpoints:
        print(f"wrote {regenerate(directory, args.results_root)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
