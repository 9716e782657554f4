"""Write an evaluation result as Markdown (results.md), JSON (results.json) and CSV (results.csv)."""

from __future__ import annotations

import csv
from pathlib import Path

from .records import RESULTS_FILE, EvaluationResult, SanityCheck
from .rows import ROW_TITLES
from .stats import Accuracy


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def cell(acc: Accuracy | None) -> str:
    return "–" if acc is None else acc.text()


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def provenance(result: EvaluationResult) -> str:
    s, purifier = result.settings, result.purifier
    lines = [
        f"- model `{result.model}`: {result.network} ({result.provenance}, "
        f"auxiliary task {result.aux_task}), dataset {result.dataset}",
        f"- data: {result.data}; n = {result.n} test images; attack seed {result.seed}; "
        f"device {result.device}; {result.host}; git {result.git_commit or '?'}",
        f"- purifier: γ = {purifier.step_size:.4g}, T = {purifier.steps}, "
        f"budgets 0..{max(purifier.budgets):.4g} step {purifier.budget_step:.4g} "
        "(min-aux per image)",
        f"- attack budgets: L∞ ε = {s.linf_eps:.4g}, L2 ε = {s.l2_eps:.4g}",
    ]
    if result.command:
        lines.append(f"- command: `{result.command}`")
    if result.jpeg_caveat:
        lines.append(
            "- **caveat**: these CIFAR-10 test images are JPEG re-encodings (quality ≈ 75) of the originals, "
            "so accuracies are a little below those on the lossless test set"
        )
    return "\n".join(lines)


def accuracy_table(result: EvaluationResult, attacks: list[str] | None = None, success: bool = False) -> str:
    attacks = attacks if attacks is not None else list(result.attacks)
    head = ["row", "no attack"] + [
        a if result.attacks[a].n == result.n else f"{a} (n={result.attacks[a].n})" for a in attacks
    ]
    rows = []
    for row in result.rows:
        cells = [ROW_TITLES[row], "–" if success else cell(result.clean[row])]
        for a in attacks:
            acc = result.attacks[a].rows.get(row)
            cells.append(pct(acc.success_rate if acc else None) if success else cell(acc))
        rows.append(cells)
    return markdown_table(head, rows)


def attacks_table(result: EvaluationResult) -> str:
    lines = ["| attack | kind | settings | n | s / image | max L∞ | max L2 |", "|---|---|---|---|---|---|---|"]
    for name, a in result.attacks.items():
        lines.append(
            f"| {name} | {a.kind} | {a.description} | {a.n} | {a.seconds_per_image:.4f} | "
            f"{a.max_linf:.4g} | {a.max_l2:.4g} |"
        )
    return "\n".join(lines)


def worst_case_lines(result: EvaluationResult) -> list[str]:
    lines = []
    for group, worst in result.worst_case.items():
        names = ", ".join(worst.attacks)
        for row in result.rows:
            lines.append(
                f"- worst case over {group} attacks ({names}), {ROW_TITLES[row]}: {cell(worst.rows[row])} % "
                f"(n = {worst.rows[row].n})"
            )
    return lines


def sanity_lines(checks: list[SanityCheck]) -> list[str]:
    out = []
    for c in checks:
        mark = "ok" if c.passed else "**WARNING: failed**"
        out.append(f"- {mark} — {c.name}: {c.detail}")
    return out


def markdown(result: EvaluationResult) -> str:
    parts = [
        f"# Evaluation: {result.network} ({Path(result.model).name})",
        "",
        provenance(result),
        "",
        "## Accuracy (%), Wilson 95 % interval in brackets",
        "",
        "Purifier-blind columns attack the bare network (as the paper did) and feed the same adversarial images "
        "to every row; adaptive columns attack purify-then-classify and are meaningful in the min-aux row.",
        "",
        accuracy_table(result),
        "",
        "## Attack success rate (% of the row's clean-correct images that the attack makes wrong)",
        "",
        accuracy_table(result, success=True),
        "",
        "## Worst case",
        "",
        *worst_case_lines(result),
        "",
        "## Attacks",
        "",
        attacks_table(result),
        "",
    ]
    if result.purification_seconds_per_image is not None:
        parts += [
            f"Purification (min-aux, {len(result.purifier.budgets)} budgets): "
            f"{1000 * result.purification_seconds_per_image:.2f} ms per image on {result.device}.",
            "",
        ]
    parts += ["## Sanity checks", "", *sanity_lines(result.sanity_checks), ""]
    if result.figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in result.figures] + [""]
    return "\n".join(parts)


def csv_rows(result: EvaluationResult) -> list[dict[str, object]]:
    rows = []
    for row in result.rows:
        entries: list[tuple[str, str, float | None, Accuracy]] = [("no attack", "clean", None, result.clean[row])]
        entries += [
            (name, a.kind, a.seconds_per_image, a.rows[row]) for name, a in result.attacks.items() if row in a.rows
        ]
        for attack, kind, seconds, acc in entries:
            rows.append(
                {
                    "model": result.model,
                    "network": result.network,
                    "dataset": result.dataset,
                    "n": result.n,
                    "seed": result.seed,
                    "row": row,
                    "attack": attack,
                    "kind": kind,
                    "correct": acc.correct,
                    "accuracy": acc.accuracy,
                    "ci95_low": acc.ci95[0],
                    "ci95_high": acc.ci95[1],
                    "success_rate": acc.success_rate,
                    "seconds_per_image": seconds,
                }
            )
    return rows


def write_all(result: EvaluationResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(result.to_json())
    (out / "results.md").write_text(markdown(result))
    rows = csv_rows(result)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
