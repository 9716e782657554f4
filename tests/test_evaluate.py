"""`python -m training evaluate` end to end on the shipped MNIST checkpoint and real test digits."""

from __future__ import annotations

import argparse
import csv
import json
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from models import create_model, load_checkpoint, purify, save_checkpoint
from models.checkpoint import meta_for
from training import cli, evaluate, provenance
from training.__main__ import main
from training.data import evaluation_order, load_test_data
from training.eval_config import EvalConfig
from training.records import load_evaluation, pack_images
from training.rows import ROWS

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
DIGITS = ROOT / "tests" / "data" / "mnist"
FAST = [
    "--pgd-steps",
    "10",
    "--adaptive-steps",
    "3",
    "--apgd-steps",
    "4",
    "--cw-steps",
    "10",
    "--cw-binary-steps",
    "2",
    "--df-steps",
    "10",
    "--sanity-n",
    "16",
    "--beta-n",
    "16",
    "--batch-size",
    "16",
]


RECORDED_COMMIT = "0123abcd+dirty"  # what provenance.git_commit answers during the run below


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(provenance, "git_commit", lambda: RECORDED_COMMIT)
        code = run_evaluation(out)
    return code, out, json.loads((out / "results.json").read_text())


def run_evaluation(out: Path) -> int:
    return main(
        [
            "evaluate",
            "--model",
            str(MODEL),
            "--data-root",
            str(DIGITS),
            "--n",
            "24",
            "--seed",
            "3",
            "--attacks",
            "noise,fgsm,pgd,cw,aux-pgd,bpda,full-grad",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--adaptive-n",
            "12",
            *FAST,
        ]
    )


def test_records_the_commit_as_provenance_does_with_its_dirty_marker(evaluation):
    """D3: the result names the code that produced it, "+dirty" included (one git provenance function)."""
    _, _, result = evaluation
    assert result["git_commit"] == RECORDED_COMMIT


def test_detector_rates_and_model_info(evaluation):
    """Every attack records how often the `suspicious` flag fires and how often it is fooled unflagged; the clean row
    measures the calibrated false-positive rate; model_info.json carries the RobustBench fields."""
    _, out, result = evaluation
    detector = result["detector"]
    assert detector["quantile"] == "0.99"
    assert detector["threshold"] > 0
    assert detector["clean"]["flagged"]["correct"] <= 2  # 1 % false positives on 24 clean digits
    for name, attack in result["attacks"].items():
        rates = attack["detector"]
        fooled = attack["rows"]["min-aux"]["n"] - attack["rows"]["min-aux"]["correct"]
        assert rates["fooled_unflagged"]["correct"] <= fooled, name
        assert rates["flagged"]["n"] == attack["n"]
    assert result["attacks"]["noise"]["detector"]["flagged"]["accuracy"] > 0.5  # uniform noise trips the flag
    info = json.loads((out / "model_info.json").read_text())
    assert info["clean_acc"] == f"{100 * result['clean']['min-aux']['accuracy']:.2f}"
    assert info["eps"] == "0.3"
    assert info["adaptive_worst_case_n"] == 12
    assert info["reported"] == "61.88"


def test_writes_markdown_json_csv_and_figures(evaluation):
    code, out, result = evaluation
    assert code == 0
    assert result["n"] == 24
    assert result["seed"] == 3
    assert result["rows"] == list(ROWS)
    assert list(result["attacks"]) == ["noise", "fgsm", "pgd", "cw", "aux-pgd", "bpda", "full-grad"]
    for _name, attack in result["attacks"].items():
        expected_n = 12 if attack["kind"] == "adaptive" else 24
        assert attack["n"] == expected_n
        for row in ROWS:
            acc = attack["rows"][row]
            assert acc["n"] == expected_n
            assert 0 <= acc["correct"] <= expected_n
            lo, hi = acc["ci95"]
            assert lo <= acc["accuracy"] <= hi
        assert attack["seconds_per_image"] > 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ROWS) * (1 + len(result["attacks"]))
    md = (out / "results.md").read_text()
    assert "| row | no attack | noise | fgsm |" in md
    assert "## Sanity checks" in md
    assert "worst case over adaptive" in md
    for fig in ("aux_loss_vs_budget.png", "examples.png", "accuracy_vs_beta.png", "accuracy_vs_budget.png"):
        with Image.open(out / fig) as img:
            assert img.size[0] > 200
            assert img.size[1] > 200
        assert f"({fig})" in md


