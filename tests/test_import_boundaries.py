"""The package layering the developers' guide states: `models` (the SOAP core) imports neither `training` nor
`service`; `service` does not import `training` (the serving image installs no training code).

Two checks: every import statement in the package's source, including those inside functions (ast), and a real
import of every module in a fresh interpreter, which also catches an import that only happens at import time of
something else.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"models": ("training", "service"), "service": ("training",)}


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved against `module`)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_source_file_imports_across_the_boundary(package: str) -> None:
    crossings = [
        f"{module} imports {name}"
        for module, path in _modules(package).items()
        for name in sorted(_imported(module, path))
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not crossings, crossings


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_nothing_across_the_boundary(package: str) -> None:
    modules = sorted(_modules(package))
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[package]!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"importing {package} loaded {result.stdout.strip()}"


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The ast walk resolves relative and function-level imports (else the test above could pass vacuously)."""
    source = tmp_path / "demo.py"
    source.write_text("def f():\n    from training.attacks import pgd\n\nfrom ..training import x\nfrom . import y\n")
    assert _imported("service.demo", source) == {"training.attacks", "training", "service"}
