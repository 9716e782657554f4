"""The typed result records (training/records.py) against the stored results under docs/results/: every stored file
validates and dumps back to the same data, a damaged file is rejected with its name and the field's, and the pages
built from the records are the committed ones."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from training import certify, model_info, report, results_page, soundness
from training.records import (
    StoredResultError,
    load_certification,
    load_evaluation,
    load_soundness,
    pack_images,
    unpack_images,
)
from training.rows import ROWS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
EVALUATIONS = sorted(RESULTS.glob("*/results.json"))
CERTIFICATIONS = sorted(RESULTS.glob("*/certify*/certify.json"))
SOUNDNESS = sorted(RESULTS.glob("*/certify*/soundness-*.json"))


def _id(path: Path) -> str:
    return str(path.relative_to(RESULTS))


def test_the_stored_results_are_found():
    assert len(EVALUATIONS) >= 10
    assert CERTIFICATIONS
    assert SOUNDNESS


@pytest.mark.parametrize("path", EVALUATIONS, ids=_id)
def test_every_stored_evaluation_validates_and_round_trips(path):
    result = load_evaluation(path)
    assert json.loads(result.to_json()) == json.loads(path.read_text())
    assert set(result.rows) <= set(ROWS)
    assert all(a.n <= result.n for a in result.attacks.values())


@pytest.mark.parametrize("path", CERTIFICATIONS, ids=_id)
def test_every_stored_certification_validates_and_round_trips(path):
    assert json.loads(load_certification(path).to_json()) == json.loads(path.read_text())


@pytest.mark.parametrize("path", SOUNDNESS, ids=_id)
def test_every_stored_soundness_check_validates_and_round_trips(path):
    assert json.loads(load_soundness(path).to_json()) == json.loads(path.read_text())


@pytest.mark.parametrize("path", EVALUATIONS, ids=_id)
def test_stored_reports_and_model_info_are_what_the_records_give(path):
    """results.md, results.csv's rows and model_info.json beside each results.json follow from the record."""
    result = load_evaluation(path)
    assert report.markdown(result) == (path.parent / "results.md").read_text()
    info = json.loads((path.parent / model_info.MODEL_INFO).read_text())
    assert json.loads(json.dumps(asdict(model_info.model_info(result)))) == info
    assert len(report.csv_rows(result)) == sum(
        1 + sum(row in a.rows for a in result.attacks.values()) for row in result.rows
    )


def test_stored_certify_and_soundness_pages_are_what_the_records_give():
    for path in CERTIFICATIONS:
        assert certify.markdown(load_certification(path)) == (path.parent / "certify.md").read_text()
    for path in SOUNDNESS:
        assert soundness.markdown(load_soundness(path)) == path.with_suffix(".md").read_text()


def test_docs_results_page_is_regenerated_exactly():
    """`python -m training.results_page --notes docs/results-notes.md` rewrites docs/results.md to what is committed."""
    page = ROOT / "docs" / "results.md"
    notes = (ROOT / "docs" / "results-notes.md").read_text()
    assert results_page.build_page(results_page._load(RESULTS), page, notes) == page.read_text()


def test_the_full_strength_table_quotes_each_pinned_evaluation_from_its_raw_json():
    """Each `*-pinned` folder is one row: the row a user meets (min-aux for SOAP, the bare network for a baseline),
    its strongest single attack and the per-image worst case over every attack, read here from the JSON directly."""
    pinned = sorted(RESULTS.glob(f"*{results_page.PINNED_SUFFIX}/results.json"))
    assert pinned, "the pinned CNN suite is committed"
    loaded = results_page._load(RESULTS)
    evaluations = [e for e in loaded if e.name.endswith(results_page.PINNED_SUFFIX)]
    table = results_page.pinned_table(evaluations, loaded).splitlines()
    assert len(table) == 2 + len(pinned)
    lines = {line.split("|")[1].strip(): line for line in table[2:]}
    for path in pinned:
        line = lines[f"`{path.parent.name}`"]
        raw = json.loads(path.read_text())
        row = "min-aux" if "min-aux" in raw["rows"] else "none"
        accuracies = {name: a["rows"][row]["accuracy"] for name, a in raw["attacks"].items() if a["kind"] != "control"}
        strongest = min(accuracies, key=accuracies.__getitem__)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"`{path.parent.name}`"
        assert cells[2] == str(raw["n"])
        assert cells[4].startswith(f"{strongest}: {100 * accuracies[strongest]:.2f} ")
        linf = raw["worst_case"].get("linf")
        assert cells[5] == "–" if linf is None else cells[5].startswith(f"{100 * linf[row]['accuracy']:.2f} ")
        assert cells[6].startswith(f"{100 * raw['worst_case']['all'][row]['accuracy']:.2f} ")
        for cell, linf_only in ((cells[7], True), (cells[8], False)):
            correct, n, names = _joint_from_raw_json(raw, row, linf_only)
            assert cell.startswith(f"{100 * correct / n:.2f} ")
            assert cell.endswith(f"(n={n}: {', '.join(f'`{name}`' for name in names)})")


