"""Packaging: each package's third-party imports are declared in the right place (models/ in the `core` extra,
service/ in `serve`, training/ in `train`, the client in `client`, which pulls no torch), the console scripts resolve
and print the version, and the license metadata names the LICENSE file. Reads pyproject.toml and the source; builds
nothing (fast). tests/test_client_install.py installs the client for real."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from models import __version__

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"models", "service", "training"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("uvloop>=0.19; ..." -> "uvloop")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _self_extras(requirement: str) -> list[str]:
    """The extras a requirement on this package itself names ("soap-serving[core]" -> ["core"]), else []."""
    if _name(requirement) != _name(PROJECT["name"]):
        return []
    return [e.strip() for e in requirement.split("[", 1)[1].split("]", 1)[0].split(",")]


def _declared(*extras: str) -> set[str]:
    """The distributions an install with these extras pulls (the base dependencies, each extra, and the extras
    that an extra names through this package itself, such as `serve` -> `core`)."""
    names = {_name(r) for r in PROJECT["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in PROJECT["optional-dependencies"][extra]:
            todo += _self_extras(requirement)
            names.add(_name(requirement))
    return names - {_name(PROJECT["name"])}


def _imports(paths: list[Path]) -> dict[str, tuple[set[str], set[str]]]:
    """top-level module -> (the distributions that provide it, the files among `paths` that import it); absolute,
    third-party imports only, lazy ones (in functions, under TYPE_CHECKING) included."""
    dists = importlib.metadata.packages_distributions()
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                    continue
                providers = {_name(d) for d in dists.get(top, [top])}
                found.setdefault(top, (providers, set()))[1].add(str(path.relative_to(ROOT)))
    return found


CLIENT = ROOT / "service" / "client.py"  # the `client` extra; the rest of service/ is `serve` (+ optional `tracing`)


@pytest.mark.parametrize(
    ("where", "extras"),
    [
        ("models", ("core",)),
        ("service", ("serve", "tracing")),
        ("service/client.py", ("client",)),
        ("training", ("train", "attacks")),
    ],
)
def test_every_third_party_import_is_declared_where_it_is_used(where, extras):
    root = ROOT / where
    paths = [root] if root.is_file() else [p for p in root.rglob("*.py") if p != CLIENT]
    found = _imports(paths)
    if root == CLIENT:  # Pillow and numpy only for PIL images and tensors, imported when given one
        found = {m: v for m, v in found.items() if m not in {"PIL", "numpy"}}
    declared = _declared(*extras)
    # A namespace package (opentelemetry) comes from several distributions: one of them declared is enough.
    missing = {m: sorted(files) for m, (providers, files) in found.items() if not providers & declared}
    assert not missing, f"{where} imports modules of no distribution in {extras or 'the base dependencies'}: {missing}"


def test_extras_split_serving_from_training_and_dev_installs_everything():
    serve, train = _declared("serve"), _declared("train")
    assert "matplotlib" not in serve
    assert "playwright" not in serve
    assert "torchvision" not in serve
    assert {"fastapi", "uvicorn", "pydantic-settings", "fastapi-swagger"} <= serve
    assert "matplotlib" in train
    dev = PROJECT["optional-dependencies"]["dev"]
    assert any(
        r.replace(" ", "").startswith("soap-serving[")
        and {"serve", "train"} <= set(r.split("[", 1)[1].split("]", 1)[0].split(","))
        for r in dev
    ), "make test installs .[dev]: it must pull serve and train"


def test_the_client_needs_no_torch_and_serving_and_training_include_the_core():
    """`pip install '.[client]'` must not pull torch (the base dependencies are empty; torch is in `core`)."""
    client = _declared("client")
    assert client == {"httpx"}
    assert "torch" not in _declared()
    assert {"torch", "safetensors", "pydantic", "scipy"} <= _declared("serve") & _declared("train")


def test_console_scripts_resolve_and_print_the_version(capsys):
    scripts = PROJECT["scripts"]
    assert set(scripts) == {"soap-serve", "soap-train"}
    for script, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0, script
        assert capsys.readouterr().out.split()[-1] == __version__, script


def test_license_is_mit_and_shipped():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "WITHOUT WARRANTY OF ANY KIND" in text
