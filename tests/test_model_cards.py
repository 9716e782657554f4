"""Every shipped model card (models/zoo/*/MODEL_CARD.md) is a Hugging Face model card that says what the model's
results.json says: front matter with licence, library, datasets, tags and a model-index whose numbers are the
evaluated accuracies; the limitations (blind and adaptive results); no purification row for a baseline; the source
and licence of imported weights. And the card on disk is what training/model_card.py makes now (not stale)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from models import Recipe, load_checkpoint
from training import model_card

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"
RESULTS = ROOT / "docs" / "results"
SHIPPED = sorted(p.name for p in ZOO.iterdir() if (p / "model.json").is_file())


def results_of(name: str) -> model_card.Evaluated | None:
    """The model's evaluation as the card generator reads it (results.json plus certify/certify.json)."""
    return model_card.load_results(name, RESULTS)


def test_results_are_read_from_results_json_and_certify_json():
    evaluated = results_of("mnist-fcn-dr")
    stored = json.loads((RESULTS / "mnist-fcn-dr" / "results.json").read_text())
    assert evaluated.result.model_dump(mode="json", by_alias=True)["attacks"] == stored["attacks"]
    certify = RESULTS / "mnist-fcn-dr" / "certify" / "certify.json"
    if certify.is_file():
        assert evaluated.certified.model_dump(mode="json") == json.loads(certify.read_text())


def expected_index(evaluated: model_card.Evaluated, baseline: bool) -> dict[str, float]:
    """attack/row -> accuracy, straight from results.json: clean and every attack, no purification and (SOAP
    models) min-aux; never the oracle row."""
    results = evaluated.result
    rows = ["none"] if baseline else ["none", "min-aux"]
    out = {f"clean/{r}": results.clean[r].accuracy for r in rows if r in results.clean}
    for name, attack in results.attacks.items():
        for r in rows:
            if r in attack.rows:
                out[f"{name}/{r}"] = attack.rows[r].accuracy
    worst = results.worst_case.get("adaptive")
    if worst and not baseline:
        out |= {f"worst-adaptive/{r}": worst.rows[r].accuracy for r in rows}
    return out


def test_every_shipped_model_has_results():
    assert SHIPPED
    missing = [n for n in SHIPPED if results_of(n) is None]
    assert not missing, f"no docs/results/<name>/results.json for {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_card_front_matter_matches_results_json(name):
    meta = load_checkpoint(ZOO / name).meta
    results = results_of(name)
    card = ModelCard.load(ZOO / name / "MODEL_CARD.md")
    data = card.data
    assert data.license == "mit"
    assert data.library_name == "pytorch"
    assert data.datasets == [meta.dataset]
    assert data.metrics == ["accuracy"]
    assert "adversarial-robustness" in data.tags
    baseline = not meta.aux_head_trained
    assert ("baseline" in data.tags) == baseline
    index = {e.metric_config: e for e in data.eval_results}
    want = expected_index(results, baseline)
    assert set(index) == set(want)
    for config, accuracy in want.items():
        result = index[config]
        assert result.metric_value == pytest.approx(accuracy, abs=5e-5), config
        assert result.metric_type == "accuracy"
        assert result.dataset_type == meta.dataset
        assert result.dataset_split == "test"
    if baseline:
        assert not any(c.endswith("/min-aux") for c in index), "a baseline card has no purification row"


