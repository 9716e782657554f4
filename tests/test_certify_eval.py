"""`python -m training evaluate --attacks certify` end to end on the zoo FCN and real test digits (small n)."""

import json
from pathlib import Path

import pytest

from training.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, n: int) -> dict:
    argv = [
        "evaluate",
        "--model",
        str(ROOT / "models" / "zoo" / "mnist-fcn-dr"),
        "--data-root",
        str(ROOT / "tests" / "data" / "mnist"),
        "--n",
        str(n),
        "--attacks",
        "certify",
        "--out",
        str(out),
        "--n0",
        "20",
        "--certify-n",
        "300",
        "--noise-batch",
        "128",
    ]
    assert main(argv) == 0
    return json.loads((out / "certify.json").read_text())


def test_certify_writes_table_figure_and_resumes(tmp_path):
    first = run(tmp_path, 3)
    assert set(first["bases"]) == {"noisy", "denoised"}
    assert first["smoothing"]["sigma"] == 0.5  # the checkpoint's training noise
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 1000
    table = (tmp_path / "certify.md").read_text()
    assert "r = 0.5" in table
    assert "--attacks certify" in table
    noisy = first["bases"]["noisy"]
    acc = [noisy["certified_accuracy"][str(r)]["accuracy"] for r in first["radii"]]
    assert acc == sorted(acc, reverse=True)  # certified accuracy cannot grow with the radius
    assert acc[-1] == 0.0  # n = 300, alpha = 0.001: no radius can reach 2.0
    logged = (tmp_path / "certify-noisy.jsonl").read_text().splitlines()
    assert len(logged) == 1 + 3
    second = run(tmp_path, 5)  # resumes: the first 3 images are read back, 2 more are certified
    assert len((tmp_path / "certify-noisy.jsonl").read_text().splitlines()) == 1 + 5
    assert second["bases"]["noisy"]["radii"][:3] == noisy["radii"]

    # the soundness check reads that log: SmoothAdv must not change a prediction within the certified radius
    argv = ["soundness", "--certified", str(tmp_path / "certify-noisy.jsonl"), "--data-root"]
    argv += [str(ROOT / "tests" / "data" / "mnist"), "--n", "2", "--multipliers", "1.0,3.0", "--steps", "5"]
    argv += ["--samples", "8", "--predict-n", "200", "--out", str(tmp_path)]
    assert main(argv) == 0
    sound = json.loads((tmp_path / "soundness-noisy.json").read_text())
    assert sound["passed"]
    assert [o["multiplier"] for o in sound["outcomes"]] == [1.0, 3.0]
    assert sound["outcomes"][0]["max_l2_over_radius"] <= 1.0 + 1e-5

    # the check can fail: a log whose radii were inflated 4x is caught (SmoothAdv flips predictions "inside" them)
    lines = (tmp_path / "certify-noisy.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    forged = [json.dumps(r | {"radius": 4 * r["radius"]}) for r in rows if r["radius"] is not None]
    (tmp_path / "forged" / "certify-noisy.jsonl").parent.mkdir()
    (tmp_path / "forged" / "certify-noisy.jsonl").write_text("\n".join([lines[0], *forged]) + "\n")
    argv[argv.index("--certified") + 1] = str(tmp_path / "forged" / "certify-noisy.jsonl")
    argv[argv.index("--multipliers") + 1] = "1.0"
    argv[argv.index("--out") + 1] = str(tmp_path / "forged")
    assert main(argv) == 1
    assert not json.loads((tmp_path / "forged" / "soundness-noisy.json").read_text())["passed"]


def test_certify_cannot_be_mixed_with_attacks(tmp_path, capsys):
    code = main(["evaluate", "--model", str(ROOT / "models" / "zoo" / "mnist-fcn-dr"), "--attacks", "pgd,certify"])
    assert code == 2
    assert "certify runs on its own" in capsys.readouterr().err


def test_certify_log_is_read_back_typed_and_refuses_what_is_not_one(tmp_path):
    """The per-image log is one format with one reader (certify resumes from it, soundness attacks it): every
    committed log reads back, a header survives its round trip, and a log with a missing field is refused by name."""
    from training.certify import CertifyLogHeader, read_certify_log

    logs = sorted((ROOT / "docs" / "results").rglob("certify-*.jsonl"))
    assert logs
    for log in logs:
        header, images = read_certify_log(log)
        assert header.base in log.name
        assert header.smoothing.sigma > 0
        assert images
        assert all(r.radius is None or r.radius > 0 for r in images)
    lines = logs[0].read_text().splitlines()
    broken = tmp_path / "certify-noisy.jsonl"
    broken.write_text("\n".join([lines[0], '{"index": 3}']) + "\n")
    with pytest.raises(ValueError, match="certify-noisy.jsonl is not a certification log"):
        read_certify_log(broken)
    header = CertifyLogHeader.from_json(lines[0])
    assert CertifyLogHeader.from_json(header.to_json()) == header
