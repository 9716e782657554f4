"""The package layering the developers' guide states, as `make lint` checks it (import-linter, `.importlinter`):
`models` (the SOAP core) imports neither `training` nor `service`; `service` does not import `training` (the serving
image installs no training code); no import cycle among the modules of the three, function-level imports included.

The contract holds on the tree; the same checker, run on a copy of the tree with one rule broken, fails and names the
import that broke it (so a pass is not a vacuous one). A fresh interpreter importing every module also loads nothing
across the boundary (an import that happens only when something else is imported).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter, in the dev extra
PACKAGES = ("models", "service", "training")
FORBIDDEN = {"models": ("training", "service"), "service": ("training",)}
CONFIG = configparser.ConfigParser()
CONFIG.read(ROOT / ".importlinter")
NAMES = {section.rsplit(":", 1)[1]: CONFIG[section]["name"] for section in CONFIG if ":contract:" in section}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # its report wraps long lines at the terminal's width
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_tree_keeps_the_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Contracts: {len(NAMES)} kept, 0 broken." in result.stdout
    assert set(NAMES) == {"core", "serving", "acyclic"}


def _copy_of_the_tree(to: Path) -> Path:
    """The three packages' and the contract's Python sources and the contract file (no checkpoints or data)."""
    for package in (*PACKAGES, "tools"):
        for source in (ROOT / package).rglob("*.py"):
            target = to / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    shutil.copyfile(ROOT / ".importlinter", to / ".importlinter")
    return to


PLANTED = {
    # a function-level import that closes a cycle through four modules of training/
    "cycle": ("training/paper.py", "def planted():\n    from . import results_page\n", "acyclic", "training.paper ->"),
    # a cycle through a package's __init__ (which re-exports models.checkpoint)
    "package-cycle": (
        "models/checkpoint.py",
        "def planted():\n    import models\n",
        "acyclic",
        "models.checkpoint -> models",
    ),
    # (models importing training also breaks the service contract: service imports models)
    "core-imports-training": (
        "models/purifier.py",
        "def planted():\n    from training import paper\n",
        "core",
        "models.purifier -> training.paper",
    ),
    "service-imports-training": (
        "service/errors.py",
        "import training.stats\n",
        "serving",
        "service.errors -> training.stats",
    ),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_the_check_fails_on_a_planted_violation(tmp_path: Path, case: str) -> None:
    path, planted, contract, named = PLANTED[case]
    tree = _copy_of_the_tree(tmp_path)
    with (tree / path).open("a") as source:
        source.write("\n\n" + planted)
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{NAMES[contract]} BROKEN" in result.stdout, result.stdout[-3000:]
    assert named in result.stdout.split("Broken contracts", 1)[1]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_nothing_across_the_boundary(package: str) -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[package]!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"importing {package} loaded {result.stdout.strip()}"