@pytest.mark.parametrize("name", SHIPPED)
def test_card_sections_state_the_limitations(name):
    meta = load_checkpoint(ZOO / name).meta
    evaluated = results_of(name)
    results = evaluated.result
    text = (ZOO / name / "MODEL_CARD.md").read_text()
    for heading in (
        "## Intended use",
        "## Evaluation",
        "## Limitations",
        "## How to reproduce",
        "## Source and licence of the weights",
    ):
        assert heading in text, heading
    assert results.command in text, "the evaluation command"
    if meta.training.command:
        assert meta.training.command in text
    limitations = text.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    if not meta.aux_head_trained:
        assert "min-aux purification" not in text, "a baseline card has no purification row"
        assert "no purification row" in limitations
        return
    kinds = {a.kind for a in results.attacks.values()}
    if "blind" in kinds:
        assert "**Purifier-blind attacks**" in limitations
        pgd = results.attacks["pgd"].rows
        assert f"pgd {100 * pgd['none'].accuracy:.1f} → {100 * pgd['min-aux'].accuracy:.1f} %" in limitations
    if "adaptive" in kinds:
        assert "does not resist adaptive attacks" in limitations
        worst = results.worst_case["adaptive"].rows["min-aux"]
        assert f"**{100 * worst.accuracy:.1f} %" in limitations
    else:
        assert "Not evaluated under adaptive attacks" in limitations
    if evaluated.certified is None:
        assert "No certified robustness result" in limitations
    else:
        assert "**Certified**" in limitations
        for base, b in evaluated.certified.bases.items():  # the table: one row per base, every radius, the ACR
            row = next(line for line in limitations.splitlines() if line.strip().startswith(f"| {base} | {b.n} |"))
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            radii = [str(r) for r in evaluated.certified.radii if str(r) in b.certified_accuracy]
            expected = [f"{100 * b.certified_accuracy[r].accuracy:.1f} %" for r in radii]
            assert [c.split(" [")[0] for c in cells[3:]] == expected
            if b.average_certified_radius is not None:
                assert cells[2] == f"{b.average_certified_radius:.3f}"
        assert evaluated.certified.command in limitations


def test_imported_weights_carry_the_authors_licence():
    imported = [n for n in SHIPPED if load_checkpoint(ZOO / n).meta.training.recipe is Recipe.IMPORTED]
    assert imported == ["cifar10-resnet18-lc-official"]
    for name in imported:
        licence = (ZOO / name / model_card.WEIGHTS_LICENSE_FILE).read_text()
        assert licence.startswith("MIT License")
        section = (ZOO / name / "MODEL_CARD.md").read_text().split("## Source and licence of the weights", 1)[1]
        assert "Mishne-Lab/SOAP" in section
        assert licence.strip() in section


@pytest.mark.parametrize("name", SHIPPED)
def test_card_on_disk_is_what_the_generator_makes(name):
    """Regenerating changes nothing: the card follows model.json, results.json and its own Notes."""
    directory = ZOO / name
    meta = load_checkpoint(directory).meta
    notes = model_card.read_notes(directory / model_card.CARD_FILE)
    expected = model_card.render(meta, name, notes, results_of(name), directory)
    assert (directory / model_card.CARD_FILE).read_text() == expected, (
        f"stale card: run python -m training.model_card models/zoo/{name}"
    )


@pytest.mark.anyio
async def test_service_serves_the_card_and_states_the_robustness_truth(model_dir):
    """GET /v1/models/{name} says what purification resists (blind attacks) and what not (adaptive), and
    GET /v1/models/{name}/card serves the shipped card as is; a baseline resists nothing."""
    from support import serve_app, settings_for

    baseline = ZOO / "mnist-fcn-dr-vanilla"
    async with serve_app(settings_for(model_dir, baseline)) as (_, client):
        info = (await client.get("/v1/models/mnist-fcn-dr")).json()["robustness"]
        card = await client.get(info["model_card"])
        plain = (await client.get("/v1/models/mnist-fcn-dr-vanilla")).json()["robustness"]
        missing = await client.get("/v1/models/no-such-model/card")
    assert info["purifies"] is True
    assert info["resists"].startswith("purifier-blind attacks")
    assert info["does_not_resist"].startswith("adaptive attacks")
    assert info["results"] == "docs/results.md"
    assert card.status_code == 200
    assert card.headers["content-type"].startswith("text/markdown")
    assert card.text == (model_dir / "MODEL_CARD.md").read_text()
    assert plain["purifies"] is False
    assert plain["resists"] is None
    assert missing.status_code == 404
    assert missing.json()["error"] == "unknown_model"