def test_numbers_match_the_real_pipeline(evaluation):
    """The clean min-aux cell is what models.purify + classification gives on the same images."""
    _, _, result = evaluation
    loaded = load_checkpoint(MODEL, "cpu")
    data, source = load_test_data("mnist", DIGITS, (1, 28, 28))
    order, _ = evaluation_order(data, source)
    x, y = data.batch(order[:24])
    with torch.no_grad():
        plain = int((loaded.network(x).argmax(1) == y).sum())
        purified = int((loaded.network(purify(loaded.network, x, loaded.purifier).images).argmax(1) == y).sum())
    assert result["clean"]["none"]["correct"] == plain
    assert result["clean"]["min-aux"]["correct"] == purified
    # the bare network falls to PGD; the oracle row is an upper bound of min-aux
    assert result["attacks"]["pgd"]["rows"]["none"]["accuracy"] < result["clean"]["none"]["accuracy"]
    for attack in result["attacks"].values():
        assert (
            attack["rows"]["oracle"]["correct"] >= attack["rows"]["min-aux"]["correct"] or attack["kind"] == "adaptive"
        )


def test_sanity_checks_are_reported(evaluation):
    _, _, result = evaluation
    names = {c["name"] for c in result["sanity_checks"]}
    assert {
        "epsilon-zero-identity",
        "within-budget-and-range",
        "iterative-at-least-fgsm",
        "adaptive-at-least-blind",
        "noise-weaker-than-gradient (none)",
    } <= names
    byname = {c["name"]: c for c in result["sanity_checks"]}
    assert byname["epsilon-zero-identity"]["passed"]
    assert byname["within-budget-and-range"]["passed"]
    assert result["worst_case"]["adaptive"]["min-aux"]["n"] == 12
    worst = result["worst_case"]["adaptive"]["min-aux"]["correct"]
    assert worst <= min(result["attacks"][a]["rows"]["min-aux"]["correct"] for a in ("bpda", "full-grad"))


def test_failed_sanity_check_is_a_warning_in_the_report():
    """A stored baseline evaluation with two broken columns: FGSM over its budget, PGD weaker than FGSM."""
    from training.records import AttackColumn, load_evaluation
    from training.report import sanity_lines
    from training.sanity import run_checks
    from training.stats import Accuracy

    def column(max_linf: float, correct: int) -> AttackColumn:
        acc = Accuracy(correct=correct, n=10, accuracy=correct / 10, ci95=(0.0, 1.0))
        return AttackColumn(
            kind="blind",
            norm="linf",
            budget=0.3,
            description="",
            n=10,
            seconds_per_image=0.1,
            max_linf=max_linf,
            max_l2=1.0,
            out_of_range_images=0,
            rows={"none": acc},
        )

    stored = load_evaluation(ROOT / "docs" / "results" / "mnist-fcn-dr-vanilla" / "results.json")
    assert stored.rows == ["none"]
    result = stored.model_copy(update={"attacks": {"fgsm": column(0.5, 2), "pgd": column(0.3, 4)}})
    checks = run_checks(result)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"within-budget-and-range", "iterative-at-least-fgsm"}
    lines = sanity_lines(checks)
    assert sum("WARNING" in line for line in lines) == 2


