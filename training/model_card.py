"""MODEL_CARD.md next to the weights: data, recipe, epochs, command, metrics, time and hardware."""

from __future__ import annotations

from pathlib import Path

from models import CheckpointMeta

CARD_FILE = "MODEL_CARD.md"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(meta: CheckpointMeta, name: str, notes: str = "") -> str:
    t, m, c = meta.training.model_dump(mode="json"), meta.metrics, meta.calibration
    lines = [
        f"# {name}",
        "",
        f"SOAP network `{meta.network}` ({meta.aux_task} auxiliary task) for {meta.dataset}, "
        f"{len(meta.class_names)} classes, input {'x'.join(map(str, meta.input_shape))} in [0, 1].",
        "",
    ]
    if not meta.aux_head_trained:
        lines += [
            "Its auxiliary task was not trained (recipe without the auxiliary loss): the service serves it without "
            "purification (mode none) and refuses the purification modes; the min-aux figure below shows why.",
            "",
        ]
    lines += [
        "## Metrics",
        "",
    ]
    if "clean_accuracy" in m:
        lines.append(
            f"- Clean test accuracy: **{100 * m['clean_accuracy']:.2f} %** on {int(m.get('test_images', 0))} "
            f"test images ({t.get('test_data', t.get('data', '?'))}), no purification."
        )
    if "min_aux_accuracy" in m:
        lines.append(
            f"- Accuracy after min-aux purification (no attack): **{100 * m['min_aux_accuracy']:.2f} %** on the first "
            f"{int(m.get('min_aux_images', 0))} of those test images."
        )
    for key, value in m.items():
        if key not in ("clean_accuracy", "test_images", "min_aux_accuracy", "min_aux_images"):
            lines.append(f"- {key}: {_fmt(value)}")
    if c is not None:
        q = ", ".join(f"q{k} = {v:.4g}" for k, v in c.aux_loss_quantiles.items())
        lines += [
            f"- Calibration (clean held-out images, n = {c.n}): test-time auxiliary loss {q}; "
            f"inputs above q{c.suspicious_quantile} are flagged as suspicious by the service.",
            f"- Mean auxiliary loss after purification per budget {meta.purifier.budget_step:.4g}·e, "
            f"e = 0..{meta.purifier.num_budgets - 1} "
            f"(first {t.get('calibration_curve_images', '?')} held-out images): "
            + ", ".join(f"{v:.4g}" for v in c.mean_aux_loss_per_budget),
        ]
    lines += ["", "## Training", ""]
    for key in (
        "recipe",
        "origin",
        "data",
        "epochs",
        "epochs_planned",
        "lr",
        "lr_milestones",
        "batch_size",
        "alpha",
        "seed",
        "world_size",
        "hardware",
        "started_utc",
        "finished_utc",
        "duration_seconds",
        "git_commit",
    ):
        if key in t:
            lines.append(f"- {key}: {_fmt(t[key])}")
    if "command" in t:
        lines += ["", "Reproduce with:", "", "```", t["command"], "```"]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"


def write(directory: str | Path, meta: CheckpointMeta, notes: str = "") -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(render(meta, Path(directory).name, notes))
    return path
