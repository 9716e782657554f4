"""The documented image builds work with podman 4.3 too: a `FROM` that picks one of the Dockerfile's own stages
through an ARG (`FROM base-${VARIANT}`) resolves under podman 4.3 (buildah before 1.28.1, buildah#4312) only when
the build command passes that ARG: the ARG's default value is not applied to the stage lookup, and the build fails
with `short-name "install-index" did not resolve` (issue 28, for PIP_SOURCE). So every build command in the docs,
the scripts and the compose file must pass every such ARG. Static: reads the files, builds nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Where build commands of docker/Dockerfile are written down for users and for CI.
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), DOCKERFILE, ROOT / "docker" / "ci-stack.sh"]
BUILD = re.compile(r"\b(?:docker|podman|buildah)\s+(?:build|bud)\b")


def _stage_selecting_args() -> set[str]:
    """ARGs through which a FROM names a stage declared before it."""
    stages: list[str] = []
    selecting: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line.strip(), re.IGNORECASE)
        if not match:
            continue
        image, name = match.groups()
        args = re.findall(r"\$\{?(\w+)\}?", image)
        if args and not re.fullmatch(r"\$\{?\w+\}?", image):  # `FROM ${GPU_BASE}` names an image, not a stage
            pattern = re.sub(r"\\\$\\\{?\w+\\\}?", ".+", re.escape(image))
            if any(re.fullmatch(pattern, stage) for stage in stages):
                selecting |= set(args)
        if name:
            stages.append(name)
    return selecting


def _documented_builds() -> list[tuple[str, str]]:
    """(file, command) for each build of docker/Dockerfile written in the docs and scripts; a command continued
    with a trailing backslash is joined, a shell comment's leading `#` dropped."""
    found = []
    for path in DOCUMENTED:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not BUILD.search(line):
                continue
            command, j = line, i
            while command.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                command = command.rstrip()[:-1] + " " + lines[j].lstrip("# ").strip()
            if "docker/Dockerfile" in command:
                found.append((str(path.relative_to(ROOT)), command.strip()))
    return found


def test_the_dockerfile_picks_stages_through_variant_only():
    # PIP_SOURCE picked an install stage: the documented `--build-arg VARIANT=cpu` build failed under podman 4.3.
    assert _stage_selecting_args() == {"VARIANT"}


@pytest.mark.parametrize(("where", "command"), _documented_builds())
def test_every_documented_build_passes_the_args_that_pick_stages(where, command):
    missing = {arg for arg in _stage_selecting_args() if f"{arg}=" not in command}
    assert not missing, f"{where}: `{command}` does not pass {sorted(missing)} (podman 4.3 needs it)"


def test_the_documented_builds_include_the_cpu_image_alone():
    builds = _documented_builds()
    assert any(w == "README.md" and "VARIANT=cpu" in c for w, c in builds), "README's Deploy: the CPU image"
    assert any(w == "docs/deploy.md" and "VARIANT=cpu" in c and "PIP_SOURCE" not in c for w, c in builds)


def test_compose_builds_pass_the_args_that_pick_stages():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    builds = [
        (name, service["build"])
        for name, service in compose["services"].items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "docker/Dockerfile"
    ]
    assert builds
    for name, build in builds:
        assert _stage_selecting_args() <= set(build.get("args", {})), name


def test_deploy_docs_time_the_default_image_the_ci_script_builds():
    """docs/deploy.md's build timings are for the image ci-stack.sh builds by default (the CPU torch build), not the
    CUDA one they once described."""
    script = (ROOT / "docker" / "ci-stack.sh").read_text()
    torch = re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-([\d.]+)\}", script).group(1)
    timings = (ROOT / "docs" / "deploy.md").read_text().split("**Timings**", 1)[1].split("\n\n", 1)[0]
    assert f"torch {torch} CPU build" in timings
    assert "CPU image" in timings


def test_base_images_are_fully_qualified():
    """podman resolves `python:3.11-slim-bookworm` only through registries.conf's unqualified-search registries,
    which Debian's podman leaves empty: the defaults name their registry."""
    defaults = dict(re.findall(r"^ARG (\w+_BASE)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert set(defaults) == {"GPU_BASE", "CPU_BASE"}
    for name, image in defaults.items():
        assert image.split("/", 1)[0] == "docker.io", f"{name}={image}"