def test_baseline_checkpoint_gets_only_the_unpurified_row(tmp_path):
    torch.manual_seed(0)
    model = create_model("mnist-fcn-dr")
    meta = meta_for(
        model,
        network="mnist-fcn-dr",
        dataset="mnist",
        class_names=[str(d) for d in range(10)],
        training={"recipe": "vanilla"},
    )
    save_checkpoint(model, meta, tmp_path / "vanilla")
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "vanilla"),
            "--data-root",
            str(DIGITS),
            "--n",
            "8",
            "--attacks",
            "fgsm,bpda",
            "--out",
            str(tmp_path / "out"),
            "--no-figures",
            *FAST,
        ]
    )
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0
    assert result["rows"] == ["none"]
    assert list(result["attacks"]) == ["fgsm"]


def test_the_recorded_command_is_the_one_that_ran_and_parses_back_to_it(evaluation):
    """The options are declared once (training/eval_config.py): the command written into results.json spells out
    what the run used, in the format the committed results cite, and parsing it gives the same evaluation."""
    _, out, result = evaluation
    assert result["command"] == (
        f"python -m training evaluate --model {MODEL} --data-root {DIGITS} --n 24 "
        f"--attacks noise,fgsm,pgd,cw,aux-pgd,bpda,full-grad --seed 3 --out {out} --batch-size 16 --beta 0.5 "
        "--sanity-n 16 --beta-n 16 --adaptive-n 12 --pgd-steps 10 --cw-steps 10 --cw-binary-steps 2 --df-steps 10 "
        "--adaptive-steps 3 --apgd-steps 4"
    )
    config = parse_evaluate(result["command"])
    assert config.command() == result["command"]
    assert (config.n, config.adaptive_n, config.settings.apgd_steps, config.settings.linf_eps) == (24, 12, 4, None)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (
            [
                "--model",
                "m",
                "--images",
                "7",
                "--attacks",
                "certify",
                "--sigma",
                "0.25",
                "--no-clamp",
                "--bases",
                "noisy",
            ],
            "python -m training evaluate --model m --n 7 --attacks certify --seed 0 --out results --sigma 0.25 "
            "--n0 100 --certify-n 10000 --alpha 0.001 --noise-batch 1000 --bases noisy --no-clamp",
        ),
        (
            ["--model", "m", "--attacks", "certify", "--batch-size", "5", "--threads", "2", "--eps", "0.1"],
            "python -m training evaluate --model m --n 1000 --attacks certify --seed 0 --out results --n0 100 "
            "--certify-n 10000 --alpha 0.001 --noise-batch 1000 --bases noisy,denoised",
        ),
    ],
)
def test_a_certification_records_only_what_it_depends_on(argv, command):
    """`--attacks certify` records the evaluation's data options and the smoothing options (not the attacks')."""
    config = parse_evaluate("python -m training evaluate " + " ".join(argv))
    assert config.command() == command
    assert parse_evaluate(command).certify == config.certify


def parse_evaluate(command: str) -> EvalConfig:
    """The EvalConfig `python -m training evaluate ...` runs with: the real command-line parser."""
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "training", "evaluate"]
    return cli.from_args(EvalConfig, parser.parse_args(words[4:]))


def test_unknown_attack_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model",
            str(MODEL),
            "--data-root",
            str(DIGITS),
            "--attacks",
            "pgd,nonsense",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "unknown attack 'nonsense'" in capsys.readouterr().err


def test_results_page_puts_paper_numbers_beside_ours(evaluation, tmp_path):
    import shutil

    from training.results_page import main as page_main

    _, out, result = evaluation
    shutil.copytree(out, tmp_path / "results" / "mnist-fcn-dr")
    page = tmp_path / "results.md"
    assert page_main(["--results", str(tmp_path / "results"), "--page", str(page)]) == 0
    text = page.read_text()
    assert "## Table 1: MNIST" in text
    assert "## Adaptive attacks" in text
    assert "(97.56" in text
    assert "(61.88" in text  # the paper's min-aux clean and PGD numbers
    assert "results/mnist-fcn-dr/examples.png" in text
    assert f"n = {result['n']}; seed {result['seed']}" in text


