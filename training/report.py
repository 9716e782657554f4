"""Write an evaluation result as Markdown (results.md), JSON (results.json) and CSV (results.csv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .rows import ROW_TITLES


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def cell(acc: dict | None) -> str:
    if acc is None:
        return "–"
    lo, hi = acc["ci95"]
    return f"{pct(acc['accuracy'])} [{pct(lo, 1)}, {pct(hi, 1)}]"


def provenance(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"- model `{result['model']}`: {result['network']} ({result.get('provenance', result['recipe'])}, "
        f"auxiliary task {result['aux_task']}), dataset {result['dataset']}",
        f"- data: {result['data']}; n = {result['n']} test images; attack seed {result['seed']}; "
        f"device {result['device']}; {result['host']}; git {result.get('git_commit') or '?'}",
        f"- purifier: γ = {result['purifier']['step_size']:.4g}, T = {result['purifier']['steps']}, "
        f"budgets 0..{max(result['purifier']['budgets']):.4g} step {result['purifier']['budget_step']:.4g} "
        "(min-aux per image)",
        f"- attack budgets: L∞ ε = {s['linf_eps']:.4g}, L2 ε = {s['l2_eps']:.4g}",
    ]
    if result.get("command"):
        lines.append(f"- command: `{result['command']}`")
    if result.get("jpeg_caveat"):
        lines.append(
            "- **caveat**: these CIFAR-10 test images are JPEG re-encodings (quality ≈ 75) of the originals, "
            "so accuracies are a little below those on the lossless test set"
        )
    return "\n".join(lines)


def accuracy_table(result: dict, attacks: list[str] | None = None, success: bool = False) -> str:
    attacks = attacks if attacks is not None else list(result["attacks"])
    head = ["row", "no attack"] + [
        a if result["attacks"][a].get("n", result["n"]) == result["n"] else f"{a} (n={result['attacks'][a]['n']})"
        for a in attacks
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [ROW_TITLES[row], "–" if success else cell(result["clean"][row])]
        for a in attacks:
            acc = result["attacks"][a]["rows"].get(row)
            cells.append(pct(acc and acc["success_rate"]) if success else cell(acc))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attacks_table(result: dict) -> str:
    lines = ["| attack | kind | settings | n | s / image | max L∞ | max L2 |", "|---|---|---|---|---|---|---|"]
    for name, a in result["attacks"].items():
        lines.append(
            f"| {name} | {a['kind']} | {a['description']} | {a.get('n', result['n'])} | {a['seconds_per_image']:.4f} | "
            f"{a['max_linf']:.4g} | {a['max_l2']:.4g} |"
        )
    return "\n".join(lines)


def worst_case_lines(result: dict) -> list[str]:
    lines = []
    for group, by_row in result.get("worst_case", {}).items():
        names = ", ".join(by_row["attacks"])
        for row in result["rows"]:
            lines.append(
                f"- worst case over {group} attacks ({names}), {ROW_TITLES[row]}: {cell(by_row[row])} % "
                f"(n = {by_row[row]['n']})"
            )
    return lines


def sanity_lines(result: dict) -> list[str]:
    out = []
    for c in result["sanity_checks"]:
        mark = "ok" if c["passed"] else "**WARNING: failed**"
        out.append(f"- {mark} — {c['name']}: {c['detail']}")
    return out


def markdown(result: dict) -> str:
    parts = [
        f"# Evaluation: {result['network']} ({Path(result['model']).name})",
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
    if result.get("purification_seconds_per_image") is not None:
        parts += [
            f"Purification (min-aux, {len(result['purifier']['budgets'])} budgets): "
            f"{1000 * result['purification_seconds_per_image']:.2f} ms per image on {result['device']}.",
            "",
        ]
    parts += ["## Sanity checks", "", *sanity_lines(result), ""]
    if result.get("figures"):
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in result["figures"]] + [""]
    return "\n".join(parts)


def csv_rows(result: dict) -> list[dict]:
    rows = []
    for row in result["rows"]:
        entries = [("no attack", "clean", None, result["clean"][row])]
        entries += [
            (name, a["kind"], a["seconds_per_image"], a["rows"][row])
            for name, a in result["attacks"].items()
            if row in a["rows"]
        ]
        for attack, kind, seconds, acc in entries:
            rows.append(
                {
                    "model": result["model"],
                    "network": result["network"],
                    "dataset": result["dataset"],
                    "n": result["n"],
                    "seed": result["seed"],
                    "row": row,
                    "attack": attack,
                    "kind": kind,
                    "correct": acc["correct"],
                    "accuracy": acc["accuracy"],
                    "ci95_low": acc["ci95"][0],
                    "ci95_high": acc["ci95"][1],
                    "success_rate": acc["success_rate"],
                    "seconds_per_image": seconds,
                }
            )
    return rows


def write_all(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "results.md").write_text(markdown(result))
    rows = csv_rows(result)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
