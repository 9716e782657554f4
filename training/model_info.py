"""A RobustBench-style `model_info` JSON for an evaluated model (the fields of RobustBench's model_info files).

    python -m training.model_info docs/results/*/results.json     # writes model_info.json beside each

`autoattack_acc` is the AutoAttack column (standard, through trajectory BPDA) when the evaluation ran it. Our
honest number is `adaptive_worst_case_acc`, the per-image worst case over every adaptive attack that ran
(min-aux row), with its n and interval. `unreliable` (RobustBench's flag for a defence whose published number
did not survive a later evaluation) is set when the upper end of that interval lies below the paper's reported
robust accuracy. Accuracies are strings in percent with two decimals, as RobustBench writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from models import Recipe

from .paper import PAPER, paper_key
from .records import EvaluationResult, load_evaluation
from .rows import Row

MODEL_INFO = "model_info.json"
PAPER_LINK = "https://openreview.net/forum?id=_i3ASPp12WS"
PAPER_AUTHORS = "Changhao Shi, Chester Holtz, Gal Mishne"
ARCHITECTURES = {"mnist-fcn-dr": "FCN-DR", "mnist-cnn-dr": "CNN-DR", "cifar10-resnet18": "ResNet-18"}


@dataclass(frozen=True)
class ModelInfo:
    link: str
    name: str
    authors: str
    additional_data: bool
    number_forward_passes: int
    dataset: str
    venue: str
    architecture: str
    eps: str
    clean_acc: str
    reported: str | None
    autoattack_acc: str | None
    adaptive_worst_case_acc: str | None
    adaptive_worst_case_n: int | None
    adaptive_worst_case_ci95: tuple[str, str] | None
    unreliable: bool
    footnote: str


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _eps_text(eps: float) -> str:
    return f"{round(eps * 255)}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 and eps < 0.1 else f"{eps:g}"


def model_info(result: EvaluationResult) -> ModelInfo:
    """The model_info record of one results.json."""
    soap = result.recipe is Recipe.SOAP
    row: Row = "min-aux" if soap else "none"
    network = result.network
    stem = network.rsplit("-", 1)[0] if network.startswith("cifar") else network
    autoattack = result.accuracy("autoattack", row)
    adaptive = result.worst_case.get("adaptive")
    worst = adaptive.rows.get(row) if adaptive is not None else None
    paper = PAPER.get((paper_key(network, result.recipe), result.recipe, row))
    purifier = result.purifier
    # min-aux: one forward+backward of the auxiliary loss per distinct trajectory and step (at most T·K), the
    # loss of every candidate, and the classifier: an upper bound on the passes per image.
    passes = purifier.steps * len(purifier.budgets) + len(purifier.budgets) + 1 if soap else 1
    unreliable = bool(paper and worst and 100 * worst.ci95[1] < paper[2])
    return ModelInfo(
        link=PAPER_LINK,
        name=f"SOAP ({result.aux_task}), {Path(result.model).name}" if soap else Path(result.model).name,
        authors=PAPER_AUTHORS if soap else "baseline trained in this repository",
        additional_data=False,
        number_forward_passes=passes,
        dataset=result.dataset,
        venue="ICLR 2021" if soap else "",
        architecture=ARCHITECTURES.get(stem, network),
        eps=_eps_text(result.settings.linf_eps),
        clean_acc=_pct(result.clean[row].accuracy),
        reported=f"{paper[2]:.2f}" if paper else None,  # the paper's PGD column (the only L∞ robustness it reports)
        autoattack_acc=_pct(autoattack.accuracy) if autoattack else None,
        adaptive_worst_case_acc=_pct(worst.accuracy) if worst else None,
        adaptive_worst_case_n=worst.n if worst else None,
        adaptive_worst_case_ci95=(_pct(worst.ci95[0]), _pct(worst.ci95[1])) if worst else None,
        unreliable=unreliable,
        footnote=(
            f"n = {result.n} test images ({result.data}); reported = the paper's PGD-then-purify number, an "
            f"attack blind to the purifier; evaluation command: {result.command}"
        ),
    )


def write(result: EvaluationResult, out: Path) -> Path:
    path = out / MODEL_INFO
    path.write_text(json.dumps(asdict(model_info(result)), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.model_info", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    args = parser.parse_args(argv)
    for path in args.results:
        print(write(load_evaluation(path), path.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