def _unpack(packed: str, n: int) -> np.ndarray:
    """docs/evaluation.md's recipe for a stored per-image outcome."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))[:n].astype(bool)


def _joint_from_raw_json(of: dict, row: str, linf_only: bool) -> tuple[int, int, list[str]]:
    """The joint worst case recomputed with numpy from the stored JSON alone: every committed evaluation of the same
    checkpoint, data and purifier that stored per-image outcomes, over the images all of its attacks saw."""
    masks, names = [], []
    for path in EVALUATIONS:
        raw = json.loads(path.read_text())
        same = all(raw[key] == of[key] for key in ("model", "data", "purifier"))
        if not same or "clean_images" not in raw or row not in raw["rows"]:
            continue
        names.append(path.parent.name)
        masks.append(_unpack(raw["clean_images"][row], raw["n"]))
        for attack in raw["attacks"].values():
            if attack["kind"] != "control" and (attack["norm"] == "linf" or not linf_only):
                masks.append(_unpack(attack["correct_images"][row], attack["n"]))
    assert len(names) >= 2, "the pinned suites are joined with their attack-library runs"
    m = min(len(mask) for mask in masks)
    return int(np.all([mask[:m] for mask in masks], axis=0).sum()), m, sorted(names)


def _damaged(tmp_path: Path, change) -> Path:
    data = json.loads((RESULTS / "mnist-fcn-dr" / "results.json").read_text())
    change(data)
    path = tmp_path / "mnist-fcn-dr" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("clean"), "clean"),
        (lambda d: d["attacks"]["pgd"].pop("max_l2"), "attacks.pgd.max_l2"),
        (lambda d: d["attacks"]["pgd"].update(n="many"), "attacks.pgd.n"),
        (lambda d: d["attacks"]["pgd"].update(kind="sneaky"), "attacks.pgd.kind"),
        (lambda d: d["clean"]["none"].update(ci95=[0.5]), "clean.none.ci95"),
        (lambda d: d["clean"].update(denoised=d["clean"]["none"]), "clean.denoised"),
        (lambda d: d["worst_case"]["adaptive"]["min-aux"].update(accuracy="high"), "min-aux.accuracy"),
        (lambda d: d.update(recipe="magic"), "recipe"),
        (lambda d: d.update(accuracy=1.0), "accuracy"),  # an unknown key: a misspelling is not dropped in silence
    ],
)
def test_a_damaged_evaluation_is_rejected_naming_the_file_and_the_field(tmp_path, change, field):
    path = _damaged(tmp_path, change)
    with pytest.raises(StoredResultError) as caught:
        load_evaluation(path)
    message = str(caught.value)
    assert str(path) in message
    assert field in message


def test_the_results_page_names_a_damaged_file(tmp_path):
    path = _damaged(tmp_path, lambda d: d.pop("attacks"))
    with pytest.raises(StoredResultError, match="attacks") as caught:
        results_page.main(["--results", str(tmp_path), "--page", str(tmp_path / "results.md")])
    assert str(path) in str(caught.value)


def test_absent_and_null_fields_stay_as_they_were():
    """Optional parts the evaluation leaves out (detector, epsilon_zero, resumed_batches, figures) stay out of the
    JSON when absent; those it writes as null (beta_sweep, purification time) stay null."""
    baseline = json.loads(load_evaluation(RESULTS / "mnist-fcn-dr-vanilla" / "results.json").to_json())
    assert "detector" not in baseline
    assert baseline["purification_seconds_per_image"] is None
    assert baseline["beta_sweep"] is None
    result = load_evaluation(RESULTS / "mnist-fcn-dr" / "results.json").model_copy(update={"figures": None})
    assert "figures" not in json.loads(result.to_json())


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_per_image_outcomes_pack_into_numpys_bit_order_and_back(n):
    """Image i is bit i of the packed bytes, most significant first: numpy.packbits reads the stored hex as is."""
    correct = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_images(correct)
    assert bytes.fromhex(packed) == np.packbits(correct.numpy()).tobytes()
    assert torch.equal(unpack_images(packed, n), correct)
    with pytest.raises(ValueError, match="hex digits hold"):
        unpack_images(packed, 8 * len(bytes.fromhex(packed)) + 1)
