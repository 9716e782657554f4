"""training.provenance.git_commit: the one record of which code produced a model or an evaluation result."""

from __future__ import annotations

import subprocess
from pathlib import Path

from training import provenance


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_marks_local_changes_to_the_code_as_dirty(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    for folder in ("models", "training", "docs"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "docs" / "a.py").write_text("x = 2\n")  # not code that produces a result
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "training" / "a.py").write_text("x = 2\n")
    assert provenance.git_commit(tmp_path) == head + "+dirty"


def test_git_commit_outside_a_checkout_is_unknown(tmp_path: Path) -> None:
    assert provenance.git_commit(tmp_path) == "unknown"
