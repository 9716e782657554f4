"""`python -m training evaluate --attacks certify` end to end on the zoo FCN and real test digits (small n)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import CheckpointError
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
    assert first["command"] == (
        f"python -m training evaluate --model {ROOT / 'models' / 'zoo' / 'mnist-fcn-dr'} --data-root "
        f"{ROOT / 'tests' / 'data' / 'mnist'} --n 3 --attacks certify --seed 0 --out {tmp_path} --n0 20 "
        "--certify-n 300 --alpha 0.001 --noise-batch 128 --bases noisy,denoised"
    )
    assert f"Command: `{first['command']}`" in table
    noisy = first["bases"]["noisy"]
    acc = [noisy["certified_accuracy"][str(r)]["accuracy"] for r in first["radii"]]
    assert acc == sorted(acc, reverse=True)  # certified accuracy cannot grow with the radius
    assert acc[-1] == 0.0  # n = 300, alpha = 0.001: no radius can reach 2.0
    # ACR: each image's radius when correct, else 0, averaged over the 3 images; a column of the table
    assert noisy["average_certified_radius"] == pytest.approx(sum(r or 0.0 for r in noisy["radii"]) / 3)
    assert noisy["average_certified_radius"] > 0
    assert f"| noisy | 3 | {noisy['average_certified_radius']:.3f} |" in table
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
    assert sound["command"] == (  # what ran, spelled out (not the test runner's own argv)
        f"python -m training soundness --certified {tmp_path / 'certify-noisy.jsonl'} --data-root "
        f"{ROOT / 'tests' / 'data' / 'mnist'} --n 2 --multipliers 1.0,3.0 --steps 5 --samples 8 --predict-n 200 "
        f"--alpha 0.001 --batch-size 25 --seed 0 --out {tmp_path}"
    )
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

    # a checkpoint that moved after its certification (candidates/ to models/zoo/): --model says where it is now
    header = json.loads(lines[0]) | {"model": str(tmp_path / "moved-away")}
    (tmp_path / "moved" / "certify-noisy.jsonl").parent.mkdir()
    (tmp_path / "moved" / "certify-noisy.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    argv[argv.index("--certified") + 1] = str(tmp_path / "moved" / "certify-noisy.jsonl")
    argv[argv.index("--out") + 1] = str(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="moved-away"):
        main(argv)
    assert main([*argv, "--model", str(ROOT / "models" / "zoo" / "mnist-fcn-dr")]) == 0
    moved = json.loads((tmp_path / "moved" / "soundness-noisy.json").read_text())
    assert moved["passed"]
    assert moved["model"] == str(ROOT / "models" / "zoo" / "mnist-fcn-dr")
    assert f"--model {ROOT / 'models' / 'zoo' / 'mnist-fcn-dr'}" in moved["command"]


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


def _certify_cli(out: Path, n: int, processes: int = 1, noise_batch: int = 128) -> list[dict]:
    """`evaluate --attacks certify` in real processes (torchrun with Gloo when processes > 1); the noisy log's rows."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    args = ["-m", "training", "evaluate", "--model", str(ROOT / "models" / "zoo" / "mnist-fcn-dr")]
    args += ["--data-root", str(ROOT / "tests" / "data" / "mnist"), "--images", str(n), "--attacks", "certify"]
    args += [
        "--bases",
        "noisy",
        "--n0",
        "20",
        "--certify-n",
        "300",
        "--noise-batch",
        str(noise_batch),
        "--threads",
        "1",
    ]
    args += ["--device", "cpu", "--no-figures", "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / "certify-noisy.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_torchrun_certification_equals_one_process_and_resumes_from_part_logs(tmp_path):
    """Two ranks share the images and rank 0 merges their part logs: the same per-image certificates as one process
    (an image's noise depends on its index only). Part logs left by an interrupted run count as done."""
    single = _certify_cli(tmp_path / "one", 6)
    shared = _certify_cli(tmp_path / "two", 6, processes=2)
    assert _stable(shared) == _stable(single)
    assert not list((tmp_path / "two").glob("*.part*.jsonl"))  # merged into the one log
    result = json.loads((tmp_path / "two" / "certify.json").read_text())
    assert result["processes"] == 2
    assert "2 x 1 threads" in (tmp_path / "two" / "certify.md").read_text()

    # an interrupted sharded run: rank 1's part holds images 4 and 6 only; a single process certifies the rest, with
    # another noise batch (a memory setting: the same noise, so the same certificates, and the log continues)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    header = (tmp_path / "two" / "certify-noisy.jsonl").read_text().splitlines()[0]
    forged = [dict(single[3], seconds=-1.0), dict(single[5], seconds=-1.0)]  # marked: must be read, not redone
    (resumed / "certify-noisy.part1.jsonl").write_text("\n".join([header, *map(json.dumps, forged)]) + "\n")
    rows = _certify_cli(resumed, 6, noise_batch=64)
    assert _stable(rows) == _stable(single)
    assert [r["seconds"] for r in rows].count(-1.0) == 2
    assert not list(resumed.glob("*.part*.jsonl"))


def test_average_certified_radius_counts_wrong_and_abstained_images_as_zero():
    from training.certify import ImageResult, average_certified_radius

    images = [
        ImageResult(0, 7, 7, 1.5, 0.99, 0.0),  # correct, R = 1.5
        ImageResult(1, 2, 2, 0.5, 0.8, 0.0),  # correct, R = 0.5
        ImageResult(2, 1, 3, 1.9, 0.99, 0.0),  # wrong: its radius does not count
        ImageResult(3, 0, None, None, 0.4, 0.0),  # abstained
    ]
    assert average_certified_radius(images) == pytest.approx((1.5 + 0.5) / 4)
    assert average_certified_radius(images[:2]) == pytest.approx(1.0)
    assert average_certified_radius([]) == 0.0


def test_stored_certifications_carry_their_acr_and_older_files_still_load(tmp_path):
    """Every committed certify.json records the ACR of its per-image log; a file written before the ACR was recorded
    loads (ACR None, shown as –) and dumps back without the key; σ = 0.5 keeps the columns it always had."""
    from training.certify import markdown, read_certify_log, table_radii
    from training.records import CERTIFY_FILE, load_certification

    stored = sorted((ROOT / "docs" / "results").glob(f"*/certify*/{CERTIFY_FILE}"))
    assert stored
    for path in stored:
        result = load_certification(path)
        for kind, base in result.bases.items():
            _, images = read_certify_log(path.parent / f"certify-{kind}.jsonl")
            certified = sum(r.radius or 0.0 for r in images[: base.n] if r.correct)
            assert base.average_certified_radius == pytest.approx(certified / base.n), (path, kind)
    text = stored[0].read_text()
    old = json.loads(text)
    for base in old["bases"].values():
        del base["average_certified_radius"]
    (tmp_path / CERTIFY_FILE).write_text(json.dumps(old, indent=2) + "\n")
    loaded = load_certification(tmp_path / CERTIFY_FILE)
    assert all(b.average_certified_radius is None for b in loaded.bases.values())
    assert "average_certified_radius" not in loaded.to_json()
    assert f"| {next(iter(loaded.bases))} | {loaded.bases[next(iter(loaded.bases))].n} | – |" in markdown(loaded)
    assert table_radii(0.5) == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    assert table_radii(0.25)[-1] == 1.0
    assert table_radii(1.0)[-1] == 4.0