def test_certified_section_lists_certify_only_folders_by_name_with_their_notes(tmp_path):
    """A model certified but not evaluated (a training variant next to a shipped model, same network): its row is
    named after its folder, and the folder's NOTES.md is printed below the table."""
    import shutil

    from training.records import load_evaluation
    from training.results_page import Evaluation, certified_section

    shipped = ROOT / "docs" / "results" / "mnist-fcn-dr" / "certify" / "certify.json"
    for name in ("mnist-fcn-dr", "mnist-fcn-dr-variant"):
        (tmp_path / name / "certify").mkdir(parents=True)
        shutil.copy(shipped, tmp_path / name / "certify" / "certify.json")
    (tmp_path / "mnist-fcn-dr-variant" / "certify" / "NOTES.md").write_text("The variant, compared.\n")
    stored = load_evaluation(ROOT / "docs" / "results" / "mnist-fcn-dr" / "results.json")
    lines = certified_section([Evaluation(tmp_path / "mnist-fcn-dr", stored)], tmp_path)
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| mnist")]
    assert rows == ["| mnist-fcn-dr"] * 2 + ["| mnist-fcn-dr-variant"] * 2  # noisy and denoised bases each
    assert any(line.startswith("- `mnist-fcn-dr-variant` (noisy, denoised)") for line in lines)
    assert "The variant, compared." in lines


def test_results_store_each_images_outcome_and_its_worst_cases_follow_from_them(evaluation):
    """results.json keeps, per attack and row, which images were right (packed bits): their counts are the table's,
    and the per-image worst case of every attack is the AND of them with the clean outcome."""
    _, out, raw = evaluation
    result = load_evaluation(out / "results.json")
    for row in result.rows:
        clean = result.correct_images(None, row)
        assert int(clean.sum()) == result.clean[row].correct
        assert len(clean) == result.n
        survived = clean.clone()
        m = min(column.n for name, column in result.attacks.items() if column.kind != "control")
        for name, column in result.attacks.items():
            mask = result.correct_images(name, row)
            assert len(mask) == column.n
            assert int(mask.sum()) == column.rows[row].correct, (name, row)
            if column.kind != "control":
                survived = survived[:m] & mask[:m]
        assert int(survived.sum()) == result.worst_case["all"].rows[row].correct
    assert set(raw["attacks"]["pgd"]["correct_images"]) == set(result.rows)


def test_joint_worst_case_joins_evaluations_of_one_checkpoint_image_by_image(evaluation, tmp_path):
    """Two evaluations of the same checkpoint and images: the joint worst case is their union of attacks per image,
    over the images both attacked; an evaluation whose one attack defeats every image brings it to 0."""
    import shutil

    from training import results_page

    _, out, _ = evaluation
    for name in ("suite-pinned", "suite-library"):
        shutil.copytree(out, tmp_path / name)
    loaded = {e.name: e for e in results_page._load(tmp_path)}
    pinned, library = loaded["suite-pinned"], loaded["suite-library"]
    for linf_only, group in ((False, "all"), (True, "linf")):
        joint = results_page.joint_worst_case(list(loaded.values()), pinned, "min-aux", linf_only)
        assert joint is not None
        assert joint.evaluations == ["suite-library", "suite-pinned"]
        assert joint.accuracy.correct == pinned.result.worst_case[group].rows["min-aux"].correct
        assert joint.accuracy.n == min(c.n for c in pinned.result.attacks.values() if c.kind != "control")
    assert results_page.joint_worst_case([pinned], pinned, "min-aux", False) is None  # one evaluation: nothing to join

    column = library.result.attacks["fgsm"]  # the library run's FGSM now defeats every image
    column.correct_images = {row: pack_images(torch.zeros(column.n, dtype=torch.bool)) for row in column.rows}
    joint = results_page.joint_worst_case([pinned, library], pinned, "min-aux", True)
    assert joint is not None
    assert joint.accuracy.correct == 0
    table = results_page.pinned_table([pinned], [pinned, library])
    assert "| 0.00 [0.0, 24.2] (n=12: `suite-library`, `suite-pinned`) |" in table.splitlines()[2]
